"""Turn dataset interactions into InteractionEvents and publish them to Kafka (``slimstream up`` / ``produce``)."""

from __future__ import annotations

import asyncio
import csv
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from streams.events import InteractionEvent, describe_validation_error
from streams.kafka_auth import client_options
from streams.settings import Settings


def interaction_to_event(user_id: str, item_id: str, rating: float | None, timestamp: float) -> InteractionEvent:
    return InteractionEvent(
        user_id=user_id,
        item_id=item_id,
        event_type="rating" if rating is not None else "view",
        value=rating,
        timestamp=timestamp,
        event_id=f"{user_id}|{item_id}|{int(timestamp)}",
    )


def earliest_events(dataset: str, n: int) -> list[InteractionEvent]:
    """The first ``n`` interactions of ``data.dataset`` in time order (ties by user, then item): a backlog as the
    dataset's own history would have built it."""
    from streams.datasets import load_interactions

    rows = sorted(load_interactions(dataset), key=lambda i: (i.timestamp, i.user_id, i.item_id))[:n]
    return [interaction_to_event(i.user_id, i.item_id, i.rating, i.timestamp) for i in rows]


def sample_replay(dataset: str, users: int, max_events: int, seed: int) -> list[InteractionEvent]:
    """A seeded sample of ``users`` users of ``data.dataset``, each user's first ``max_events // users``
    interactions, merged in timestamp order (a plain prefix of the time-ordered sample would often be one
    user's whole history)."""
    from collections import Counter

    from streams.datasets import load_interactions, sample_users

    per_user = max(1, max_events // users)
    taken: Counter[str] = Counter()
    events = []
    for i in sample_users(load_interactions(dataset), users, seed):
        if taken[i.user_id] < per_user:
            taken[i.user_id] += 1
            events.append(interaction_to_event(i.user_id, i.item_id, i.rating, i.timestamp))
    return events


def read_event_file(path: Path) -> Iterator[tuple[int, InteractionEvent | str]]:
    """Yield (line number, event or error message) from a JSONL or CSV file of InteractionEvents."""
    suffix = path.suffix.lower()
    with path.open(newline="", encoding="utf-8") as fh:
        if suffix == ".csv":
            for n, row in enumerate(csv.DictReader(fh), start=2):
                data = {k: v for k, v in row.items() if k and v not in (None, "")}
                yield n, _validate(data)
        elif suffix in (".jsonl", ".ndjson", ".json"):
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, f"malformed JSON: {exc}"
                    continue
                yield n, _validate(data) if isinstance(data, dict) else "expected a JSON object"
        else:
            raise ValueError(f"{path}: unsupported extension {suffix!r} (use .jsonl or .csv)")


def _validate(data: dict) -> InteractionEvent | str:
    try:
        return InteractionEvent.model_validate(data)
    except ValidationError as exc:
        return describe_validation_error(exc)


async def start_producer(settings: Settings) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(**client_options(settings.kafka), acks="all", linger_ms=5)
    await producer.start()
    return producer


async def publish(
    producer: AIOKafkaProducer,
    topic: str,
    events: Iterable[InteractionEvent],
    rate: float | None = None,
    on_sent: Callable[[InteractionEvent], None] | None = None,
) -> int:
    """Send events keyed by user_id, at most ``rate`` per second (None: as fast as possible)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    pending = []
    for ev in events:
        if rate:
            delay = start + sent / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        pending.append(await producer.send(topic, ev.model_dump_json(exclude_none=True).encode(),
                                           key=ev.user_id.encode()))
        sent += 1
        if on_sent:
            on_sent(ev)
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    return sent


def publish_events(settings: Settings, events: Iterable[InteractionEvent], rate: float | None = None) -> int:
    """Blocking: open a producer, send ``events`` to the interactions topic (at most ``rate``/s), close it."""
    async def run() -> int:
        producer = await start_producer(settings)
        try:
            return await publish(producer, settings.kafka.topic_interactions, events, rate)
        finally:
            await producer.stop()

    return asyncio.run(run())
