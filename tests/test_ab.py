"""A/B between registry versions: the split is stable per user and close to its share, the interval and the
topic join are right, and a real worker serves both arms side by side (arm b on a pinned registry adapter,
arm a on the base student), every message saying its arm; the per-arm figures move with feedback in
``/stats/`` and ``/metrics``, and ``slimstream ab-report`` computes them from the topics."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from streams.ab import arm_of, arm_report, join_streams, wilson
from streams.broker import EmbeddedBroker
from streams.events import Recommendation
from streams.settings import Settings, SettingsError
from tests.conftest import ROOT, WorkerProcess, random_adapter_registry, run, worker_env
from tests.kafka_io import event, publish, read_until

S = Settings.from_env()


def test_the_split_is_stable_per_user_and_close_to_its_share() -> None:
    users = [f"user-{n}" for n in range(20_000)]
    arms = [arm_of(u, "exp-1", 0.3) for u in users]
    assert arms == [arm_of(u, "exp-1", 0.3) for u in users]  # stable
    share = arms.count("b") / len(users)
    assert abs(share - 0.3) < 0.015
    other = [arm_of(u, "exp-2", 0.3) for u in users]  # a new salt is a new experiment
    assert sum(a != b for a, b in zip(arms, other)) > 0.3 * len(users)
    assert {arm_of(u, "exp-1", 0.0) for u in users[:500]} == {"a"} and {arm_of(u, "exp-1", 1.0) for u in users[:500]} == {"b"}
    # Growing arm b only moves users from a to b, never back.
    assert all(arm_of(u, "exp-1", 0.5) == "b" for u, a in zip(users, arms) if a == "b")


def test_wilson_interval_and_the_report() -> None:
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.192, abs=0.003)
    lo, hi = wilson(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # not the degenerate [0, 0] of the normal approximation
    assert wilson(0, 0) is None
    report = arm_report({"a": {"judged": 1000, "hits": 100}, "b": {"judged": 1000, "hits": 150}})
    diff = report["online_hit_rate_difference"]
    assert diff["b_minus_a"] == pytest.approx(0.05) and diff["ci95"][0] > 0  # a clear difference
    assert report["arms"]["a"]["attributed_hit_rate"]["rate"] is None


def test_the_topic_join_judges_each_event_against_the_newest_earlier_recommendation() -> None:
    recs = [{"user_id": "u1", "arm": "a", "recommendation_id": "r1", "items": [{"item_id": "x"}], "at": 1.0},
            {"user_id": "u1", "arm": "a", "recommendation_id": "r2", "items": [{"item_id": "y"}], "at": 3.0},
            {"user_id": "u2", "arm": "b", "recommendation_id": "r3", "items": [{"item_id": "x"}], "at": 1.0},
            {"user_id": "u3", "arm": None, "recommendation_id": "r4", "items": [{"item_id": "x"}], "at": 1.0}]
    events = [{"user_id": "u1", "item_id": "x", "at": 2.0},  # judged against r1: hit
              {"user_id": "u1", "item_id": "x", "at": 4.0, "recommendation_id": "r1"},  # r2: miss; named r1: hit
              {"user_id": "u2", "item_id": "z", "at": 0.5},  # before any recommendation: not judged
              {"user_id": "u2", "item_id": "x", "at": 2.0, "recommendation_id": "r1"},  # another user's id: ignored
              {"user_id": "u3", "item_id": "x", "at": 2.0}]  # no arm: outside the experiment
    counts = join_streams(recs, events)
    assert counts["a"] == {"impressions": 2, "judged": 2, "hits": 1, "attributed": 1, "attributed_hits": 1, "users": 1}
    assert counts["b"] == {"impressions": 1, "judged": 1, "hits": 1, "users": 1}


def test_an_experiment_without_arm_b_versions_is_refused() -> None:
    with pytest.raises(SettingsError, match="SLIMSTREAM_AB_STUDENT_B"):
        Settings.from_env({"SLIMSTREAM_AB_ENABLED": "true"})


@pytest.mark.slow
def test_both_arms_are_served_side_by_side_and_reported(tmp_path: Path, data_dir: Path, indexed_qdrant: Path) -> None:
    registry = random_adapter_registry(data_dir, tmp_path / "registry")
    salt = "test-ab"
    users = [f"ab-{n}" for n in range(40)]
    a_users = [u for u in users if arm_of(u, salt, 0.5) == "a"][:3]
    b_users = [u for u in users if arm_of(u, salt, 0.5) == "b"][:3]
    items = ["Toy Story (1995)", "Heat (1995)", "Casino (1995)"]
    with EmbeddedBroker() as broker:
        env = worker_env(broker, data_dir, indexed_qdrant, SLIMSTREAM_REGISTRY_DIR=str(registry.root),
                         SLIMSTREAM_STUDENT_MAX_NEW_TOKENS="24", SLIMSTREAM_AB_ENABLED="true",
                         SLIMSTREAM_AB_STUDENT_B="v0001", SLIMSTREAM_AB_SALT=salt, SLIMSTREAM_AB_SHARE_B="0.5")
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            records = [event(u, item, 1_000_000 + n) for u in a_users + b_users for n, item in enumerate(items)]
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, records))

            def slow_for_all(rs) -> bool:  # type: ignore[no-untyped-def]
                done = {r.key.decode() for r in rs if r.value and json.loads(r.value)["path"] == "slow"
                        and json.loads(r.value)["window_version"] == 3}
                return done >= set(a_users + b_users)

            raw = run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations, slow_for_all, 300))
            recs = [Recommendation.model_validate_json(r.value) for r in raw if r.value]
            assert slow_for_all(raw), worker.log_tail()
            newest = {r.user_id: r for r in recs if r.path.value == "slow" and r.window_version == 3}
            # Feedback naming each user's newest recommendation, clicking its first item (a hit).
            clicks = [event(u, newest[u].items[0].item_id, 1_000_010, recommendation_id=newest[u].recommendation_id)
                      for u in a_users + b_users]
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, clicks))
            def attributed(h) -> bool:  # type: ignore[no-untyped-def]
                arms = worker.metrics()["ab"]["arms"]
                return all(arms[arm]["attributed_hit_rate"]["n"] >= 3 for arm in "ab")

            worker.wait_until(attributed, 60)
            stats = worker.metrics()["ab"]
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=5) as resp:
                prom = resp.read().decode()
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/ui/", timeout=10) as resp:
                ops_page = resp.read().decode()
            report_path = tmp_path / "ab.json"
            cli_env = {**env, "SLIMSTREAM_WEB_PORT": "0"}
            proc = subprocess.run([sys.executable, "-m", "cli", "ab-report", "--out", str(report_path)], cwd=ROOT,
                                  env=cli_env, capture_output=True, text=True, timeout=180)
        finally:
            worker.stop()

    for rec in recs:  # every message names the user's arm, and arm b's students are the pinned adapter
        assert rec.arm == arm_of(rec.user_id, salt, 0.5)
        assert (rec.student_version or "").endswith("+v0001") == (rec.arm == "b")
    for u in b_users:
        assert newest[u].rationale_model_version.endswith("+v0001")
    for u in a_users:
        assert newest[u].rationale_model_version == "smollm2-135m-instruct-base"
    assert stats["versions"]["b"]["student"].endswith("+v0001") and stats["versions"]["a"]["student"] == "smollm2-135m-instruct-base"
    for arm in "ab":
        assert stats["arms"][arm]["attributed_hit_rate"]["hits"] == 3
        assert stats["arms"][arm]["online_hit_rate"]["n"] >= 3 and stats["arms"][arm]["impressions"] >= 6
    assert 'slimstream_ab_events_total{arm="b",kind="attributed_hits"} 3.0' in prom
    assert "slimstream_ab_online_hit_rate" in prom
    assert "A/B arms" in ops_page and "salt test-ab" in ops_page and "+v0001" in ops_page  # the operator's view

    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    for arm in "ab":
        block = report["arms"][arm]
        assert block["users"] == 3 and block["attributed_hit_rate"]["hits"] == 3
        assert block["online_hit_rate"]["n"] >= 3 and block["online_hit_rate"]["ci95"] is not None
    assert report["recommendations_without_arm"] == 0
