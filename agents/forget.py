"""Forgetting a user in the stream: the ``forget`` control record (:class:`streams.events.ForgetUser`).

The record is keyed by the user like their events, so it arrives on the user's partition after everything
they sent before it, and the window agent applies it in that order, in the record's own context:

* the window: a changelog tombstone (``del windows[user]``), so a restart or a new owner recovers nothing,
  with either table store; a pending write of this batch is dropped first so it cannot bring the window back;
* the rationale points in Qdrant (the user's point id and any point whose payload names the user) and
  the user's preference point;
* what the worker keeps in memory: the rationale request, the drift judge's last recommendation, the pull
  API's newest recommendations and the user's attribution records;
* the recommendations topic: a tombstone (null value) under the user's key, so a compacted topic and the
  consumers that keep "the latest recommendation per user" drop theirs.

A rationale the student is writing for the user meanwhile is not stored or published: the slow path checks
that the window it was written for still exists (:func:`window_alive`). Files on disk (teacher datasets,
distillation examples, the teacher cache) are the CLI's part (``slimstream forget``, :mod:`retrain.forget`).
A user who sends events after the record starts a new window from nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from agents.state import runtime
from streams.app import recommendations_topic, windows
from streams.window import WindowState

log = logging.getLogger(__name__)


class PendingWindows(Protocol):
    lock: asyncio.Lock  # held while a batch is answered

    def drop(self, user_id: str) -> None: ...


async def forget_in_stream(user_id: str, batch: PendingWindows) -> int:
    """Delete what the stream keeps about ``user_id``; returns the rationale points deleted. Call it from the
    stream's iteration of the control record (the tombstone goes to that record's partition)."""
    # Under the batch lock: an answer in flight goes out before the tombstone, none for the user after it.
    async with batch.lock:
        batch.drop(user_id)
        had_window = user_id in windows
        if had_window:
            del windows[user_id]  # Faust writes a null-valued changelog record: recovery deletes the key
        runtime.forget_user(user_id)  # the rationale request, the drift judge's and the pull API's records
        store = runtime.store
        assert store is not None
        points = await runtime.in_store(store.delete_rationales, user_id)
        await runtime.drop_preference(user_id)
        await recommendations_topic.send(key=user_id.encode(), value=None)
    runtime.metrics["users_forgotten"] += 1
    log.info("forgot user %r: window %s, %d rationale point(s), recommendation tombstone sent",
             user_id, "deleted" if had_window else "absent", points)
    return points


def window_alive(state: WindowState) -> bool:
    """Whether the window ``state`` was read from is still the user's lineage (not forgotten since; a window
    rebuilt after a forget has a new epoch)."""
    raw = windows.get(state.user_id)
    return bool(raw) and WindowState.model_validate(raw).epoch == state.epoch
