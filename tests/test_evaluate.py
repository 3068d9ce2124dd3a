"""The offline evaluation harness end to end on a 200-user slice of ML-100k: reports written, SASRec beats
random, the test item never reaches a ranker, sample-only methods plug in, runs are deterministic."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from models.baselines import PopularityRanker
from models.rankers import Ranker
from models.sasrec import SASRecConfig
from evaluation.harness import Method, run_evaluation
from streams.splits import TrainingData, leave_one_out, restrict_users
from streams.datasets import load_interactions
from streams.settings import Settings
from tests.test_encoder import shared_settings

DATA = dict(source="ml-100k", limit_users=200, sample_users=60, seed=0)
SLICE = dict(DATA, settings=Settings.from_env())
# Small batches and a higher learning rate: 200 users give ~500 training windows, so the default batch of
# 128 would be only four updates per epoch.
TINY_SASREC = SASRecConfig(batch_size=32, lr=3e-3, dim=48)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    calls: list[tuple[str, int, int]] = []
    out = run_evaluation(
        methods=["random", "popularity", "item-knn", "sasrec", "text-mean", "slim-text-none"],
        out_dir=tmp_path_factory.mktemp("reports"),
        sasrec_epochs=2, sasrec_config=TINY_SASREC, run_name="tiny",
        # the session's shared ONNX export; batches of 64 texts rather than its 4 (1.3k titles to embed)
        settings=shared_settings(tmp_path_factory).updated(encoder={"batch_size": 64}),
        progress=lambda m, d, t: calls.append((m, d, t)), **DATA)
    out["_progress"] = calls
    return out


def test_reports_are_written(full_run: dict) -> None:
    run_dir = Path(full_run["run_dir"])
    assert run_dir.name == "tiny"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["results"]["all"].keys() == {"random", "popularity", "item-knn", "sasrec", "text-mean", "slim-text-none"}
    assert saved["populations"] == {"all": 200, "sample": 60}
    assert saved["split"]["users"] == 200 and saved["split"]["users_dropped"] == 0
    pngs = [f for f in saved["files"] if f.endswith(".png")]
    assert sorted(pngs) == ["hr_curve_all.png", "hr_curve_sample.png", "metrics_all.png", "metrics_sample.png"]
    for name in pngs:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (run_dir / "results.md").read_text()
    assert "| SASRec |" in md and "| item-text mean of last 20 (no LLM) |" in md and "HR@10 (s100)" in md
    block = saved["results"]["all"]["popularity"]
    assert len(block["full"]["HR_curve"]) == 50 and block["full"]["HR@10"]["ci_low"] <= block["full"]["HR@10"]["mean"]
    # the HR curve is consistent with the table
    assert block["full"]["HR_curve"][9] == pytest.approx(block["full"]["HR@10"]["mean"])
    sasrec = next(m for m in saved["methods"] if m["key"] == "sasrec")
    assert len(sasrec["details"]["epochs"]) == 2
    checks = {c["method"]: c for c in saved["checks"]}
    assert set(checks) == {"sasrec", "slim-text-none"}
    for c in checks.values():
        beats = all(c["NDCG@10"] > saved["results"]["all"][b]["full"]["NDCG@10"]["mean"] for b in ("popularity", "item-knn"))
        assert c["beats_all"] == beats
    assert "## Trained models vs the baselines" in md


def test_cold_start_slices_partition_the_users(full_run: dict) -> None:
    for pop, n in (("all", 200), ("sample", 60)):
        for key, block in full_run["results"][pop].items():
            s = block["slices"]
            assert sum(s[k]["users"] for k in ("history <= 5", "history 6-20", "history > 20")) == n, key
            assert s["item unseen"]["users"] + s["item rare (1-5)"]["users"] == s["item <= 5"]["users"]
            assert s["item <= 5"]["users"] + s["item popular (> 5)"]["users"] == n
    # Popularity never recommends an item without training interactions: zero on that slice.
    unseen = full_run["results"]["all"]["popularity"]["slices"]["item unseen"]
    assert unseen["users"] == 0 or unseen["NDCG@10"]["mean"] == 0.0
    md = (Path(full_run["run_dir"]) / "results.md").read_text()
    assert "## Cold start, all" in md and "| SLIM ID-agnostic, trained, no rationale |" in md


def test_sasrec_and_baselines_beat_random(full_run: dict) -> None:
    res = full_run["results"]["all"]
    rand_full = res["random"]["full"]["NDCG@20"]["mean"]
    rand_sampled = res["random"]["sampled"]["HR@10"]["mean"]
    for key in ("sasrec", "popularity", "item-knn", "text-mean"):
        assert res[key]["full"]["NDCG@20"]["mean"] > rand_full, key
        assert res[key]["sampled"]["HR@10"]["mean"] > rand_sampled, key
    # Not by luck: SASRec's whole 95% interval lies above what random ranking gets in expectation (10/101).
    assert res["sasrec"]["sampled"]["HR@10"]["ci_low"] > 10 / 101
    # Popularity recommends the head of the catalogue; random and text do not.
    assert res["popularity"]["full"]["avg_pop@10"]["mean"] > res["text-mean"]["full"]["avg_pop@10"]["mean"]
    assert res["popularity"]["full"]["coverage@10"] < res["random"]["full"]["coverage@10"]


def test_progress_is_reported(full_run: dict) -> None:
    calls = full_run["_progress"]
    assert calls[0][0].startswith("loading") and calls[-1][1] == calls[-1][2]
    assert any("SASRec epoch 2" in m for m, _, _ in calls)
    assert all(0 <= d <= t for _, d, t in calls)


class _Spy:
    """Records everything a ranker is shown, scores by popularity."""

    name = "spy"

    def __init__(self) -> None:
        self.pop = PopularityRanker()
        self.fit_data: TrainingData | None = None
        self.seen: dict[int, np.ndarray] = {}

    def fit(self, data: TrainingData) -> None:
        self.fit_data = data
        self.pop.fit(data)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        for u, h in zip(users, histories):
            self.seen[int(u)] = np.array(h)
        return self.pop.score(users, histories)


def test_test_items_never_reach_a_ranker_and_sample_only_methods(tmp_path: Path) -> None:
    spy = _Spy()
    assert isinstance(spy, Ranker)
    out = run_evaluation(methods=["popularity", Method("spy", lambda ctx: spy, sample_only=True)],
                         out_dir=tmp_path, plots=False, run_name="spy", **SLICE)
    assert "spy" not in out["results"]["all"] and "spy" in out["results"]["sample"]
    # Scored alone on the sample, the same ranking gives the same numbers as the all-users run restricted to it.
    assert out["results"]["sample"]["spy"] == out["results"]["sample"]["popularity"]
    assert len(spy.seen) == out["populations"]["sample"] == 60

    split = leave_one_out(restrict_users(load_interactions("ml-100k"), 200, seed=0))
    assert spy.fit_data is not None
    for u in range(split.n_users):
        assert split.test[u] not in spy.fit_data.train[u] and split.test[u] != spy.fit_data.valid_targets[u]
    for u, hist in spy.seen.items():
        assert split.test[u] not in hist
        assert hist.tolist() == split.train[u].tolist() + [split.valid[u]]


def test_baseline_runs_are_deterministic(tmp_path: Path) -> None:
    kwargs = dict(methods=["random", "popularity", "item-knn"], out_dir=tmp_path, plots=False, **SLICE)
    a = run_evaluation(run_name="a", **kwargs)
    b = run_evaluation(run_name="b", **kwargs)
    assert a["results"] == b["results"]
    c = run_evaluation(run_name="c", **(kwargs | {"seed": 1}))
    assert c["results"] != a["results"]


def test_a_failing_method_is_recorded_and_the_others_kept(tmp_path: Path) -> None:
    def broken(ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("teacher unreachable")

    methods = ["popularity", Method("broken", broken, sample_only=True), "random"]
    out = run_evaluation(methods=methods, out_dir=tmp_path, plots=True, run_name="k", keep_going=True, **SLICE)
    assert out["failed"] == {"broken": "RuntimeError: teacher unreachable"}
    assert set(out["results"]["all"]) == {"popularity", "random"}
    assert "## Failed methods" in (tmp_path / "k" / "results.md").read_text()
    with pytest.raises(RuntimeError, match="unreachable"):  # without keep_going the error propagates
        run_evaluation(methods=methods, out_dir=tmp_path, plots=False, run_name="k2", **SLICE)
