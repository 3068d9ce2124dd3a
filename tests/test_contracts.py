"""Event contracts, the window transition, the ranker blend and the CLI's argument errors: no broker needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streams.events import SCHEMA_MODELS, EventLimits, InteractionEvent, InvalidEvent, parse_event
from streams.window import apply_event, is_duplicate
from models.rankers import blend_query, recent_items_vector

ROOT = Path(__file__).resolve().parents[1]


def ev(item: str, ts: float = 1.0, event_id: str | None = None) -> InteractionEvent:
    return InteractionEvent(user_id="u", item_id=item, event_type="view", timestamp=ts, event_id=event_id)


def test_parse_event_accepts_a_valid_event_and_normalises_type() -> None:
    e = parse_event(b'{"user_id":"1m_1","item_id":"Toy Story (1995)","event_type":"Rating","value":5,'
                    b'"timestamp":978300760,"extra":"ignored"}', EventLimits(10_000, time_mode="replay"))
    assert (e.user_id, e.item_id, e.event_type, e.value) == ("1m_1", "Toy Story (1995)", "rating", 5.0)


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"user_id":"u","event_type":"view","timestamp":1}', "item_id: Field required"),
    (b'{"user_id":1,"item_id":"i","event_type":"view","timestamp":1}', "user_id: Input should be a valid string"),
    (b'{"user_id":"u","item_id":"i","event_type":"view","timestamp":-5}', "timestamp"),
    (b'{"user_id":"","item_id":"i","event_type":"view","timestamp":1}', "user_id"),
    (b"\xff\xfe", "malformed JSON"),
])
def test_parse_event_rejects_with_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent, match=None) as info:
        parse_event(raw, EventLimits(10_000, time_mode="replay"))
    assert reason in str(info.value)


def test_parse_event_rejects_oversized_payload_before_parsing() -> None:
    with pytest.raises(InvalidEvent, match="too large"):
        parse_event(b"{" + b" " * 500 + b"}", EventLimits(256))


def test_window_keeps_last_n_moves_repeats_and_counts_versions() -> None:
    s = None
    for k, item in enumerate(["a", "b", "c", "b", "d"]):
        s = apply_event(s, ev(item, ts=float(k)), partition=0, offset=k, window_size=3, keep_event_ids=8,
                        epoch=1000 + k)
    assert s is not None
    assert s.item_ids == ["c", "b", "d"] and s.version == 5 and s.last_event_timestamp == 4.0
    assert s.epoch == 1000  # set when the lineage began, kept by every later event


def test_duplicates_by_offset_and_event_id() -> None:
    s = apply_event(None, ev("a", event_id="e1"), 2, 10, 5, 8)
    assert is_duplicate(s, ev("a"), 2, 10)  # redelivered offset
    assert is_duplicate(s, ev("a"), 2, 3)
    assert not is_duplicate(s, ev("b"), 2, 11)
    assert is_duplicate(s, ev("x", event_id="e1"), 2, 11)  # same event published twice
    assert not is_duplicate(s, ev("x", event_id="e2"), 2, 11)


def test_blend_query_weights_rationale_against_recent_items() -> None:
    r = np.array([1.0, 0.0], dtype=np.float32)
    vecs = {"a": np.array([0.0, 1.0], dtype=np.float32), "b": np.array([0.6, 0.8], dtype=np.float32)}
    recent = recent_items_vector(["b", "a", "unknown"], vecs, max_items=2, decay=0.5)
    assert recent is not None and np.isclose(np.linalg.norm(recent), 1.0)
    q = blend_query(r, recent, 0.6)
    assert q is not None and np.isclose(np.linalg.norm(q), 1.0)
    assert float(q @ r) > float(recent @ r)
    assert blend_query(None, None, 0.5) is None
    assert np.allclose(blend_query(r, None, 0.3), r)


def test_schema_files_match_the_models() -> None:
    for name, model in SCHEMA_MODELS.items():
        path = ROOT / "streams" / "schemas" / f"{name}.schema.json"
        assert json.loads(path.read_text()) == model.model_json_schema(), f"regenerate: slimstream schemas ({name})"


@pytest.mark.parametrize("args", [
    ["up", "--users", "many"],
    ["up", "--rate", "0"],
    ["no-such-command"],
    ["produce", "/does/not/exist.jsonl"],
    ["worker", "--log-level", "loud"],
    ["tail", "--limit", "0"],
    ["evaluate", "--methods", "popularity,nonsense"],
    ["serve-teacher", "--teacher", "7b"],
    ["distill", "/does/not/exist.jsonl"],
    ["models", "promote", "no-such-version"],
])
def test_bad_cli_argument_is_one_line_and_exit_2(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimstream: error: "), proc.stderr


def test_openapi_file_matches_the_api_models() -> None:
    """docs/openapi.json is generated from agents/api/protocol.py and the event contract: in sync, every
    $ref resolves, and every route the worker registers under /v1 is described."""
    from agents.api.openapi import openapi_document

    doc = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert doc == openapi_document(), "regenerate: slimstream schemas"
    refs = {m for m in json.dumps(doc).split('"#/components/schemas/')[1:]}
    for ref in refs:
        assert ref.split('"')[0] in doc["components"]["schemas"]
    import agents  # noqa: F401  (registers the views)
    from streams.app import app

    routes = {r.canonical for r in app.web.web_app.router.resources() if r.canonical.startswith("/v1/")}
    assert routes == set(doc["paths"])
