"""Hot swap of the student on real components: Tansu, worker processes, the CLI, a real LoRA adapter.

A worker starts on the base student; `slimstream models promote` publishes a ModelUpdate while events keep
coming; the worker loads the adapter in a thread and swaps between batches: no event is lost, and every
rationale written after the swap reports the new version; a duplicate update is a no-op, an update for a
missing version keeps the old student; `models rollback` swaps back. A worker started after a promotion
serves the promoted version from its first rationale. The drift monitor is fed and publishes a decision.
Plus the CLI's offline paths (no broker needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from streams.drift import DriftDecision
from streams.registry import MANIFEST_FORMAT, ModelRegistry
from streams.broker import EmbeddedBroker, free_port
from streams.datasets import load_interactions
from streams.events import ModelUpdate, Recommendation
from streams.model_updates import model_update_for, publish_model_update
from streams.settings import Settings
from tests.conftest import ROOT, WorkerProcess, random_adapter_registry, run, worker_env
from tests.kafka_io import event, publish, read_until

S = Settings.from_env()
BASE = S.student.model_version


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def fake_version(registry: ModelRegistry) -> str:
    """A registry version with an adapter config (enough to promote; not loadable)."""
    staging = registry.staging_dir()
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    return registry.publish(staging, manifest={"format": MANIFEST_FORMAT})


# ---- the CLI and the contract, offline ---------------------------------------------------------------------


def test_model_update_describes_the_registry_state(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    v1, v2 = fake_version(reg), fake_version(reg)
    reg.promote(v1)
    reg.promote(v2, reason="better")
    up = model_update_for(reg, S, "promote", "better")
    assert (up.action, up.version, up.previous, up.model_version) == ("promote", v2, v1, f"{BASE}+{v2}")
    assert up.registry_dir == str(reg.root.resolve()) and up.reason == "better"
    assert ModelUpdate.model_validate_json(up.model_dump_json()) == up  # round-trips as JSON
    reg.rollback()
    reg.rollback()
    down = model_update_for(reg, S, "rollback", "")
    assert (down.version, down.previous, down.model_version) == (None, v1, BASE)
    assert down.event_id != up.event_id


def test_promote_with_unreachable_broker_keeps_the_change_and_fails_in_one_line(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    version = fake_version(reg)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    proc = cli("models", "promote", version, "--registry", str(reg.root), env=env)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimstream: error: "), proc.stderr
    assert "not published" in lines[0] and env["KAFKA_BOOTSTRAP_SERVERS"] in lines[0]
    assert reg.current() == version  # the registry is the source of truth: the change stands


def test_no_publish_works_offline(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "registry")
    version = fake_version(reg)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    proc = cli("models", "promote", version, "--registry", str(reg.root), "--no-publish", env=env)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert reg.current() == version
    proc = cli("models", "rollback", "--registry", str(reg.root), "--no-publish", env=env)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert reg.current() is None
    assert [e["action"] for e in reg.history()] == ["promote", "rollback"]


# ---- the worker ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_registry(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return random_adapter_registry(data_dir, tmp_path_factory.mktemp("swap-registry"))


def ml_histories() -> dict[str, list]:
    """Four ML-1M users with at least 20 interactions each, time-ordered."""
    by_user: dict[str, list] = defaultdict(list)
    for it in load_interactions("ml-1m")[:20_000]:
        by_user[it.user_id].append(it)
    picked = [u for u, v in by_user.items() if len(v) >= 20][:4]
    return {u: sorted(by_user[u], key=lambda i: i.timestamp) for u in picked}


@pytest.fixture(scope="module")
def histories() -> dict[str, list]:
    return ml_histories()


class Feed:
    """Sends each user's next ML-1M interaction(s), counting what was sent (= the user's window version)."""

    def __init__(self, bootstrap: str, histories: dict[str, list]) -> None:
        self.bootstrap, self.histories = bootstrap, histories
        self.sent: dict[str, int] = defaultdict(int)

    def send(self, users: list[str], n: int = 1) -> None:
        records = []
        for user in users:
            for _ in range(n):
                k = self.sent[user]
                it = self.histories[user][k]
                records.append(event(user, it.item_id, it.timestamp, event_id=f"{user}-{k}"))
                self.sent[user] += 1
        run(publish(self.bootstrap, S.kafka.topic_interactions, records))


def recs_by_user(bootstrap: str, done, timeout: float = 300) -> dict[str, list[Recommendation]]:  # type: ignore[no-untyped-def]
    def parse(records) -> dict[str, list[Recommendation]]:  # type: ignore[no-untyped-def]
        out: dict[str, list[Recommendation]] = defaultdict(list)
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            out[r.key.decode()].append(Recommendation.model_validate_json(r.value))
        return out

    return parse(run(read_until(bootstrap, S.kafka.topic_recommendations, lambda rs: done(parse(rs)), timeout)))


def final_rationale(recs: list[Recommendation], version: int) -> Recommendation | None:
    slow = [r for r in recs if r.path.value == "slow" and r.rationale_window_version == version]
    return slow[-1] if slow else None


def all_explained(feed: Feed, users: list[str], model_version: str):  # type: ignore[no-untyped-def]
    """Every user has a slow-path recommendation for their newest window, written by ``model_version``."""
    def done(by_user: dict[str, list[Recommendation]]) -> bool:
        return all((f := final_rationale(by_user.get(u, []), feed.sent[u])) is not None
                   and f.rationale_model_version == model_version for u in users)
    return done


def assert_every_event_reflected(by_user: dict[str, list[Recommendation]], feed: Feed, users: list[str]) -> None:
    for u in users:
        # A window's version counts its applied events; events that arrive together are answered together, by
        # one recommendation for the newest window. So: answers in order, never repeated, the last one
        # reflecting every event sent.
        fast = [r.window_version for r in by_user[u] if r.path.value == "fast"]
        assert fast and fast == sorted(set(fast)) and fast[-1] == feed.sent[u], f"{u}: fast-path versions {fast}"
        final = final_rationale(by_user[u], feed.sent[u])
        assert final is not None and final.rationale_current and final.window_version == feed.sent[u]


def send_and_check(feed: Feed, users: list[str], n: int, model_version: str) -> dict[str, list[Recommendation]]:
    """Send ``n`` more events per user, wait until ``model_version`` explained each user's newest window, check
    every event was reflected; the recommendations by user."""
    feed.send(users, n)
    by_user = recs_by_user(feed.bootstrap, all_explained(feed, users, model_version))
    assert_every_event_reflected(by_user, feed, users)
    return by_user


def switch_with_cli(worker: WorkerProcess, env: dict[str, str], model_version: str, *args: str) -> None:
    """``slimstream models <args>`` (promote / rollback), then wait for the worker to serve ``model_version``."""
    proc = cli("models", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    worker.wait_until(lambda h: h["model_version"] == model_version, 120)


@pytest.mark.slow
def test_promote_and_rollback_swap_the_student_without_a_restart(
    adapter_registry: ModelRegistry, histories, data_dir: Path, indexed_qdrant: Path, tmp_path: Path,
) -> None:
    new = f"{BASE}+v0001"
    users = list(histories)[:3]
    with EmbeddedBroker() as broker:
        env = worker_env(broker, data_dir, indexed_qdrant,
                         SLIMSTREAM_REGISTRY_DIR=str(adapter_registry.root),
                         SLIMSTREAM_STUDENT_MAX_NEW_TOKENS="24",
                         # drift: decide every second; any change of the genre mix after the lazy reference
                         # (the first 10 events) fires genre_js
                         SLIMSTREAM_DRIFT_CHECK_EVERY_S="1", SLIMSTREAM_DRIFT_MIN_EVENTS="5",
                         SLIMSTREAM_DRIFT_WINDOW_EVENTS="10", SLIMSTREAM_DRIFT_GENRE_JS="0",
                         SLIMSTREAM_DRIFT_RATIONALE_DISTANCE="2")
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        assert worker.get("/healthz/")["model_version"] == BASE
        feed = Feed(broker.bootstrap_servers, histories)

        # 1. the base student answers
        feed.send(users, 3)
        recs_by_user(broker.bootstrap_servers, all_explained(feed, users, BASE))

        # 2. promote through the CLI while events keep coming
        promote = subprocess.Popen([sys.executable, "-m", "cli", "models", "promote", "v0001"], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        rounds = 0
        while worker.metrics()["model_swaps"] < 1:
            assert time.monotonic() < deadline, worker.log_tail()
            if rounds < 8:
                feed.send(users)
                rounds += 1
            time.sleep(0.3)
        out, err = promote.communicate(timeout=60)
        assert promote.returncode == 0, err
        assert "published model update" in out and adapter_registry.current() == "v0001"
        by_user = send_and_check(feed, users, 2, new)  # after the swap
        for u in users:
            # once the new student wrote a rationale for a user, every later one is the new student's
            versions = [r.rationale_model_version for r in by_user[u] if r.path.value == "slow"]
            first_new = versions.index(new)
            assert set(versions[:first_new]) == {BASE} and set(versions[first_new:]) == {new}, versions
        metrics = worker.metrics()
        assert metrics["model_swaps"] == 1 and metrics["model_swap_failures"] == 0
        assert metrics["student_model_version"] == new and worker.get("/healthz/")["model_version"] == new
        swap = metrics["last_model_swap"]
        assert swap["ok"] and swap["from"] == BASE and swap["to"] == new
        if swap["finished_at"] - swap["started_at"] > 1.5:
            # the window agent kept consuming while the adapter loaded
            during = [r for u in users for r in by_user[u]
                      if r.path.value == "fast" and swap["started_at"] < r.produced_at < swap["finished_at"]]
            assert during, "no interaction was handled while the new student loaded"

        # 3. a redelivered update is a no-op; an update for a version the registry lacks keeps the student
        settings = S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers}, data={"registry_dir": adapter_registry.root})
        run(publish_model_update(settings, model_update_for(adapter_registry, settings, "promote", "again")))
        worker.wait_until(lambda h: worker.metrics().get("model_updates_noop", 0) >= 1, 60)
        bogus = ModelUpdate(action="promote", version="v9999", previous="v0001", model_version=f"{BASE}+v9999",
                            registry_dir=str(adapter_registry.root), reason="test: missing version")
        run(publish_model_update(settings, bogus))
        worker.wait_until(lambda h: worker.metrics()["model_swap_failures"] >= 1, 60)
        metrics = worker.metrics()
        assert metrics["model_swaps"] == 1 and metrics["model_swap_failures"] == 1
        assert metrics["student_model_version"] == new

        # 4. rollback through the CLI: back to the base student
        switch_with_cli(worker, env, BASE, "rollback")
        send_and_check(feed, users, 2, BASE)
        assert worker.metrics()["model_swaps"] == 2

        # drift: fed by the stream, one decision published (then the cool-down holds the rest back)
        drift = worker.metrics()["drift"]
        assert drift["reference_source"] == "lazy" and drift["signals"]["genre_js"] is not None
        decisions = [DriftDecision.model_validate_json(r.value) for r in run(read_until(
            broker.bootstrap_servers, S.kafka.topic_drift, lambda rs: len(rs) >= 1, 30))]
        assert decisions and "genre_js" in decisions[0].signals
        assert worker.metrics()["drift_decisions_published"] == 1
        assert worker.stop() == 0, worker.log_tail()

        # 5. promoted while no worker runs (offline): a new worker serves it from its first rationale
        proc = cli("models", "promote", "v0001", "--no-publish", env=env)
        assert proc.returncode == 0, proc.stderr
        worker = WorkerProcess(env, tmp_path / "worker2.log").start()
        try:
            assert worker.get("/healthz/")["model_version"] == new
            late = list(histories)[3]
            feed.send([late], 2)
            by_user = recs_by_user(broker.bootstrap_servers, all_explained(feed, [late], new))
            slow = [r for r in by_user[late] if r.path.value == "slow"]
            assert slow[0].rationale_model_version == new
            # old updates in the topic are not replayed: the registry it loaded from is newer
            assert worker.metrics()["model_swaps"] == 0
        finally:
            worker.stop()
