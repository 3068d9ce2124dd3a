"""Forget a user: the control record, the files and caches on disk, the ledger, the retrain reads, Qdrant,
and (slow) a running worker: window tombstoned in the changelog, rationale point gone, recommendation
tombstone, nothing back after a restart, the other users untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.openai_client import ResponseCache
from retrain.dataset import RationaleRecord, write_records
from retrain.forget import ForgetLedger, forget_hash, scrub_files
from retrain.recent import RETRAIN_STATE, RetrainState, load_recent_from_dataset, load_recent_from_kafka
from streams.broker import EmbeddedBroker
from streams.events import EventLimits, ForgetUser, InteractionEvent, InvalidEvent, parse_record
from streams.settings import Settings
from tests.conftest import ROOT, run
from tests.kafka_io import event, publish
from vectorstore.store import VectorStore, user_point_id

LIMITS = EventLimits(time_mode="replay")


def _forget(user: str) -> bytes:
    return ForgetUser(control="forget", user_id=user, requested_at=1.0).model_dump_json().encode()


# ---- the control record -----------------------------------------------------------------------------------

def test_a_forget_record_parses_and_a_bad_one_is_refused_with_its_reason() -> None:
    assert parse_record(_forget("u1"), LIMITS) == ForgetUser(control="forget", user_id="u1", requested_at=1.0)
    with pytest.raises(InvalidEvent, match="invalid control record: control"):
        parse_record(b'{"control": "nuke", "user_id": "u1"}', LIMITS)
    with pytest.raises(InvalidEvent, match="invalid control record: user_id"):
        parse_record(b'{"control": "forget"}', LIMITS)
    with pytest.raises(InvalidEvent, match="invalid control record"):
        parse_record(b'{"control": "forget", "user_id": "u1", "item_id": "x"}', LIMITS)  # no extras
    # An item called "control" is an interaction, not a control record; broken JSON keeps its own reason.
    ev = parse_record(b'{"user_id": "u1", "item_id": "control", "event_type": "view", "timestamp": 5}', LIMITS)
    assert isinstance(ev, InteractionEvent) and ev.item_id == "control"
    with pytest.raises(InvalidEvent, match="malformed JSON"):
        parse_record(b'{"control": "forget", ', LIMITS)


# ---- files, caches and the ledger ---------------------------------------------------------------------------

def _record(user: str, n: int) -> RationaleRecord:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": f"history of {user} #{n}"}]
    return RationaleRecord(user_id=user, window=[f"i{n}"], messages=messages, rationale=f"Step 1: {user} likes {n}.",
                           teacher="t", prompt_version="p", dataset_version="d")


def test_scrub_removes_every_record_of_the_user_and_their_cached_answers_only(tmp_path: Path) -> None:
    settings = Settings.from_env(data={"data_dir": tmp_path / "data", "registry_dir": tmp_path / "reg"})
    write_records(tmp_path / "data" / "rationales" / "a.jsonl", [_record("u1", 1), _record("u2", 2), _record("u1", 3)])
    write_records(tmp_path / "reg" / "data" / "v0001.jsonl", [_record("u1", 4), _record("u3", 5)])
    write_records(tmp_path / "reg" / "data" / "v0001.train.jsonl", [_record("u1", 4)])
    (tmp_path / "data" / "rationales" / "b.jsonl").write_text('{"user_id": "u10"}\n')  # a prefix is not a match
    cache = ResponseCache(tmp_path / "data" / "teacher-cache")
    for n, user in ((1, "u1"), (2, "u2"), (4, "u1")):
        cache.put(f"k{n}", "m", {"model": "m", "messages": _record(user, n).messages, "n": 3}, {"texts": ["x"]})
    cache.close()

    report = scrub_files(settings, "u1")
    assert report.records == 4 and len(report.files) == 3 and report.cache_rows == 2
    remaining = [json.loads(line) for p in sorted((tmp_path).rglob("*.jsonl")) for line in p.read_text().splitlines()]
    assert sorted(r["user_id"] for r in remaining) == ["u10", "u2", "u3"]
    cache = ResponseCache(tmp_path / "data" / "teacher-cache")
    assert len(cache) == 1 and cache.get("k2") is not None and cache.get("k1") is None
    cache.close()
    assert scrub_files(settings, "u1").records == 0  # idempotent


def test_the_ledger_keeps_a_hash_and_later_dataset_reads_skip_the_user(tmp_path: Path) -> None:
    ledger = ForgetLedger(tmp_path / "forgotten.jsonl")
    assert "u1" not in ledger
    ledger.add("u1")
    assert "u1" in ledger and "u2" not in ledger
    assert "u1" not in ledger.path.read_text() and forget_hash("u1") in ledger.path.read_text()

    data = tmp_path / "d"
    data.mkdir()
    (data / "items.csv").write_text("item_id,title,genres\n" + "".join(f"c{n},Film {n},Drama\n" for n in range(12)))
    (data / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n" + "".join(
        f"u{n % 3},c{n},{1000 + n},4\n" for n in range(12)))
    state = RetrainState(tmp_path / "reg" / RETRAIN_STATE)
    recent = load_recent_from_dataset(str(data), state, 100, ledger)
    assert {e.user_id for e in recent.events} == {"u0", "u2"} and len(recent.events) == 8
    assert len(load_recent_from_dataset(str(data), state, 100).events) == 12  # control: without the ledger


def test_a_retrain_read_of_the_topic_drops_the_events_before_a_forget_and_keeps_those_after(
        broker: EmbeddedBroker) -> None:
    topic = "interactions-forget-test"
    records = [event("u1", "a", 1000), event("u2", "b", 1001), event("u1", "c", 1002),
               (b"u1", _forget("u1")), event("u1", "d", 1003), event("u2", "e", 1004),
               event("u2", "control", 1005)]  # an item called "control" is an event, not a control record
    run(publish(broker.bootstrap_servers, topic, records))
    settings = Settings.from_env(kafka={"bootstrap_servers": broker.bootstrap_servers, "topic_interactions": topic})
    recent = run(load_recent_from_kafka(settings, RetrainState(Path("/nonexistent") / RETRAIN_STATE), 100))
    assert sorted((e.user_id, e.item_id) for e in recent.events) == [("u1", "d"), ("u2", "b"), ("u2", "control"),
                                                                     ("u2", "e")]
    assert recent.window.forgotten_users == 1 and recent.window.invalid == 0
    assert recent.forgotten == ["u1"]


def test_a_retrain_cycle_that_reads_a_forget_record_takes_the_user_off_the_disk(tmp_path: Path) -> None:
    """DELETE /v1/users/... only sends the control record: the retrain job, which owns the datasets, does the
    files' part when its read meets the record (and skips a user slimstream forget already handled)."""
    from retrain.job import _forget_on_disk

    settings = Settings.from_env(data={"data_dir": tmp_path / "data", "registry_dir": tmp_path / "reg"})
    write_records(tmp_path / "data" / "rationales" / "a.jsonl", [_record("u1", 1), _record("u2", 2)])
    _forget_on_disk(settings, ["u1"])
    left = (tmp_path / "data" / "rationales" / "a.jsonl").read_text()
    assert '"u1"' not in left and '"u2"' in left
    assert "u1" in ForgetLedger.for_settings(settings) and "u2" not in ForgetLedger.for_settings(settings)
    lines = ForgetLedger.for_settings(settings).path.read_text().splitlines()
    _forget_on_disk(settings, ["u1"])  # already in the ledger: not added twice
    assert ForgetLedger.for_settings(settings).path.read_text().splitlines() == lines


def test_the_store_deletes_every_rationale_point_of_the_user(tmp_path: Path) -> None:
    settings = Settings.from_env(data={"data_dir": tmp_path}, qdrant={"path": str(tmp_path / "q"), "url": None})
    store = VectorStore(settings)
    try:
        store.ensure_collections(4)
        for user in ("u1", "u2"):
            store.upsert_rationale(user, np.ones(4), {"user_id": user, "rationale": "r", "window_version": 1,
                                                      "window_epoch": 1, "model_version": "m", "timestamp": 0.0})
        assert store.delete_rationales("u1") == 1
        assert store.get_rationale("u1") is None and store.get_rationale("u2") is not None
        assert store.delete_rationales("u1") == 0
        assert user_point_id("u1") != user_point_id("u2")
    finally:
        store.close()


def test_cli_forget_refuses_a_bad_id_in_one_line() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli", "forget", "bad\nid", "--no-publish"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "USER_ID" in proc.stderr


# ---- a running worker ------------------------------------------------------------------------------------

def _last_by_key(records: list) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for r in records:
        key = r.key.decode()
        out[json.loads(key) if key.startswith('"') else key] = r.value  # changelog keys are Faust JSON
    return out


@pytest.mark.slow
def test_a_forget_record_leaves_nothing_of_the_user_in_the_stream_and_on_disk(
        tmp_path: Path, data_dir: Path, indexed_qdrant: Path) -> None:
    from streams.topics import WINDOWS_TABLE
    from tests.conftest import WorkerProcess, private_data_dir, worker_env
    from tests.kafka_io import read_until

    S = Settings.from_env()
    gone, kept = "forget-me-1", "keep-me-2"
    own = private_data_dir(data_dir, tmp_path / "data")
    (own / "planted").mkdir(exist_ok=True)
    write_records(own / "planted" / "planted.jsonl", [_record(gone, 1), _record(kept, 2)])
    with EmbeddedBroker() as broker:
        env = worker_env(broker, own, indexed_qdrant)
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            records = [event(u, item, 1_000_000 + n, event_id=f"{u}-{n}") for n, (u, item) in enumerate(
                [(gone, "Toy Story (1995)"), (kept, "Heat (1995)"), (gone, "Babe (1995)"), (kept, "Casino (1995)")])]
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, records))

            def explained(rs: list) -> bool:  # both users have a stored rationale for their last window
                slow = {json.loads(r.value)["user_id"] for r in rs
                        if r.value and json.loads(r.value)["path"] == "slow" and json.loads(r.value)["rationale_current"]}
                return {gone, kept} <= slow
            assert explained(run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations, explained, 240))), \
                worker.log_tail()
            kept_window = worker.get(f"/window/{kept}/")

            proc = subprocess.run([sys.executable, "-m", "cli", "forget", gone], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "1 dataset record(s)" in proc.stdout, proc.stdout
            worker.wait_until(lambda h: worker.metrics().get("users_forgotten", 0) >= 1, 60)
            assert worker.get_or_none(f"/window/{gone}/") is None
            assert worker.get(f"/window/{kept}/") == kept_window

            changelog = S.kafka.changelog_topic(WINDOWS_TABLE)
            last = _last_by_key(run(read_until(broker.bootstrap_servers, changelog,
                                               lambda rs: _last_by_key(rs).get(gone, b"") is None, 30)))
            assert last[gone] is None and last[kept] is not None  # a tombstone, the other user's window kept
            recs = _last_by_key(run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations,
                                               lambda rs: _last_by_key(rs).get(gone, b"") is None, 30)))
            assert recs[gone] is None and recs[kept] is not None

            # A restart recovers the changelog: the tombstone keeps the user out.
            assert worker.stop() == 0, worker.log_tail()
            worker.start()
            assert worker.get_or_none(f"/window/{gone}/") is None
            assert worker.get(f"/window/{kept}/") == kept_window
            # Coming back after the forget starts a new window from nothing.
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions,
                        [event(gone, "Heat (1995)", 2_000_000, event_id="again")]))
            back = worker.wait_until(lambda h: worker.get_or_none(f"/window/{gone}/") is not None, 60) and \
                worker.get(f"/window/{gone}/")
            assert back["version"] == 1 and [i["item_id"] for i in back["items"]] == ["Heat (1995)"]
        finally:
            worker.stop()

    store = VectorStore(Settings.from_env(data={"data_dir": own}, qdrant={"path": str(indexed_qdrant), "url": None}))
    try:
        points = {p["user_id"]: p for p in store.rationale_points()}
    finally:
        store.close()
    assert kept in points
    # Either no point, or only the new lineage's (the event after the forget may have been explained already).
    assert gone not in points or points[gone]["window_epoch"] == back["epoch"]
    lines = (own / "planted" / "planted.jsonl").read_text().splitlines()
    assert [json.loads(line)["user_id"] for line in lines] == [kept]
    assert gone in ForgetLedger(own / "forgotten.jsonl")
