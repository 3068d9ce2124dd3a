"""Window agent: validate each interaction, update the user's behaviour window, answer it on the fast path.

Events are applied one at a time, but answered in batches (:class:`FastPathBatch`): one recommendation per user
per batch, for the user's newest window, built with one batched store call for all of them. The window table is
written once per user per batch too, when the batch is answered: under a backlog a user's many events in a batch
cost one changelog record instead of one each (the changelog produce was the window path's largest cost; a
changelog compacts to the newest value per key anyway). The write runs in the context of the user's newest
event, so Faust files it under that event's partition exactly as an in-stream write. Under a backlog a batch
holds up to ``worker.fast_path_batch_max`` events and the cost of answering grows with its users, not its
events (Kafka Streams' record cache does the same:
consecutive updates of a key are forwarded once); at a trickle a batch is one event, answered within
``worker.fast_path_batch_wait_s``. A full batch is answered in a task while the agent applies the next one's
events (the ranking runs in the ranker's thread meanwhile); one such answer is in flight at a time, and batches
are answered in the order they were closed.

Nothing here waits for the student: once an applied event's window is in the table its user is marked in the
rationale backlog (:mod:`agents.backlog`), which the rationale loops drain at the student's pace.

At-least-once: the stream does not ack on its own (``noack``); an event is acked once its batch was
answered (or it was dead-lettered / re-keyed), so Faust commits no offset whose recommendation has not been
sent. After a crash some events come again. :func:`streams.window.is_duplicate` recognises them by
(partition, offset) and event_id, so a replay never appends twice; the newest replayed event is answered
again, which is idempotent downstream.

A record that fails in a way nobody foresaw goes to the dead-letter topic with the error; one poison record
must not restart the agent and stop every partition.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from agents.forget import forget_in_stream
from agents.recommend import build_recommendations, publish_recommendations
from agents.state import runtime
from streams.app import app, dead_letter_topic, interactions_topic, recommendations_topic, windows
from streams.events import (DeadLetter, EventLimits, ForgetUser, InvalidEvent, RecommendationPath, dead_letter_key,
                            parse_record)
from streams.window import WindowState, apply_event, is_duplicate

log = logging.getLogger(__name__)
ANSWER_RETRIES = (0.5, 1.0, 2.0)  # seconds between attempts to answer a batch (the store or broker hiccups)
LATER_ANSWER_S, LATER_ANSWER_MAX_S = 2.0, 60.0  # then a later batch tries again, with this backoff


class FastPathBatch:
    """Applied events not yet answered: the newest window per user, the applied (user, item) pairs in order
    (the drift monitor judges each against the recommendation the user had before the batch), and every
    event to ack once the answers are out."""

    def __init__(self, ack: Callable[[Any], Awaitable[Any]], max_events: int, wait_s: float,
                 write: Callable[[WindowState], None], written: Callable[[str], None] | None = None) -> None:
        self._ack = ack
        self._write = write
        # Called with each user once their window is in the table: the rationale backlog's request. Not
        # earlier: the rationale loop reads the window from the table, and a request taken before the write
        # (the batch still filling, or its answer slow) found no window for a new user and was dropped, or the
        # previous window for a known one, so the user got no rationale for it until their next event.
        self._written = written
        self.max_events = max_events
        self.wait_s = wait_s
        self.states: dict[str, WindowState] = {}
        self.applied: list[tuple[str, str, str | None]] = []  # (user, item, the recommendation_id it names)
        self.events: list[Any] = []
        # user -> (the newest applied window, the context of the event that made it): not yet in the table
        self.unwritten: dict[str, tuple[WindowState, contextvars.Context]] = {}
        # Users whose answer was given up (the vector store or the broker was away): answered again with a
        # later batch, after LATER_ANSWER_S doubling per failed round, without waiting for their next event.
        self.later: set[str] = set()
        self._later_due = 0.0
        self._later_failures = 0
        self._pending = asyncio.Event()
        self.lock = asyncio.Lock()  # batches are answered in order: a user's v7 never goes out before v5
        self._in_flight: asyncio.Future[None] | None = None  # a full batch answered while the next one fills

    def add(self, event: Any, state: WindowState | None = None,
            applied: tuple[str, str, str | None] | None = None) -> None:
        """``applied``: ``state`` is new (the event was applied) and must reach the table; otherwise ``state``
        is only answered. Called from the stream's iteration, whose context names ``event``."""
        self.events.append(event)
        if state is not None:
            self.states[state.user_id] = state
        if applied is not None:
            self.applied.append(applied)
            assert state is not None
            self.unwritten[state.user_id] = (state, contextvars.copy_context())
        self._pending.set()

    def drop(self, user_id: str) -> None:
        """Forget the user's pending window and answer (a forget control record came in this batch)."""
        self.unwritten.pop(user_id, None)
        self.states.pop(user_id, None)
        self.later.discard(user_id)
        self.applied = [pair for pair in self.applied if pair[0] != user_id]

    def newest(self, user_id: str) -> WindowState | None:
        """The user's window applied in this batch and not yet written to the table, if any."""
        pending = self.unwritten.get(user_id)
        return pending[0] if pending else None

    def write_windows(self) -> None:
        """Write each pending user's newest window to the table, in the context of the event that made it.
        Synchronous: between taking a batch and writing it no other event can read the table."""
        unwritten, self.unwritten = self.unwritten, {}
        for state, ctx in unwritten.values():
            ctx.run(self._write, state)
            if self._written is not None:
                self._written(state.user_id)

    def _answer_later(self, states: dict[str, WindowState]) -> None:
        self.later.update(states)  # the users: their newest window is read from the table when it is their turn
        self._later_failures += 1
        wait = min(LATER_ANSWER_S * 2 ** (self._later_failures - 1), LATER_ANSWER_MAX_S)
        self._later_due = time.monotonic() + wait
        runtime.metrics["fast_path_answers_deferred"] += len(states)
        asyncio.get_running_loop().call_later(wait, self._pending.set)

    @property
    def full(self) -> bool:
        return len(self.events) >= self.max_events

    async def run(self) -> None:
        """Answer whatever is pending every ``wait_s`` (the agent answers full batches itself)."""
        while True:
            await self._pending.wait()
            await asyncio.sleep(self.wait_s)
            await self.answer()

    async def answer(self) -> None:
        """Take what is pending and answer it, after every batch taken before it."""
        taken = self.take()
        if taken is not None:
            await self.deliver(taken)

    async def answer_in_background(self) -> None:
        """Take a full batch and answer it in a task, so the agent applies the next batch's events while this one
        is ranked (in the ranker's thread) and sent. At most one such answer is in flight: a second full batch
        waits for it (backpressure), and batches are answered in the order they were taken (the lock is FIFO)."""
        if self._in_flight is not None:
            await self._in_flight  # re-raises what the previous answer raised, as an inline answer would
            self._in_flight = None
        taken = self.take()
        if taken is not None:
            self._in_flight = asyncio.ensure_future(self.deliver(taken))
            self._in_flight.add_done_callback(_log_failure)

    def cancel(self) -> None:
        """The agent stops: an answer in flight is dropped (its events were not acked, so they come again)."""
        if self._in_flight is not None:
            self._in_flight.cancel()

    def take(self) -> _Taken | None:
        """Close the pending batch. Synchronous: the windows reach the table before the next event reads it."""
        states, applied, events = self.states, self.applied, self.events
        self.states, self.applied, self.events = {}, [], []
        self.write_windows()
        self._pending.clear()
        retrying = bool(self.later) and time.monotonic() >= self._later_due
        if retrying:
            # Each waiting user's newest window (the table has it; a forgotten user has none).
            waiting = {u: WindowState.model_validate(raw) for u in self.later if (raw := windows.get(u))}
            states = {**waiting, **states}
            self.later = set()
        if not events and not retrying:
            return None
        return _Taken(states, applied, events)

    async def deliver(self, taken: _Taken) -> None:
        states, applied, events = taken
        async with self.lock:
            t0 = time.monotonic()
            for delay in (*ANSWER_RETRIES, None):
                try:
                    await _answer(list(states.values()), applied)
                    self._later_failures = 0
                    self.later.difference_update(states)  # answered now: no older deferred answer follows
                    break
                except Exception:
                    runtime.metrics["fast_path_errors"] += 1
                    if delay is None:
                        # The windows are durable (changelog). Holding the offsets would stop the partition
                        # for good: the events are acked, and these users are answered again later.
                        self._answer_later(states)
                        log.exception("fast path: answering %d users failed; their windows are kept and they "
                                      "are answered again in %.1fs", len(states), self._later_due - time.monotonic())
                        break
                    log.warning("fast path: answering %d users failed; retrying in %.1fs", len(states), delay,
                                exc_info=True)
                    await asyncio.sleep(delay)
            now = time.time()
            for event in events:
                await self._ack(event)
                stamp = getattr(getattr(event, "message", None), "timestamp", None)
                if stamp:  # the record's timestamp (the producer's clock) to its answer
                    runtime.telemetry.event_to_recommendation.observe(max(0.0, now - stamp))
            runtime.metrics["fast_path_batches"] += 1
            runtime.metrics["fast_path_batch_events"] += len(events)
            elapsed = time.monotonic() - t0
            runtime.latency["fast_path_batch_s"].append(elapsed)
            runtime.telemetry.fast_path_batch.observe(elapsed)
            runtime.telemetry.fast_path_batch_events.observe(len(events))


class _Taken(NamedTuple):
    states: dict[str, WindowState]  # the newest window per user (and deferred users due again)
    applied: list[tuple[str, str, str | None]]
    events: list[Any]  # to ack once answered


def _log_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("fast path: a background answer failed", exc_info=task.exception())


async def _answer(states: list[WindowState], applied: list[tuple[str, str, str | None]]) -> None:
    genres = await runtime.item_genres_many([item for _, item, _ in applied])
    for user_id, item_id, recommendation_id in applied:
        runtime.observe_event(user_id, item_id, genres.get(item_id, ()), recommendation_id)
    await publish_recommendations(runtime, recommendations_topic,
                                  await build_recommendations(runtime, states, RecommendationPath.fast))


@app.agent(interactions_topic)
async def window_agent(stream):  # type: ignore[no-untyped-def]
    s = runtime.settings
    limits = EventLimits.from_settings(s)
    await runtime.store_ready.wait()
    manual = stream.noack()
    batch = FastPathBatch(manual.ack, s.worker.fast_path_batch_max, s.worker.fast_path_batch_wait_s, _write_window,
                          lambda user_id: runtime.backlog.request(user_id))
    answering = asyncio.ensure_future(batch.run())
    try:
        async for event in manual.events():
            runtime.metrics["events_in"] += 1
            try:
                await _handle(event, batch, limits)
            except Exception as exc:  # a bug meets a record: dead-letter it, keep the stream going
                runtime.metrics["handler_errors"] += 1
                if runtime.metrics["handler_errors"] <= 5:
                    log.exception("window agent: unexpected error on %s[%d]@%d; dead-lettered",
                                  event.message.topic, event.message.partition, event.message.offset)
                await _dead_letter(event, f"internal error: {type(exc).__name__}: {exc}")
                batch.add(event)
            if batch.full:
                await batch.answer_in_background()
    finally:
        answering.cancel()
        batch.cancel()


async def _handle(event: Any, batch: FastPathBatch, limits: EventLimits) -> None:
    msg = event.message
    try:
        ev = parse_record(event.value, limits)
    except InvalidEvent as exc:
        await _dead_letter(event, str(exc))
        batch.add(event)
        return

    key = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else msg.key
    if key != ev.user_id:
        # The window table is partitioned by user_id; an event under another key (or none) sits on the
        # wrong partition. Re-publish it under its user_id instead of losing or misfiling it.
        runtime.metrics["rekeyed"] += 1
        await interactions_topic.send(key=ev.user_id.encode(), value=event.value)
        batch.add(event)
        return
    if isinstance(ev, ForgetUser):
        await forget_in_stream(ev.user_id, batch)
        batch.add(event)
        return

    s = runtime.settings
    state = batch.newest(ev.user_id)
    if state is None:
        raw = windows.get(ev.user_id)
        state = WindowState.model_validate(raw) if raw else None
    applied = None
    if is_duplicate(state, ev, msg.partition, msg.offset):
        runtime.metrics["duplicates"] += 1
        if state is None or not (msg.partition == state.partition and msg.offset == state.offset):
            batch.add(event)
            return
        # The newest applied event came again: its answer may not have gone out before a crash.
    else:
        state = apply_event(state, ev, msg.partition, msg.offset, s.worker.window_size, s.worker.recent_event_ids,
                            epoch=time.time_ns() // 1_000_000)
        runtime.metrics["events_applied"] += 1
        applied = (ev.user_id, ev.item_id, ev.recommendation_id)
    if applied is None and batch.newest(ev.user_id) is None:
        runtime.backlog.request(ev.user_id)  # a duplicate of a window already in the table (applied: on write)
    batch.add(event, state, applied)


def _write_window(state: WindowState) -> None:
    windows[state.user_id] = state.model_dump(mode="json")


async def _dead_letter(event: Any, reason: str) -> None:
    msg = event.message
    value = event.value if isinstance(event.value, bytes) else b""
    letter = DeadLetter.for_record(value, reason, msg.topic, msg.partition, msg.offset)
    await dead_letter_topic.send(key=dead_letter_key(msg.key), value=letter.model_dump_json().encode())
    runtime.metrics["dead_letters"] += 1
