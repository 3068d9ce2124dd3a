"""Every topic the app reads or writes, declared as data, and created up front.

Creating them before the worker starts matters on Tansu, which auto-creates unknown topics with 4
partitions: a changelog or source topic created that way may not match what the app expects, and
co-partitioning (interactions and the windows changelog, both keyed by user_id) needs equal partition
counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from streams.kafka_auth import client_options
from streams.settings import Settings

WINDOWS_TABLE = "windows"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    compacted: bool = False
    purpose: str = ""


def topic_specs(settings: Settings) -> list[TopicSpec]:
    p, r = settings.kafka.topic_partitions, settings.kafka.topic_replication
    return [
        TopicSpec(settings.kafka.topic_interactions, p, r, purpose="InteractionEvent in, key user_id"),
        TopicSpec(settings.kafka.topic_recommendations, p, r, purpose="Recommendation out, key user_id"),
        TopicSpec(settings.kafka.topic_dead_letter, p, r, purpose="DeadLetter: rejected input with reason"),
        TopicSpec(settings.kafka.changelog_topic(WINDOWS_TABLE), p, r, compacted=True,
                  purpose="internal: behaviour-window table changelog"),
        # Broadcast, not partitioned work: every worker reads all of it without a consumer group, in order.
        TopicSpec(settings.kafka.topic_model_updates, 1, r, purpose="ModelUpdate: promote/rollback, key 'model'"),
        TopicSpec(settings.kafka.topic_drift, 1, r, purpose="DriftDecision from the workers' drift monitors"),
    ]


class TopicMismatch(RuntimeError):
    pass


async def ensure_topics(settings: Settings, timeout: float = 30.0,
                        names: Collection[str] | None = None) -> dict[str, int]:
    """Create missing topics (all of the app's, or only ``names``); fail loudly if an existing one has the
    wrong partition count. Raises ``KafkaConnectionError`` when no broker answers within ``timeout``."""
    specs = [s for s in topic_specs(settings) if names is None or s.name in names]
    admin = AIOKafkaAdminClient(**client_options(settings.kafka), request_timeout_ms=10_000)
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                await admin.close()
                raise
            await asyncio.sleep(0.5)
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                await admin.create_topics([
                    NewTopic(s.name, num_partitions=s.partitions, replication_factor=s.replication,
                             topic_configs={"cleanup.policy": "compact"} if s.compacted else {})
                    for s in missing
                ])
            except TopicAlreadyExistsError:
                pass  # another process won the race; the partition check below still applies
        described = await admin.describe_topics([s.name for s in specs])
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        bad = [f"{s.name}: has {counts.get(s.name)} partitions, expected {s.partitions}"
               for s in specs if counts.get(s.name) != s.partitions]
        if bad:
            raise TopicMismatch("topic partition counts do not match the app: " + "; ".join(bad))
        return counts
    finally:
        await admin.close()
