"""The ranker's retrain stage and `slimstream train-ranker`: a candidate trained on recent events is judged
against the serving ranker on the same held-out events through the serving code, promoted and announced when
it is not worse, kept unpromoted when the gate says no; too few users skip the stage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.ranker_artifact import save_ranker
from models.slim_rec import SLIMRecConfig, SLIMRecRanker
from retrain.ranker_cycle import retrain_ranker
from streams.datasets import load_interactions, load_items
from streams.model_updates import model_update_for
from streams.registry import ModelRegistry
from streams.settings import Settings
from streams.splits import leave_one_out, restrict_users
from tests.conftest import ROOT


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(data={"data_dir": tmp_path}, retrain={"ranker_minutes": 0.25, "ranker_min_users": 20})


def _weak_current(registry: ModelRegistry) -> str:
    """A serving ranker trained for one epoch on 40 other users."""
    data = leave_one_out(restrict_users(load_interactions("ml-100k"), 40, 5)).training_data()
    ranker = SLIMRecRanker(SLIMRecConfig(max_len=20, dim=16, epochs=1, threads=1, bf16=False))
    ranker.fit(data)
    staging = registry.staging_dir()
    version = registry.publish(staging, None, save_ranker(ranker, data, staging, dataset="old"))
    registry.promote(version)
    return version


def test_candidate_from_recent_events_is_gated_against_the_serving_ranker(settings: Settings) -> None:
    registry = ModelRegistry.rankers_for_settings(settings)
    old = _weak_current(registry)
    events = restrict_users(load_interactions("ml-100k"), 150, 0)
    catalogue = {it.item_id: it for it in load_items("ml-100k")}
    announced: list[dict] = []
    out = retrain_ranker(settings, events, catalogue, registry=registry, publish=lambda **kw: announced.append(kw))
    m = out["metrics"]
    assert out["status"] == "promoted", out
    assert m["users"] == 150 and m["current"]["version"] == old
    assert m["served"]["NDCG@10"] > m["popularity"]["NDCG@10"]
    assert m["served"]["NDCG@10"] >= m["current"]["NDCG@10"]
    assert registry.current() == out["version"] != old
    assert announced == [{"action": "promote", "version": out["version"], "reason": f"retrain ranker: {out['reason']}"}]
    update = model_update_for(registry, settings, "promote", "")
    assert (update.component, update.version, update.model_version) == ("ranker", out["version"],
                                                                        f"ranker+{out['version']}")
    manifest = registry.get(out["version"])
    assert manifest["dataset"] == "stream" and manifest["gate"]["passed"] and manifest["data"]["users"] == 150

    # A gate that demands +1.0 NDCG@10 over the serving version: published, not promoted, not announced.
    strict = settings.updated(retrain={"gate_margin": -1.0})
    again = retrain_ranker(strict, events, catalogue, registry=registry, publish=lambda **kw: announced.append(kw))
    assert again["status"] == "rejected" and "below the serving" in again["reason"]
    assert registry.current() == out["version"] and len(announced) == 1
    assert registry.exists(again["version"]) and not registry.get(again["version"])["gate"]["passed"]

    few = retrain_ranker(settings, restrict_users(events, 5, 0), catalogue, registry=registry)
    assert few["status"] == "skipped" and "needs 20" in few["reason"]


def test_train_ranker_cli_publishes_a_gated_version_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env["SLIMSTREAM_DATA_DIR"] = str(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    bad = cli("train-ranker", "--items", "pictures")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--items" in bad.stderr
    ok = cli("train-ranker", "--data", "ml-100k", "--limit-users", "150", "--minutes", "0.25", "--promote",
             "--no-publish")
    assert ok.returncode == 0, ok.stderr
    assert "v0001: NDCG@10" in ok.stdout and "promoted to CURRENT" in ok.stdout
    listed = cli("rankers", "list")
    assert listed.returncode == 0 and "* v0001" in listed.stdout and "data=ml-100k" in listed.stdout
    rolled = cli("rankers", "rollback", "--no-publish")
    assert rolled.returncode == 0 and "the text ranker" in rolled.stdout
    assert ModelRegistry.rankers_for_settings(Settings.from_env(data={"data_dir": tmp_path})).current() is None


def test_train_ranker_with_student_rationales_serves_a_rationale_aware_model(data_dir: Path, tmp_path: Path) -> None:
    """``rationale_users``: the base student writes rationales for a seeded few users' training prefixes; the
    served version then reads a user's rationale vector (and the null vector without one)."""
    import numpy as np

    from models.ranker_artifact import load_ranker
    from models.served_ranker import ServedRanker
    from retrain.ranker import RankerSpec, train_ranker

    settings = Settings.from_env(data={"data_dir": data_dir, "registry_dir": tmp_path / "registry"},
                                 student={"max_new_tokens": 16, "threads": 1})
    result = train_ranker(settings, "ml-100k", RankerSpec(minutes=0.05, limit_users=40, rationale_users=3))
    r = result.manifest["rationale"]
    assert r["asked"] == 3 and r["with_rationale"] + r["empty"] == 3 and r["source"].startswith("student-")
    assert (data_dir / "eval-rationales" / f"{r['source']}.jsonl").is_file()  # the harness's cache
    served = ServedRanker(load_ranker(ModelRegistry.rankers_for_settings(settings).version_dir(result.version)))
    assert served.rationale_dim == 384
    window = served.item_ids[1:11]
    vec = np.random.default_rng(0).normal(size=384).astype(np.float32)
    with_r = served.scores([served.indices(window)], [vec / np.linalg.norm(vec)])
    without = served.scores([served.indices(window)], [None])
    assert not np.allclose(with_r[:, 1:], without[:, 1:])
