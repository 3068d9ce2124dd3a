"""The fast-path batch writes each user's window once per batch, the newest one, in its event's context."""

from __future__ import annotations

import asyncio
import contextvars

from agents.window import FastPathBatch
from streams.events import InteractionEvent
from streams.window import WindowState, apply_event

CURRENT = contextvars.ContextVar("current", default=None)  # stands in for Faust's current-event variable


def _apply(state: WindowState | None, user: str, item: str, offset: int) -> WindowState:
    ev = InteractionEvent(user_id=user, item_id=item, event_type="view", timestamp=1000.0 + offset)
    return apply_event(state, ev, partition=offset % 2, offset=offset, window_size=20, keep_event_ids=8)


def test_a_users_events_in_one_batch_make_one_write_of_the_newest_window_in_its_event_context() -> None:
    writes: list[tuple[WindowState, object]] = []
    batch = FastPathBatch(lambda e: asyncio.sleep(0), max_events=100, wait_s=1.0,
                          write=lambda st: writes.append((st, CURRENT.get())))
    a = b = None
    for offset, (user, item) in enumerate([("u1", "x"), ("u2", "y"), ("u1", "z"), ("u1", "w")]):
        prev = batch.newest(user)  # what the agent reads before the table
        assert prev is (a if user == "u1" else b)
        st = _apply(prev, user, item, offset)
        CURRENT.set(f"event@{offset}")
        batch.add(f"event@{offset}", st, (user, item))
        if user == "u1":
            a = st
        else:
            b = st
        CURRENT.set("the answering task")  # what the batch's own task would see
    assert batch.newest("u1").version == 3 and batch.newest("u1").item_ids == ["x", "z", "w"]
    batch.write_windows()
    # One write per user, the newest window, each in the context of the event that made it (Faust files the
    # changelog record under that event's partition).
    assert [(st.user_id, st.version, ctx) for st, ctx in writes] == [("u1", 3, "event@3"), ("u2", 1, "event@1")]
    assert batch.newest("u1") is None  # written: the next event reads the table
    batch.write_windows()
    assert len(writes) == 2


def test_a_duplicate_answered_again_is_not_written() -> None:
    writes: list[WindowState] = []
    batch = FastPathBatch(lambda e: asyncio.sleep(0), max_events=100, wait_s=1.0, write=writes.append)
    st = _apply(None, "u1", "x", 0)
    batch.add("redelivered", st)  # answered (its answer may not have gone out), already in the table
    assert batch.newest("u1") is None
    batch.write_windows()
    assert writes == []
