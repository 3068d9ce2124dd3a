"""Announce a registry change (promote / rollback) to the workers: one :class:`ModelUpdate` on ``model-updates``.

The registry (``streams/registry.py``) stays the source of truth: a worker loads its CURRENT at start; the
update only tells running workers to swap now (``agents/model_updates.py``). So the order is always: change the
registry, then publish. If publishing fails the change stands, and the next worker start picks it up;
``slimstream models publish`` re-announces the current state.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Literal

from streams.events import ModelUpdate
from streams.kafka_auth import client_options
from streams.settings import Settings

if TYPE_CHECKING:
    from streams.registry import ModelRegistry

MODEL_UPDATE_KEY = b"model"  # one key, one partition: updates are read in the order they were published


def model_update_for(registry: ModelRegistry, settings: Settings,
                     action: Literal["promote", "rollback"], reason: str = "") -> ModelUpdate:
    """The update describing the registry's state now: its CURRENT version and, from the history, the one
    served before the last change (``None`` both ways means the base student)."""
    version = registry.current()
    history = registry.history()
    last = history[-1] if history else None
    previous = last.get("previous") if last is not None and last.get("version") == version else None
    return ModelUpdate(
        component="ranker" if registry.kind == "ranker" else "student",
        action=action,
        version=version,
        previous=previous,
        model_version=registry.model_version(version, settings),
        registry_dir=str(registry.root.resolve()),
        reason=reason,
    )


async def publish_model_update(settings: Settings, update: ModelUpdate, *, connect_timeout_s: float = 5.0) -> None:
    """Publish ``update`` (acks=all, key ``model``), creating the topic first if needed.

    Raises ``aiokafka.errors.KafkaConnectionError`` when no broker answers within ``connect_timeout_s``
    (other ``KafkaError``s for other failures).
    """
    from aiokafka import AIOKafkaProducer

    from streams.topics import ensure_topics

    # An unknown topic would be auto-created by Tansu with 4 partitions; create it as declared instead.
    await ensure_topics(settings, timeout=connect_timeout_s, names={settings.kafka.topic_model_updates})
    producer = AIOKafkaProducer(**client_options(settings.kafka), acks="all",
                                request_timeout_ms=int(max(connect_timeout_s, 10.0) * 1000))
    try:
        await producer.start()
        await producer.send_and_wait(settings.kafka.topic_model_updates, update.model_dump_json().encode(),
                                     key=MODEL_UPDATE_KEY)
    finally:
        await producer.stop()


def publish_model_update_sync(settings: Settings, update: ModelUpdate, *, connect_timeout_s: float = 5.0) -> None:
    """:func:`publish_model_update` for synchronous callers (the CLI, a retrain job)."""
    asyncio.run(publish_model_update(settings, update, connect_timeout_s=connect_timeout_s))


__all__ = ["MODEL_UPDATE_KEY", "model_update_for", "publish_model_update", "publish_model_update_sync"]
