"""Window agent: validate each interaction, update the user's behaviour window, and trigger both paths.

At-least-once: offsets are committed after an event is handled, so after a crash some events come
again. :func:`streams.window.is_duplicate` recognises them by (partition, offset) and event_id, so a
replay never appends twice; the newest replayed event re-sends its rationale request and fast-path
recommendation, which are idempotent downstream.
"""

from __future__ import annotations

import logging
import time

from agents.recommend import build_recommendation
from agents.state import runtime
from streams.app import app, dead_letter_topic, interactions_topic, rationale_requests_topic, recommendations_topic, windows
from streams.events import DeadLetter, InvalidEvent, RationaleRequest, RecommendationPath, parse_event
from streams.window import WindowState, apply_event, is_duplicate

log = logging.getLogger(__name__)


@app.agent(interactions_topic)
async def window_agent(stream):  # type: ignore[no-untyped-def]
    s = runtime.settings
    await runtime.store_ready.wait()
    async for event in stream.events():
        msg = event.message
        runtime.metrics["events_in"] += 1
        try:
            ev = parse_event(event.value, s.max_event_bytes)
        except InvalidEvent as exc:
            runtime.metrics["dead_letters"] += 1
            await dead_letter_topic.send(
                key=msg.key,
                value=DeadLetter.for_record(event.value or b"", str(exc), msg.topic, msg.partition, msg.offset)
                .model_dump_json().encode(),
            )
            continue

        key = msg.key.decode("utf-8", "replace") if isinstance(msg.key, bytes) else msg.key
        if key != ev.user_id:
            # The window table is partitioned by user_id; an event under another key (or none) sits on the
            # wrong partition. Re-publish it under its user_id instead of losing or misfiling it.
            runtime.metrics["rekeyed"] += 1
            await interactions_topic.send(key=ev.user_id.encode(), value=event.value)
            continue

        raw = windows.get(ev.user_id)
        state = WindowState.model_validate(raw) if raw else None
        if is_duplicate(state, ev, msg.partition, msg.offset):
            runtime.metrics["duplicates"] += 1
            if state is None or not (msg.partition == state.partition and msg.offset == state.offset):
                continue
            # The newest applied event came again: its follow-ups may not have gone out before a crash.
        else:
            state = apply_event(state, ev, msg.partition, msg.offset, s.window_size, s.recent_event_ids,
                                epoch=time.time_ns() // 1_000_000)
            windows[ev.user_id] = state.model_dump(mode="json")
            runtime.metrics["events_applied"] += 1
            # Drift: judged against the user's last recommendation, before this event's own goes out.
            runtime.observe_event(ev.user_id, ev.item_id, await runtime.item_genres(ev.item_id))

        await rationale_requests_topic.send(
            key=ev.user_id.encode(),
            value=RationaleRequest(user_id=ev.user_id, window_version=state.version).model_dump_json().encode(),
        )
        runtime.metrics["rationale_requests"] += 1
        rec = await build_recommendation(runtime, state, RecommendationPath.fast)
        await recommendations_topic.send(key=ev.user_id.encode(), value=rec.model_dump_json().encode())
        runtime.observe_recommendation(rec)
        runtime.metrics["recommendations_fast"] += 1
