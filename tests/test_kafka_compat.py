"""streams/kafka_compat.py on the real broker: a consumer that stops after joining a fresh group (Tansu's
generation 0) leaves it, so the next member is assigned at once instead of after the old session expires."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer

from streams.broker import EmbeddedBroker
from streams.kafka_compat import leave_group_from_generation_zero
from tests.conftest import run

# Tansu answers a JoinGroup after half the session timeout (measured: 6 s at 12 s, 15 s at 30 s, whatever the
# rebalance timeout); a member that stopped without leaving holds the group until its session expires.
SESSION_MS = 12_000
REBALANCE_MS = 2_000


async def _assigned(consumer: AIOKafkaConsumer, timeout: float) -> float:
    t0 = time.monotonic()
    while not consumer.assignment():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"no partition assigned within {timeout:.0f}s")
        await consumer.getmany(timeout_ms=100)
    return time.monotonic() - t0


def _consumer(broker: EmbeddedBroker) -> AIOKafkaConsumer:
    return AIOKafkaConsumer("compat-topic", bootstrap_servers=broker.bootstrap_servers, group_id="compat",
                            session_timeout_ms=SESSION_MS, rebalance_timeout_ms=REBALANCE_MS,
                            heartbeat_interval_ms=1_000, enable_auto_commit=False)


def test_a_member_of_generation_zero_leaves_on_close(broker: EmbeddedBroker) -> None:
    leave_group_from_generation_zero()

    async def go() -> tuple[int, float]:
        first = _consumer(broker)
        await first.start()
        try:
            await _assigned(first, 30)
            generation = first._coordinator.generation
        finally:
            await first.stop()
        t0 = time.monotonic()
        second = _consumer(broker)
        await second.start()  # aiokafka's start joins the group
        try:
            await _assigned(second, 60)
            return generation, time.monotonic() - t0
        finally:
            await second.stop()

    generation, took = run(go())
    assert generation == 0  # the premise: Tansu's first generation, which aiokafka alone never leaves
    # One JoinGroup round (6 s here) and a SyncGroup. Without the fix: 22 s (measured), the departed member
    # named leader until its session expired and a second round.
    assert took < 10, f"the next member waited {took:.1f}s for an assignment"
