"""Input validation is total: whatever bytes arrive, the answer is a valid event or an InvalidEvent with a reason,
and what the worker builds from an accepted event always serialises to valid JSON that its own schema accepts."""

from __future__ import annotations

import base64
import hashlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.events import (
    DEAD_LETTER_MAX_KEY_BYTES,
    DEAD_LETTER_MAX_RAW_BYTES,
    MAX_TIMESTAMP,
    DeadLetter,
    EventLimits,
    InteractionEvent,
    InvalidEvent,
    Recommendation,
    dead_letter_key,
    parse_event,
)
from streams.window import WindowState, apply_event
from tests.hostile import KINDS, hostile_corpus

REPLAY = EventLimits(16_384, time_mode="replay")
NOW = 1_796_000_000.0  # a fixed "now" (2026-11) for the live-mode window


def accepted_invariants(ev: InteractionEvent) -> None:
    """What every accepted event guarantees to the code after the door."""
    for text in (ev.user_id, ev.item_id, ev.event_type, *(() if ev.event_id is None else (ev.event_id,))):
        assert text.strip() and text.isprintable()
    assert math.isfinite(ev.timestamp) and 0 <= ev.timestamp <= MAX_TIMESTAMP
    assert ev.value is None or math.isfinite(ev.value)
    state = apply_event(None, ev, 0, 0, window_size=20, keep_event_ids=8, epoch=1)
    # allow_nan=False: what the worker stores and serves is strict JSON
    assert WindowState.model_validate(json.loads(json.dumps(state.model_dump(mode="json"), allow_nan=False))) == state
    rec = Recommendation(user_id=ev.user_id, items=[], rationale="", rationale_current=False,
                         window_version=state.version, last_event_timestamp=state.last_event_timestamp, path="fast")
    assert Recommendation.model_validate_json(rec.model_dump_json()) == rec


def check_total(value: bytes | None, limits: EventLimits = REPLAY) -> InteractionEvent | None:
    try:
        ev = parse_event(value, limits, now=NOW)
    except InvalidEvent as exc:
        assert str(exc), "a rejection always says why"
        return None
    accepted_invariants(ev)
    return ev


# --- the hostile corpus -----------------------------------------------------------------------------------
def test_hostile_corpus_covers_every_kind_and_each_is_rejected_with_its_reason() -> None:
    corpus = hostile_corpus(10_000)
    assert len(corpus) == 10_000 and {r.kind for r in corpus} == set(KINDS) and len(KINDS) >= 40
    for rec in corpus:
        with pytest.raises(InvalidEvent) as info:
            parse_event(rec.value, REPLAY)
        assert rec.reason in str(info.value), (rec.kind, str(info.value)[:300])


def test_dead_letters_always_fit_and_identify_the_original() -> None:
    for rec in hostile_corpus(500):
        value = rec.value or b""
        letter = DeadLetter.for_record(value, "reason " * 1000, "interactions", 3, 17)
        data = letter.model_dump_json().encode()
        assert len(data) < 200_000  # far below any broker's message size limit
        assert letter.raw_size == len(value) and letter.raw_sha256 == hashlib.sha256(value).hexdigest()
        if len(value) > DEAD_LETTER_MAX_RAW_BYTES:
            assert letter.raw is None and letter.raw_truncated
        else:
            assert base64.b64decode(letter.raw or "") == value and not letter.raw_truncated
        assert len(letter.error) <= 1_003
        assert DeadLetter.model_validate_json(data) == letter
        key = dead_letter_key(rec.key)
        assert key is None or len(key) <= DEAD_LETTER_MAX_KEY_BYTES
        if rec.key is not None and len(rec.key) <= DEAD_LETTER_MAX_KEY_BYTES:
            assert key == rec.key


# --- the time window ----------------------------------------------------------------------------------------
def _at(ts: float) -> bytes:
    return json.dumps({"user_id": "u", "item_id": "i", "event_type": "view", "timestamp": ts}).encode()


def test_live_mode_admits_a_window_around_now_and_says_how_to_replay_history() -> None:
    live = EventLimits(16_384, time_mode="live", max_age_s=86_400, max_future_s=300)
    assert parse_event(_at(NOW - 3600), live, now=NOW).timestamp == NOW - 3600
    assert parse_event(_at(NOW + 200), live, now=NOW)
    with pytest.raises(InvalidEvent, match="SLIMSTREAM_EVENT_TIME_MODE=replay"):
        parse_event(_at(978300760), live, now=NOW)  # MovieLens, 2001
    with pytest.raises(InvalidEvent, match="future"):
        parse_event(_at(NOW + 301), live, now=NOW)
    # replay mode: history is fine, the future still is not
    replay = EventLimits(16_384, time_mode="replay", min_timestamp=1e8)
    assert parse_event(_at(978300760), replay, now=NOW)
    with pytest.raises(InvalidEvent, match="future"):
        parse_event(_at(NOW + 301), replay, now=NOW)
    with pytest.raises(InvalidEvent, match="SLIMSTREAM_EVENT_MIN_TIMESTAMP"):
        parse_event(_at(5.0), replay, now=NOW)


# --- property tests ------------------------------------------------------------------------------------------
@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_give_an_event_or_a_reason(value: bytes) -> None:
    check_total(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
FIELDS = ("user_id", "item_id", "event_type", "value", "timestamp", "event_id")


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), json_values, max_size=8))
def test_any_json_object_gives_an_event_or_a_reason(body: dict) -> None:
    check_total(json.dumps(body, allow_nan=True).encode())


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(["[", "{\"a\":"]))
def test_nesting_of_any_depth_is_an_answer_not_a_crash(depth: int, opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    body = '{"user_id":"u","item_id":"i","event_type":"view","timestamp":1,"x":' + opener * depth + "1" \
        * (opener != "[") + closer * depth + "}"
    check_total(body.encode(), EventLimits(1_000_000, time_mode="replay"))


ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)


@settings(max_examples=400, deadline=None)
@given(ids, ids, ids, st.floats(0, NOW), st.none() | st.floats(-1e6, 1e6), st.none() | ids)
def test_valid_events_are_accepted_exactly_when_their_text_is_printable(
        user: str, item: str, etype: str, ts: float, value: float | None, event_id: str | None) -> None:
    body = {"user_id": user, "item_id": item, "event_type": etype, "timestamp": ts, "value": value,
            "event_id": event_id}
    ev = check_total(json.dumps(body).encode(), EventLimits(16_384, time_mode="replay"))
    texts = [user, item, etype.strip().lower(), *(() if event_id is None else (event_id,))]
    printable = all(t.strip() and t.isprintable() for t in texts) and len(etype) <= 32
    assert (ev is not None) == printable, (body, ev)
    if ev is not None:
        assert (ev.user_id, ev.item_id, ev.timestamp, ev.value) == (user, item, ts, value)
