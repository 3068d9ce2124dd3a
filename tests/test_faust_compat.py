"""streams/faust_compat.py: a commit that fails in a rebalance does not leave Faust believing it committed.

Faust's real consumer class and its own bookkeeping (``ack``, ``_new_offset``, ``force_commit``); only the two
calls that would need a joined group are replaced: the broker commit (it fails once, "already rebalanced", as
aiokafka's does when the generation moved) and the assignment. The rebalance itself is what Faust does on it:
revoke (the partition's lists cleared) and re-seed from the group's committed offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from faust.transport.consumer import Consumer
from faust.types import TP

from streams.faust_compat import commit_bookkeeping_only_on_success

TOPIC = "interactions"


def _consumer() -> tuple[Any, TP, list[dict[TP, int]], dict[TP, int]]:
    app = faust.App("faust-compat-test", broker="kafka://127.0.0.1:1")
    consumer = app.consumer  # built, never started: nothing here reaches a broker
    tp = TP(TOPIC, 0)
    app.topics._acking_topics.add(TOPIC)  # what subscribing an agent to the topic does
    consumer.assignment = lambda: {tp}
    sent: list[dict[TP, int]] = []
    broker: dict[TP, int] = {tp: 10}  # the group's committed offset on the broker

    async def flush() -> None:
        return None

    app.producer.flush = flush  # type: ignore[method-assign]
    consumer._committed_offset[tp] = broker[tp]  # as seek_to_committed leaves it
    return consumer, tp, sent, broker


def _fail_first_commit(consumer: Any, sent: list[dict[TP, int]], broker: dict[TP, int],
                       meanwhile: Callable[[], Awaitable[None]] | None = None) -> None:
    """The broker commit: the first attempt fails ("already rebalanced", after ``meanwhile``), later ones land."""

    async def commit(offsets: dict[TP, int]) -> bool:
        sent.append(dict(offsets))
        if len(sent) == 1:
            if meanwhile is not None:
                await meanwhile()
            return False
        broker.update(offsets)
        return True

    consumer._commit = commit


def _message(offset: int) -> faust.types.Message:
    return faust.types.Message(TOPIC, 0, offset, time.time(), 0, {}, b"u", b"{}", None)


def test_the_fix_is_installed_on_the_pinned_faust() -> None:
    assert commit_bookkeeping_only_on_success()
    assert getattr(Consumer._commit_offsets, "_slimstream_fixed", False)


def test_a_commit_that_meets_a_rebalance_is_made_again_when_its_events_come_again() -> None:
    commit_bookkeeping_only_on_success()
    consumer, tp, sent, broker = _consumer()

    async def rebalance() -> None:
        # The rebalance completes while this commit is in flight: the partition is revoked and assigned back,
        # sought to the group's committed offset; the commit then fails with the old generation.
        await consumer.on_partitions_revoked({tp})
        consumer._committed_offset[tp] = broker[tp]

    _fail_first_commit(consumer, sent, broker, rebalance)

    async def scenario() -> None:
        for offset in range(10, 20):  # the partition's last events, all processed
            assert consumer.ack(_message(offset))
        assert not await consumer.force_commit()  # the commit of 20 meets the rebalance
        assert consumer._committed_offset[tp] == 10 and broker[tp] == 10
        for offset in range(10, 20):  # sought back to 10: the same events come again and are acked again
            consumer.ack(_message(offset))
        assert await consumer.force_commit()

    asyncio.run(scenario())
    assert broker[tp] == 20, sent  # without the fix: 10 for good (the re-acks fell under a recorded 20)
    assert consumer._committed_offset[tp] == 20


def test_a_failed_commit_without_a_revocation_is_made_with_the_next_one() -> None:
    commit_bookkeeping_only_on_success()
    consumer, tp, sent, broker = _consumer()
    _fail_first_commit(consumer, sent, broker)  # the partition was kept: its acked list must lead to the next commit

    async def scenario() -> None:
        for offset in range(10, 15):
            consumer.ack(_message(offset))
        assert not await consumer.force_commit()
        for offset in range(15, 20):
            consumer.ack(_message(offset))
        assert await consumer.force_commit()

    asyncio.run(scenario())
    assert sent == [{tp: 15}, {tp: 20}] and broker[tp] == 20
