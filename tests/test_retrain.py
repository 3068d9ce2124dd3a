"""The retrain loop: the gate, the pieces of a cycle, the `retrain` CLI's arguments, and two real cycles.

The real cycles (slow) read ML-100k events from the interactions topic of a real Tansu broker, ask the real
local teacher server (SmolLM2 behind the OpenAI-compatible API, as in test_rationales.py) for rationales,
continue-train the real student for 2 LoRA steps and evaluate both students on a held-out user. Everything is
tiny (windows of 5 events, 3 users per cycle), so the numbers mean nothing; the mechanics are what is tested:
versions, manifests, the gate, CURRENT, rollback, the stored offsets, replay.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from retrain.context import CycleResult
from retrain.heldout import heldout_metrics
from retrain.job import retrain_once
from retrain.recent import RETRAIN_STATE, RecentEvent, RetrainState, load_recent_from_dataset
from retrain.selection import rank_drifted_users, split_heldout, user_sequences
from retrain.triggers import parse_drift_message, parse_duration, retrain_every
from streams.drift import DriftDecision, FiredSignal
from retrain.gate import GateDecision, gate
from streams.registry import ModelRegistry
from streams.broker import EmbeddedBroker
from streams.datasets import Item, load_interactions
from streams.settings import Settings
from tests.conftest import ROOT

# ---- the gate -------------------------------------------------------------------------------------------


def test_gate_promotes_better_and_equal_and_rejects_worse() -> None:
    better = gate({"ndcg@10": 0.12, "hr@10": 0.3}, {"ndcg@10": 0.10, "hr@10": 0.2})
    assert isinstance(better, GateDecision) and better.promoted and "better" in better.reason
    assert (better.candidate, better.current, better.margin, better.metric) == (0.12, 0.10, 0.0, "ndcg@10")
    equal = gate({"ndcg@10": 0.1}, {"ndcg@10": 0.1})
    assert equal.promoted and "equal" in equal.reason
    worse = gate({"ndcg@10": 0.09}, {"ndcg@10": 0.1})
    assert not worse.promoted and "not promoted" in worse.reason
    assert gate({"NDCG@10": 0.3}, {"ndcg@10": 0.1}).promoted  # metric names compare case-insensitively
    assert not gate({"ndcg@10": 0.3, "hr@10": 0.1}, {"ndcg@10": 0.1, "hr@10": 0.2}, metric="hr@10").promoted


def test_gate_margin_allows_a_small_loss_or_demands_a_gain() -> None:
    assert gate({"ndcg@10": 0.095}, {"ndcg@10": 0.1}, margin=0.01).promoted
    assert "within the margin" in gate({"ndcg@10": 0.095}, {"ndcg@10": 0.1}, margin=0.01).reason
    assert not gate({"ndcg@10": 0.085}, {"ndcg@10": 0.1}, margin=0.01).promoted
    assert not gate({"ndcg@10": 0.105}, {"ndcg@10": 0.1}, margin=-0.01).promoted  # must improve by 0.01
    assert gate({"ndcg@10": 0.11}, {"ndcg@10": 0.1}, margin=-0.01).promoted
    with pytest.raises(ValueError):
        gate({"ndcg@10": 0.1}, {"ndcg@10": 0.1}, margin=float("nan"))


def test_gate_missing_metrics_are_never_promoted() -> None:
    for cand, cur, who in (({}, {"ndcg@10": 0.1}, "candidate"), ({"ndcg@10": 0.1}, None, "current"),
                           ({"ndcg@10": float("nan")}, {"ndcg@10": 0.1}, "candidate"),
                           ({"hr@10": 0.5}, {"hr@10": 0.1}, "candidate and the current")):
        d = gate(cand, cur)
        assert not d.promoted and "missing" in d.reason and who in d.reason, d


# ---- pieces of a cycle ----------------------------------------------------------------------------------


def _catalogue() -> dict[str, Item]:
    cat = {f"c{i}": Item(item_id=f"c{i}", title=f"Comedy {i}", genres=("Comedy",)) for i in range(30)}
    cat.update({f"h{i}": Item(item_id=f"h{i}", title=f"Horror {i}", genres=("Horror",)) for i in range(30)})
    return cat


def test_drifted_users_rank_by_divergence_from_the_reference() -> None:
    cat = _catalogue()
    events = []
    for u, kinds in {"comedy_fan": "c" * 9, "horror_fan": "h" * 9, "mixed": "chchchchc", "short": "hhh"}.items():
        events += [RecentEvent(u, f"{k}{n}", 1000.0 + n, 4.0) for n, k in enumerate(kinds)]
    events.append(RecentEvent("mixed", "not-in-catalogue", 5.0))
    events.append(RecentEvent("mixed", "c0", 2000.0))  # a repeat: kept at its first occurrence
    seqs, unknown = user_sequences(reversed(events), cat)
    assert unknown == 1 and [e.item_id for e in seqs["mixed"].events][:2] == ["c0", "h1"]
    assert [e.timestamp for e in seqs["horror_fan"].events] == sorted(e.timestamp for e in seqs["horror_fan"].events)
    ranked, eligible = rank_drifted_users(seqs, {"Comedy": 0.9, "Horror": 0.1}, 9, cat, max_users=10)
    assert eligible == 3 and [u for u, _ in ranked] == ["horror_fan", "mixed", "comedy_fan"]  # "short" < 9
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] >= 0
    assert [u for u, _ in rank_drifted_users(seqs, {"Comedy": 0.9, "Horror": 0.1}, 9, cat, max_users=1)[0]] == [
        "horror_fan"]


def test_the_latest_events_are_taken_in_arrival_order_per_partition() -> None:
    from retrain.selection import latest_in_stream_order

    # Timestamps run backwards (a replay of old data): arrival order is the offsets'.
    p0 = [RecentEvent("u", f"a{k}", 1000 - k, partition=0, offset=k) for k in range(30)]
    p1 = [RecentEvent("v", f"b{k}", 5000 - k, partition=1, offset=k) for k in range(10)]
    got = latest_in_stream_order(p1 + p0, 8)
    assert sorted(e.item_id for e in got) == sorted([f"a{k}" for k in range(24, 30)] + ["b8", "b9"])
    assert latest_in_stream_order(p0, 100) == p0


def test_heldout_split_is_seeded_and_disjoint() -> None:
    users = [f"u{i}" for i in range(8)]
    train, held = split_heldout(users, 0.25, seed=3)
    assert len(held) == 2 and set(train) | set(held) == set(users) and not set(train) & set(held)
    assert split_heldout(list(reversed(users)), 0.25, seed=3)[1] == sorted(held, reverse=True)  # same users
    assert len(split_heldout(users[:2], 0.9, seed=0)[0]) == 1  # at least one on each side
    with pytest.raises(ValueError):
        split_heldout(["only"], 0.5, seed=0)


def test_heldout_metrics_rank_targets_outside_the_window() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    items[0] = 0
    # The rationale vector is item 7's: item 7 (a target) is first, even though window item 3 is identical.
    items[3] = items[7]
    m = heldout_metrics(items[[7]], items, windows=[[3, 4]], targets=[[7]])
    assert m["ndcg@10"] == pytest.approx(1.0) and m["hr@10"] == 1.0 and m["users"] == 1
    # Two targets: each is ranked without the other one competing.
    items[9] = items[7] * 0.999 + 0.001
    m2 = heldout_metrics(items[[7]], items, windows=[[3]], targets=[[7, 9]])
    assert m2["ndcg@10"] == pytest.approx(1.0) and m2["targets"] == 2
    # An empty rationale (zero vector) ties everything: random-ranking metrics, not a perfect score.
    m3 = heldout_metrics(np.zeros((1, 8)), items, windows=[[3]], targets=[[7]])
    assert 0 < m3["hr@10"] < 0.25


def _write_dataset(path: Path, rows: list[tuple[str, str, int]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    items = sorted({i for _, i, _ in rows})
    (path / "items.csv").write_text("item_id,title,year,genres\n" + "".join(
        f"{i},Film {i},1999,{'Comedy' if i.startswith('c') else 'Horror'}\n" for i in items))
    (path / "interactions.csv").write_text("user_id,item_id,timestamp,rating\n" + "".join(
        f"{u},{i},{t},4\n" for u, i, t in rows))


def test_dataset_source_reads_the_last_events_then_only_new_ones(tmp_path: Path) -> None:
    rows = [(f"u{n % 3}", f"c{n}", 1000 + n) for n in range(30)]
    _write_dataset(tmp_path / "d", rows)
    state = RetrainState(tmp_path / "reg" / RETRAIN_STATE)
    first = load_recent_from_dataset(str(tmp_path / "d"), state, max_events=10)
    assert [e.timestamp for e in first.events] == [float(1020 + n) for n in range(10)]
    assert first.window.offsets == {"0": {"start": 20, "end": 30}} and first.next_offsets == {"0": 30}
    assert (first.window.first_timestamp, first.window.last_timestamp, first.window.events) == (1020.0, 1029.0, 10)
    assert load_recent_from_dataset(str(tmp_path / "d"), state, 10).events == first.events  # nothing stored yet
    state.commit(first, version="v0001", status="promoted")
    saved = json.loads((tmp_path / "reg" / RETRAIN_STATE).read_text())
    entry = next(iter(saved["sources"].values()))
    assert entry["next_offsets"] == {"0": 30} and entry["window"]["offsets"] == {"0": {"start": 20, "end": 30}}
    assert load_recent_from_dataset(str(tmp_path / "d"), state, 10).events == []  # nothing new
    _write_dataset(tmp_path / "d", rows + [("u9", f"h{n}", 2000 + n) for n in range(4)])
    more = load_recent_from_dataset(str(tmp_path / "d"), state, 10)
    assert [(e.user_id, e.item_id) for e in more.events] == [("u9", f"h{n}") for n in range(4)]
    assert more.window.offsets == {"0": {"start": 30, "end": 34}}


def test_drift_messages_parse_as_decisions() -> None:
    decision = DriftDecision(fired=[FiredSignal(signal="genre_js", value=0.3, threshold=0.1, samples=2000)],
                             model_version="m", events_seen=2500)
    assert parse_drift_message(decision.model_dump_json().encode()) == decision
    assert parse_drift_message(json.dumps({"decision": decision.model_dump(mode="json")}).encode()) == decision
    assert parse_drift_message(b'{"other": 1}') == {"other": 1}
    assert parse_drift_message(b"not json") is None


# ---- --every and the CLI's arguments ---------------------------------------------------------------------


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90s", "30m", "1h", "1h30m", "1.5h", "2d", " 45S ")] == [
        90, 1800, 3600, 5400, 5400, 172800, 45]
    for bad in ("", "10", "10x", "m", "0s", "1h-5m", "1 h", "-5m", "h1"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def _retrain_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "retrain", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_bad_arguments_exit_2_in_one_line(tmp_path: Path) -> None:
    for args in (["--every", "10x"], ["--every", "0s"], ["--every", "soon"], ["--max-users", "1"],
                 ["--data", str(tmp_path / "nope")]):
        proc = _retrain_cli(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("slimstream: error:"), proc.stderr


def test_cli_cycle_without_enough_users_is_skipped(tmp_path: Path) -> None:
    _write_dataset(tmp_path / "d", [(f"u{n % 3}", f"c{n}", 1000 + n) for n in range(12)])  # 4 events per user
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env["SLIMSTREAM_DATA_DIR"] = str(tmp_path / "data")
    proc = _retrain_cli("--data", str(tmp_path / "d"), "--registry", str(tmp_path / "reg"), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "skipped:" in proc.stdout and "a cycle needs 2" in proc.stdout
    assert not (tmp_path / "reg" / RETRAIN_STATE).exists()  # skipped: the events are read again next time


def test_a_second_retrain_process_on_the_same_registry_skips_instead_of_racing(tmp_path: Path) -> None:
    from filelock import FileLock

    from retrain.job import RETRAIN_LOCK

    _write_dataset(tmp_path / "d", [(f"u{n % 3}", f"c{n}", 1000 + n) for n in range(12)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env["SLIMSTREAM_DATA_DIR"] = str(tmp_path / "data")
    (tmp_path / "reg").mkdir()
    with FileLock(str(tmp_path / "reg" / RETRAIN_LOCK)):  # the other process, mid-cycle
        proc = _retrain_cli("--data", str(tmp_path / "d"), "--registry", str(tmp_path / "reg"), env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "skipped: another retrain cycle holds" in " ".join(proc.stdout.split())
    # Released: the next run does its cycle (here: skipped for too few users, a different reason).
    proc = _retrain_cli("--data", str(tmp_path / "d"), "--registry", str(tmp_path / "reg"), env=env)
    assert "a cycle needs 2" in proc.stdout and "another retrain" not in proc.stdout


# ---- the real broker ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


async def _publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from tests.kafka_io import publish

    await publish(bootstrap, topic, records)


def _skipped(reason: object) -> CycleResult:
    return CycleResult(status="skipped", reason=f"test: {reason}")


async def test_every_wakes_on_a_drift_decision_and_falls_back_to_the_timer(kafka: EmbeddedBroker) -> None:
    decision = DriftDecision(fired=[FiredSignal(signal="genre_psi", value=0.5, threshold=0.2, samples=2000)],
                             model_version=None, events_seen=3000)
    settings = Settings.from_env(kafka={"bootstrap_servers": kafka.bootstrap_servers, "topic_drift": "drift-test"})
    await _publish(kafka.bootstrap_servers, "drift-test", [(b"drift", b'{"old": true}')])  # creates the topic
    reasons: list[object] = []
    first_done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def cycle(reason: object) -> CycleResult:
        reasons.append(reason)
        loop.call_soon_threadsafe(first_done.set)
        return _skipped(reason)

    task = asyncio.create_task(retrain_every(3600, cycle, settings, max_cycles=2))
    await asyncio.wait_for(first_done.wait(), 30)
    await asyncio.sleep(1.0)  # the first cycle is over and the loop waits on its one-hour timer
    await _publish(kafka.bootstrap_servers, "drift-test", [(b"drift", decision.model_dump_json().encode())])
    await asyncio.wait_for(task, 30)  # woken long before the hour
    assert reasons == [None, decision]  # the old message before the start is not a wake-up

    timer_only: list[object] = []
    no_topic = settings.updated(kafka={"topic_drift": "no-such-drift-topic"})
    await asyncio.wait_for(retrain_every(0.2, lambda r: timer_only.append(r) or _skipped(r), no_topic,
                                         max_cycles=3), 30)
    assert timer_only == [None, None, None]


async def test_the_default_publisher_announces_the_promotion_as_a_model_update(kafka: EmbeddedBroker,
                                                                              tmp_path: Path) -> None:
    from retrain.job import default_publisher
    from streams.events import ModelUpdate
    from tests.kafka_io import read_until

    settings = Settings.from_env(kafka={"bootstrap_servers": kafka.bootstrap_servers, "topic_model_updates": "retrain-model-updates"})
    reg = ModelRegistry(tmp_path / "reg")
    (reg.root / "v0007" / "adapter").mkdir(parents=True)
    (reg.root / "v0007" / "adapter" / "adapter_config.json").write_text("{}")
    (reg.root / "v0007" / "manifest.json").write_text("{}")
    reg.promote("v0007", reason="retrain: test")
    await asyncio.to_thread(default_publisher(settings, reg), action="promote", version="v0007", reason="retrain: test")
    records = await read_until(kafka.bootstrap_servers, "retrain-model-updates", lambda rs: len(rs) >= 1, 30)
    update = ModelUpdate.model_validate_json(records[0].value)
    assert (update.action, update.version, update.previous, update.reason) == ("promote", "v0007", None, "retrain: test")
    assert update.model_version.endswith("+v0007")


# ---- two real cycles: teacher server, broker, student ---------------------------------------------------

USERS_PER_BATCH = 3


@pytest.fixture(scope="module")
def teacher_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import running_teacher

    yield from running_teacher(data_dir, tmp_path_factory.mktemp("retrain-teacher") / "server.log")


def _batches() -> tuple[list, list]:
    """Two disjoint groups of ML-100k users, each with all their events among the dataset's last 2,000."""
    inter = sorted(load_interactions("ml-100k"), key=lambda x: x.timestamp)[-2000:]
    by_user = defaultdict(list)
    for x in inter:
        by_user[x.user_id].append(x)
    users = sorted((u for u, xs in by_user.items() if 10 <= len(xs) <= 40), key=lambda u: (len(by_user[u]), u))
    assert len(users) >= 2 * USERS_PER_BATCH
    groups = users[:USERS_PER_BATCH], users[USERS_PER_BATCH:2 * USERS_PER_BATCH]
    return tuple(sorted((x for u in g for x in by_user[u]), key=lambda x: x.timestamp) for g in groups)


def _records(interactions: list) -> list[tuple[bytes, bytes]]:
    from streams.replay import interaction_to_event

    return [(x.user_id.encode(), interaction_to_event(x.user_id, x.item_id, x.rating, x.timestamp)
             .model_dump_json(exclude_none=True).encode()) for x in interactions]


class World:
    def __init__(self, settings: Settings, registry: ModelRegistry, batches: tuple[list, list]) -> None:
        self.settings = settings
        self.registry = registry
        self.batches = batches
        self.published: list[dict] = []

    def publish(self, **kwargs: object) -> None:
        self.published.append(kwargs)


@pytest.fixture(scope="module")
def world(kafka: EmbeddedBroker, teacher_server, data_dir: Path,  # type: ignore[no-untyped-def]
          tmp_path_factory: pytest.TempPathFactory) -> World:
    from tests.test_teacher import MODEL

    settings = Settings.from_env(data={"data_dir": data_dir, "dataset": "ml-100k"}, kafka={"bootstrap_servers": kafka.bootstrap_servers, "topic_interactions": "retrain-interactions"}, student={"threads": 1, "max_new_tokens": 24, "prompt_max_items": 5}, teacher={"url": teacher_server.url + "/v1", "model": MODEL, "max_concurrency": 1, "timeout_s": 60, "backoff_base_s": 0.2}, retrain={"window_size": 5, "targets": 2, "holdout_events": 2, "samples": 2, "teacher_max_tokens": 32, "max_steps": 2, "batch_size": 2, "max_seq_len": 384, "max_users": USERS_PER_BATCH, "holdout_users": 0.34, "replay_fraction": 0.5, "gate_margin": 1.0})
    return World(settings, ModelRegistry(tmp_path_factory.mktemp("retrain-registry")), _batches())


DECISION = DriftDecision(fired=[FiredSignal(signal="genre_js", value=0.31, threshold=0.1, samples=2000)],
                         model_version="smollm2-135m-instruct-base", events_seen=2400)


@pytest.fixture(scope="module")
def first_cycle(world: World) -> CycleResult:
    asyncio.run(_publish(world.settings.kafka.bootstrap_servers, world.settings.kafka.topic_interactions,
                         _records(world.batches[0])))
    return retrain_once(world.settings, registry=world.registry, drift_reason=DECISION, publish=world.publish)


@pytest.fixture(scope="module")
def second_cycle(world: World, first_cycle: CycleResult) -> CycleResult:
    asyncio.run(_publish(world.settings.kafka.bootstrap_servers, world.settings.kafka.topic_interactions,
                         _records(world.batches[1])))
    # The candidate's metrics are given and the gate demands a gain of 0.01 over the current student: the
    # candidate is rejected whatever the tiny held-out set measures.
    strict = world.settings.updated(retrain={"gate_margin": -0.01})
    return retrain_once(strict, registry=world.registry, publish=world.publish,
                        candidate_metrics={"ndcg@10": 0.0, "hr@10": 0.0})


@pytest.mark.slow
def test_a_cycle_publishes_and_promotes_a_version_with_its_provenance(world: World, first_cycle: CycleResult) -> None:
    r, reg = first_cycle, world.registry
    assert r.status == "promoted", r
    assert r.version == "v0001" and reg.current() == "v0001" and r.parent_version is None
    assert world.published == [{"action": "promote", "version": "v0001", "reason": f"retrain: {r.gate.reason}"}]
    assert len(r.train_users) == 2 and len(r.heldout_users) == 1 and r.new_records == 2 and r.replay_records == 0
    m = reg.get("v0001")
    assert m["parent_version"] is None and m["drift_reason"] == DECISION.model_dump(mode="json")
    batch = world.batches[0]
    window = m["data_window"]
    assert window["source"] == "kafka:retrain-interactions" and window["events"] == len(batch)
    assert (window["first_timestamp"], window["last_timestamp"]) == (batch[0].timestamp, batch[-1].timestamp)
    assert all(o["start"] == 0 for o in window["offsets"].values())
    assert sum(o["end"] for o in window["offsets"].values()) == len(batch)
    ev = m["evaluation"]
    assert set(ev["candidate"]) >= {"ndcg@10", "hr@10"} and set(ev["current"]) >= {"ndcg@10", "hr@10"}
    assert ev["held_out_users"] == r.heldout_users and ev["candidate_source"] == "measured"
    assert m["gate"]["promoted"] is True and m["gate"]["metric"] == "ndcg@10" and m["gate"]["margin"] == 1.0
    assert m["datasets"][0]["version"] == r.dataset_version and m["created_at"]
    assert m["retrain"]["train_users"] == r.train_users and not set(r.heldout_users) & set(r.train_users)
    # The dataset: teacher rationales for the training users only, never a held-out user's events.
    records = [json.loads(line) for line in r.dataset_path.read_text().splitlines()]
    assert sorted(x["user_id"] for x in records) == sorted(r.train_users)
    assert all(len(x["window"]) == 5 and len(x["target_items"]) == 2 and x["rationale"] for x in records)
    ref = json.loads((reg.version_dir("v0001") / "drift_reference.json").read_text())
    assert ref["model_version"].endswith("+v0001") and ref["genres"]["proportions"] and ref["rationale_centroid"]
    assert 0 < ref["rationale_samples"] <= len(r.heldout_users)  # one candidate rationale per held-out user
    # The genre reference is the stream the cycle read (every event of the batch), not just its training windows.
    from streams.drift import GenreDistribution
    from streams.datasets import load_items

    expected = GenreDistribution.from_items([x.item_id for x in world.batches[0]], load_items("ml-100k"))
    assert ref["genres"]["proportions"] == pytest.approx(expected.proportions)
    state = json.loads((reg.root / RETRAIN_STATE).read_text())["sources"]["kafka:retrain-interactions"]
    assert state["next_offsets"] == {p: o["end"] for p, o in window["offsets"].items()}
    assert (reg.adapter_dir("v0001") / "adapter_config.json").is_file()


@pytest.mark.slow
def test_a_worse_candidate_is_rejected_and_current_stays(world: World, second_cycle: CycleResult) -> None:
    r, reg = second_cycle, world.registry
    assert r.status == "rejected" and not r.promoted, r
    assert r.version == "v0002" and reg.exists("v0002") and reg.current() == "v0001"
    assert [h["version"] for h in reg.history() if h["action"] == "promote"] == ["v0001"]
    assert len(world.published) == 1  # nothing announced for a rejected candidate
    m = reg.get("v0002")
    assert m["parent_version"] == "v0001" and m["drift_reason"] == "scheduled"
    assert m["gate"]["promoted"] is False and "not promoted" in m["gate"]["reason"] and m["gate"]["margin"] == -0.01
    assert m["evaluation"]["candidate_source"] == "override" and m["evaluation"]["current_version"] == "v0001"
    # Continue-training from v0001 on the new records plus a replayed earlier one.
    assert r.replay_records == 1 and r.new_records == 2 and m["retrain"]["replay_from"] == [first_dataset(reg)]
    assert [d["version"] for d in m["datasets"]] == [r.dataset_version, first_dataset(reg)]
    assert r.reference == "v0001/drift_reference.json"


def first_dataset(reg: ModelRegistry) -> str:
    return reg.get("v0001")["datasets"][0]["version"]


@pytest.mark.slow
def test_the_offsets_advance_so_no_event_is_read_twice(world: World, first_cycle: CycleResult,
                                                       second_cycle: CycleResult) -> None:
    one, two = first_cycle.data_window, second_cycle.data_window
    assert two is not None and one is not None
    assert two.events == len(world.batches[1])  # only the second batch
    assert {p: o["start"] for p, o in two.offsets.items()} == {p: o["end"] for p, o in one.offsets.items()}
    assert sum(o["end"] - o["start"] for o in two.offsets.values()) == len(world.batches[1])
    assert two.first_timestamp == world.batches[1][0].timestamp
    third = retrain_once(world.settings, registry=world.registry, publish=world.publish)
    assert third.status == "skipped" and "no new events" in third.reason and third.data_window.events == 0
    assert world.registry.list_versions() == ["v0001", "v0002"]


@pytest.mark.slow
def test_rollback_after_a_promotion_restores_the_previous_version(world: World, second_cycle: CycleResult) -> None:
    reg = world.registry
    assert reg.current() == "v0001"
    reg.promote("v0002", reason="test: operator override")
    assert reg.current() == "v0002"
    assert reg.rollback(reason="test") == "v0001" and reg.current() == "v0001"
    assert reg.rollback(reason="test") is None and reg.current() is None  # v0001 was promoted over the base
