"""Small aiokafka helpers for tests: publish records, read a topic until a condition holds."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import ConsumerRecord, TopicPartition

from streams.events import EventLimits, InvalidEvent, parse_event
from streams.settings import Settings
from streams.window import WindowState, apply_event, is_duplicate


async def publish(bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes]], linger_ms: int = 20) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=linger_ms)
    await producer.start()
    try:
        futures = [await producer.send(topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def event(user: str, item: str, ts: float, **extra: object) -> tuple[bytes, bytes]:
    body = {"user_id": user, "item_id": item, "event_type": "rating", "value": 4.0, "timestamp": ts, **extra}
    return user.encode(), json.dumps(body).encode()


async def read_until(
    bootstrap: str, topic: str, done: Callable[[list[ConsumerRecord]], bool], timeout: float
) -> list[ConsumerRecord]:
    """All records of ``topic`` from the beginning, read until ``done(records)`` or the timeout."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    records: list[ConsumerRecord] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while not done(records):
            left = deadline - loop.time()
            if left <= 0:
                break
            batch = await consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000))
            for tp_records in batch.values():
                records.extend(tp_records)
    finally:
        await consumer.stop()
    return records


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    """The broker's ListOffsets(latest) answer per partition: what Faust's recovery takes for the log end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        answer = await consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: offset for tp, offset in answer.items()}
    finally:
        await consumer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """A consumer group's committed offsets on ``topic`` (-1 where it committed none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        answer = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(topic, p) for p in range(partitions)])
        return {tp.partition: meta.offset for tp, meta in answer.items()}
    finally:
        await admin.close()


def expected_windows(bootstrap: str, n_records: int, settings: Settings | None = None) -> dict[str, WindowState]:
    """Every user's window recomputed from the first ``n_records`` of the interactions topic with the worker's
    own rules (validation in replay mode, de-duplication, window size), in the order the worker reads them.
    Epochs are 0: the worker stamps its own clock on a new lineage."""
    s = settings or Settings.from_env()
    records = asyncio.run(read_until(bootstrap, s.kafka.topic_interactions, lambda r: len(r) >= n_records, 120))
    assert len(records) == n_records, (len(records), n_records)
    limits = EventLimits(s.events.max_bytes, time_mode="replay")
    states: dict[str, WindowState] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        try:
            ev = parse_event(r.value, limits)
        except InvalidEvent:
            continue
        if r.key != ev.user_id.encode():
            continue  # the worker re-publishes it under its user_id and applies that copy when it comes
        state = states.get(ev.user_id)
        if not is_duplicate(state, ev, r.partition, r.offset):
            states[ev.user_id] = apply_event(state, ev, r.partition, r.offset, s.worker.window_size, s.worker.recent_event_ids)
    return states
