"""Rationale agent: coalesced, batched, deadline-bound student calls -> Qdrant -> slow-path recommendation.

Requests arrive on ``rationale-requests`` (keyed and partitioned like the windows table, so the table
is local here). A request whose window version is no longer the newest is dropped: the newer request
is already queued behind it, so a burst of events for one user costs one student call for the newest
window, not one per event. Requests are taken in batches so one model call serves several users.
"""

from __future__ import annotations

import logging
import time

from agents.recommend import build_recommendation
from agents.runtime import DeadlineExceeded
from agents.state import runtime
from models.prompts import PromptItem, build_slim_messages
from models.student import StudentError, postprocess_rationale
from streams.app import app, rationale_requests_topic, recommendations_topic, windows
from streams.events import RationaleRequest, RecommendationPath
from streams.window import WindowState
from vectorstore.store import rationale_key

log = logging.getLogger(__name__)


def _current_state(user_id: str) -> WindowState | None:
    raw = windows.get(user_id)
    return WindowState.model_validate(raw) if raw else None


@app.agent(rationale_requests_topic)
async def rationale_agent(stream):  # type: ignore[no-untyped-def]
    s = runtime.settings
    await runtime.models_ready.wait()
    async for values in stream.take(s.student_batch_size, within=s.student_batch_wait_s):
        newest: dict[str, int] = {}
        for value in values:
            try:
                req = RationaleRequest.model_validate_json(value)
            except ValueError:
                log.error("dropping unreadable rationale request %r", value[:200])
                continue
            newest[req.user_id] = max(newest.get(req.user_id, -1), req.window_version)
        todo: list[WindowState] = []
        for user_id, version in newest.items():
            state = _current_state(user_id)
            if state is None or state.version != version:
                runtime.metrics["rationale_requests_coalesced"] += 1
                continue
            existing = await runtime.in_store(runtime.store.get_rationale, user_id)  # type: ignore[union-attr]
            if existing is not None and rationale_key(existing[1]) >= (state.epoch, version):
                runtime.metrics["rationale_requests_already_done"] += 1  # a replayed request
                continue
            todo.append(state)
        runtime.metrics["rationale_requests_coalesced"] += len(values) - len(newest)
        if todo:
            await _rationalise(todo)


async def _rationalise(states: list[WindowState]) -> None:
    s = runtime.settings
    store = runtime.store
    assert store is not None
    prompts = []
    for state in states:
        meta = await runtime.in_store(store.get_items, state.item_ids)
        prompts.append(build_slim_messages([_prompt_item(i, meta.get(i.item_id)) for i in state.items],
                                           s.prompt_max_items))
    # The student this batch runs on and is attributed to: a hot swap may replace runtime.student meanwhile.
    student = runtime.student
    assert student is not None
    t0 = time.monotonic()
    try:
        texts = await runtime.generate(prompts, student)
    except (DeadlineExceeded, StudentError) as exc:
        # The fast path already served these users; their next event asks again.
        if isinstance(exc, StudentError):
            runtime.metrics["student_errors"] += 1
        log.warning("%s; users %s keep their previous rationale", exc, [st.user_id for st in states])
        return
    runtime.metrics["student_calls"] += 1
    runtime.metrics["rationales_generated"] += len(texts)
    log.info("student wrote %d rationales in %.1fs", len(texts), time.monotonic() - t0)
    rationales = [postprocess_rationale(t) for t in texts]
    vectors = await runtime.encode(rationales)
    for state, text, vec in zip(states, rationales, vectors):
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
        # Recommend for the newest window: it may have moved on while the student was thinking, in which
        # case the message says the rationale is not current.
        current = _current_state(state.user_id) or state
        rec = await build_recommendation(runtime, current, RecommendationPath.slow, (vec, payload))
        await recommendations_topic.send(key=state.user_id.encode(), value=rec.model_dump_json().encode())
        runtime.observe_recommendation(rec)
        runtime.metrics["recommendations_slow"] += 1


def _prompt_item(item, meta: dict | None) -> PromptItem:  # type: ignore[no-untyped-def]
    meta = meta or {}
    return PromptItem(
        title=meta.get("title") or item.item_id,
        year=meta.get("year"),
        genres=tuple(meta.get("genres") or ()),
        event_type=item.event_type,
        value=item.value,
    )
