"""The rationale backlog: one entry per user, oldest first, bounded, never blocking the caller."""

from __future__ import annotations

import asyncio
import time

import pytest

from agents.backlog import RationaleBacklog


def test_requests_coalesce_per_user_and_keep_the_first_position() -> None:
    b = RationaleBacklog(max_users=10)
    for user in ["a", "b", "a", "c", "a", "b"]:
        b.request(user)
    assert len(b) == 3 and b.requested == 6 and b.coalesced == 3
    # "a" asked first and keeps its place however often it asks again: a busy user cannot starve the others,
    # nor be pushed back by its own events.
    assert b.take(2) == ["a", "b"] and b.take(5) == ["c"] and len(b) == 0
    b.request("a")
    assert b.take(1) == ["a"], "a user taken by the student can ask again"


def test_a_full_backlog_sheds_the_oldest_request_and_stays_bounded() -> None:
    b = RationaleBacklog(max_users=3)
    for k in range(10_000):
        b.request(f"u{k}")
    assert len(b) == 3 and b.shed == 9_997 and b.high_water == 3
    assert b.take(10) == ["u9997", "u9998", "u9999"]
    with pytest.raises(ValueError):
        RationaleBacklog(max_users=0)


def test_request_is_constant_time_whatever_the_backlog() -> None:
    b = RationaleBacklog(max_users=200_000)
    for k in range(100_000):
        b.request(f"u{k}")
    t0 = time.perf_counter()
    for _ in range(10_000):
        b.request("u50000")  # coalesced
    assert time.perf_counter() - t0 < 0.5 and len(b) == 100_000


def test_discard_and_age() -> None:
    b = RationaleBacklog()
    b.request("a", now=100.0)
    b.request("b", now=105.0)
    assert b.oldest_age(now=110.0) == pytest.approx(10.0)
    b.discard(["a", "zzz"])
    assert "a" not in b and "b" in b and b.oldest_age(now=110.0) == pytest.approx(5.0)
    snap = b.snapshot()
    assert snap["waiting_users"] == 1 and snap["requested"] == 2


def test_take_batch_waits_for_a_first_user_then_briefly_for_more() -> None:
    async def scenario() -> tuple[list[str], float, list[str]]:
        b = RationaleBacklog()

        async def later() -> None:
            await asyncio.sleep(0.2)
            b.request("a")
            await asyncio.sleep(0.05)
            b.request("b")

        task = asyncio.ensure_future(later())
        t0 = time.monotonic()
        first = await b.take_batch(4, within=0.3)  # gets a, then waits up to 0.3 s for more: b comes
        waited = time.monotonic() - t0
        await task
        b.request("c")
        full = await b.take_batch(1, within=5.0)  # a full batch does not wait
        return first, waited, full

    first, waited, full = asyncio.run(scenario())
    assert first == ["a", "b"] and 0.2 <= waited < 1.0 and full == ["c"]
