"""Rationale loops: backlog -> coalesced, batched, deadline-bound student calls -> Qdrant -> slow path.

The window agent marks users in :attr:`Runtime.backlog` (one entry per user, however many events they sent);
``student.concurrency`` loops here take batches of them at the student's pace. A request always means the
user's *newest* window, read from the table when its batch starts, so a burst of events for one user costs
one student call, not one per event, and nothing the student does can hold up the window agent.

A batch that fails (the student hangs past its deadline, errors, or the vector store is unreachable) puts its
users back in the backlog after an exponential backoff (``student.retry_base_s`` .. ``retry_max_s``): they
keep their fast-path answers meanwhile and are explained once the backend returns, without a new event.

A user whose stored rationale is already at least as new as their window (by (epoch, version)) is skipped,
and so is one whose partition this worker no longer owns (a rebalance moved it; its new owner sweeps it).

The backlog lives in memory. After every (re)assignment, once the table is recovered, :func:`sweep` asks
again for each owned user whose window has no current rationale, so a crash or a rebalance loses no request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from agents.forget import window_alive
from agents.recommend import build_recommendations, publish_recommendations
from agents.runtime import DeadlineExceeded
from agents.state import owned_partitions, runtime
from models.prompts import build_slim_messages, prompt_item, sanitize_generated_text
from models.student_base import StudentBackend, StudentError, postprocess_rationale
from streams.app import app, recommendations_topic, windows
from streams.events import RecommendationPath
from streams.window import WindowState

log = logging.getLogger(__name__)
SWEEP_CHUNK = 512  # users per store lookup while sweeping
SWEEP_POLL_S = 1.0


def _current_state(user_id: str) -> WindowState | None:
    raw = windows.get(user_id)
    return WindowState.model_validate(raw) if raw else None


@app.task
async def rationale_workers() -> None:
    await runtime.models_ready.wait()
    await asyncio.gather(*(_loop() for _ in range(runtime.settings.student.concurrency)), _sweeper())


class _Backoff:
    """Consecutive failed rationale batches (student or store) -> how long their users wait before they are
    asked again: ``retry_base_s`` doubling per failure up to ``retry_max_s``; one success resets it."""

    def __init__(self) -> None:
        self.failures = 0

    def failed(self, users: Sequence[str]) -> float:
        s = runtime.settings.student
        self.failures += 1
        delay = min(s.retry_base_s * 2 ** (self.failures - 1), s.retry_max_s)
        # Back to the backlog later, not now: the users keep their fast-path answers meanwhile, and the other
        # users' requests (already in the backlog) go first.
        asyncio.get_running_loop().call_later(delay, _ask_again, list(users))
        runtime.metrics["rationale_retries_scheduled"] += len(users)
        return delay

    def succeeded(self) -> None:
        self.failures = 0


def _ask_again(users: list[str]) -> None:
    for user_id in users:
        if windows.get(user_id):  # not forgotten meanwhile
            runtime.backlog.request(user_id)


backoff = _Backoff()


async def _loop() -> None:
    s = runtime.settings
    while True:
        users = await runtime.backlog.take_batch(s.student.batch_size, s.student.batch_wait_s)
        try:
            await _serve(users)
        except Exception:  # the loop must outlive any one batch (the vector store may be unreachable)
            runtime.metrics["rationale_errors"] += 1
            delay = backoff.failed(users)
            log.exception("rationale batch for %d users failed; they keep the fast path and are asked again "
                          "in %.1fs", len(users), delay)


async def _serve(users: Sequence[str]) -> None:
    owned = owned_partitions()
    states = []
    for user_id in users:
        state = _current_state(user_id)
        if state is None:  # forgotten meanwhile (a request is made only once the window is in the table)
            runtime.metrics["rationale_requests_without_window"] += 1
            continue
        if state.partition not in owned:
            runtime.metrics["rationale_requests_not_owned"] += 1
            continue
        states.append(state)
    todo = await _without_current_rationale(states)
    runtime.metrics["rationale_requests_already_done"] += len(states) - len(todo)
    if todo:
        await _rationalise(todo)


async def _without_current_rationale(states: Sequence[WindowState]) -> list[WindowState]:
    """Those ``states`` whose stored rationale is older than the window (or missing): one store lookup."""
    if not states:
        return []
    stale = set(await _stale_users({st.user_id: st.key for st in states}))
    return [st for st in states if st.user_id in stale]


async def _stale_users(keys: dict[str, tuple[int, int]]) -> list[str]:
    """Those users whose stored rationale is older than their window's key (or missing): one store lookup."""
    store = runtime.store
    assert store is not None
    stored = await runtime.in_store(store.rationale_keys, list(keys))
    return [user_id for user_id, key in keys.items() if stored.get(user_id, (-1, -1)) < key]


async def _rationalise(states: list[WindowState]) -> None:
    """One student call per student in use: with an A/B experiment each user's arm picks it."""
    groups: dict[int, tuple[StudentBackend | None, list[WindowState]]] = {}
    for st in states:
        student = runtime.student_for(runtime.arm(st.user_id))
        groups.setdefault(id(student), (student, []))[1].append(st)
    for student, group in groups.values():
        await _rationalise_on(group, student)


async def _rationalise_on(states: list[WindowState], student: StudentBackend | None) -> None:
    s = runtime.settings
    store = runtime.store
    assert store is not None
    meta = await runtime.in_store(store.get_items, list(dict.fromkeys(i for st in states for i in st.item_ids)))
    prompts = [build_slim_messages([prompt_item(i.item_id, meta.get(i.item_id), event_type=i.event_type, value=i.value)
                                    for i in st.items], s.student.prompt_max_items)
               for st in states]
    # The student this batch runs on and is attributed to: a hot swap may replace runtime.student meanwhile.
    assert student is not None
    t0 = time.monotonic()
    try:
        texts = await runtime.generate(prompts, student)
    except (DeadlineExceeded, StudentError) as exc:
        # The fast path already served these users; they are asked again after a backoff (or sooner, by
        # their next event), and the backlog's other users go first.
        if isinstance(exc, StudentError):
            runtime.metrics["student_errors"] += 1
        delay = backoff.failed([st.user_id for st in states])
        log.warning("%s; users %s keep their previous rationale, asked again in %.1fs", exc,
                    [st.user_id for st in states], delay)
        return
    backoff.succeeded()
    runtime.metrics["student_calls"] += 1
    runtime.metrics["rationales_generated"] += len(texts)
    elapsed = time.monotonic() - t0
    runtime.latency["student_batch_s"].append(elapsed)
    runtime.telemetry.student_batch.observe(elapsed)
    log.info("student wrote %d rationales in %.1fs (backlog: %d users)", len(texts), elapsed, len(runtime.backlog))
    # Whatever the backend (a remote server may answer with anything), the text that is embedded, stored and
    # published is the three steps, without chat markers or controls, and at most rationale_max_chars long.
    rationales = [sanitize_generated_text(postprocess_rationale(t), s.student.rationale_max_chars) for t in texts]
    vectors = await runtime.encode(rationales)
    fresh = {}
    for state, text, vec in zip(states, rationales, vectors):
        if not window_alive(state):
            runtime.metrics["rationales_forgotten"] += 1  # the user was forgotten while the student wrote
            continue
        payload = {
            "user_id": state.user_id,
            "rationale": text,
            "window_version": state.version,
            "window_epoch": state.epoch,
            "model_version": student.model_version,
            "timestamp": time.time(),
            "last_event_timestamp": state.last_event_timestamp,
        }
        if not await runtime.in_store(store.upsert_rationale, state.user_id, vec, payload):
            runtime.metrics["rationales_stale"] += 1  # a newer window's rationale is already stored
            continue
        runtime.observe_rationale(vec)
        fresh[state.user_id] = (vec, payload)
    # Recommend for the newest windows: they may have moved on while the student was thinking, in which case
    # the message says the rationale is not current (and the user is already back in the backlog).
    current = [cur for cur in (_current_state(st.user_id) for st in states if st.user_id in fresh) if cur]
    await publish_recommendations(runtime, recommendations_topic,
                                  await build_recommendations(runtime, current, RecommendationPath.slow, fresh))


async def _sweeper() -> None:
    """Sweep once per assignment (consumer generation and owned partitions), after its table recovery
    completed. Requests taken while a rebalance left this worker without partitions were dropped as not owned;
    the sweep after it asks for them again."""
    swept: tuple[int, frozenset[int]] | None = None
    while True:
        await asyncio.sleep(SWEEP_POLL_S)
        owned = frozenset(owned_partitions())
        assignment = (app.consumer_generation_id, owned)
        if assignment == swept or not owned or not app.tables.recovery.completed.is_set():
            continue
        swept = assignment
        try:
            asked = await sweep()
        except Exception:
            runtime.metrics["rationale_sweep_errors"] += 1
            log.exception("rationale sweep failed")
            continue
        log.info("rationale sweep (generation %s, partitions %s): %d users without a current rationale asked again",
                 assignment[0], sorted(owned), asked)


async def sweep() -> int:
    """Ask again for every owned user whose stored rationale is older than their window (or missing).

    Reads only the fields it compares from each raw window (no model validation: at 100,000 users validating
    every window up front held the loop for 16 s right after recovery), and gives the loop back after every
    chunk: the sweep runs beside the window agent, never in front of it."""
    owned = owned_partitions()
    # The keys first (a snapshot: the agent adds users meanwhile), then the values a chunk at a time (RocksDB
    # decodes each value when it is read).
    users = list(windows.keys())
    asked = 0
    for start in range(0, len(users), SWEEP_CHUNK):
        raws = [windows.get(u) for u in users[start:start + SWEEP_CHUNK]]
        keys = {raw["user_id"]: (int(raw.get("epoch", 0)), int(raw.get("version", 0)))
                for raw in raws if raw and raw.get("partition", -1) in owned}
        for user_id in await _stale_users(keys) if keys else ():
            runtime.backlog.request(user_id)
            asked += 1
        await asyncio.sleep(0)
    runtime.metrics["rationale_sweep_requests"] += asked
    return asked
