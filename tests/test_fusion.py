"""The SLIM methods of the evaluation: the fusion weight is learned on validation data only, rationales are
cached per prompt, and end to end on an ML-100k slice with the real student, no rationale prompt ever shows
the item the user is judged on."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from models.fusion import FusionRanker, RationaleCache, RationaleVectors
from models.prompts import PromptItem
from models.sasrec import SASRecConfig
from evaluation.harness import run_evaluation
from streams.splits import TrainingData, leave_one_out, restrict_users
from streams.datasets import load_interactions, load_items
from tests.test_encoder import shared_settings


def toy_data(n_users: int = 60, n_items: int = 30, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    train = tuple(rng.choice(np.arange(1, n_items + 1), size=6, replace=False).astype(np.int64)
                  for _ in range(n_users))
    valid = np.array([rng.choice(np.setdiff1d(np.arange(1, n_items + 1), t)) for t in train], dtype=np.int64)
    return TrainingData(n_items=n_items, user_ids=tuple(f"u{i}" for i in range(n_users)),
                        item_ids=("",) + tuple(f"i{i}" for i in range(1, n_items + 1)), train=train,
                        valid_targets=valid)


class NoiseBase:
    """A base ranker with seeded random scores: a weak backbone the fusion can improve on."""

    name = "noise"

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items

    def fit(self, data: TrainingData) -> None:
        pass

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        rng = np.random.default_rng(1234)
        return rng.normal(size=(len(users), self.n_items + 1)).astype(np.float32)


class TargetVectors:
    """User vectors that point at a chosen item per user (one-hot item space): a perfectly informative
    'rationale' when ``targets`` are the items being predicted, pure noise otherwise."""

    name = "oracle"

    def __init__(self, targets: np.ndarray, dim: int) -> None:
        self.targets = targets
        self.dim = dim
        self.calls: list[np.ndarray] = []

    def fit(self, data: TrainingData) -> None:
        pass

    def __call__(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        self.calls.append(np.asarray(users))
        out = np.zeros((len(users), self.dim), dtype=np.float32)
        out[np.arange(len(users)), self.targets[users]] = 1.0
        return out


def test_alpha_is_learned_on_validation_and_only_used_when_it_helps() -> None:
    data = toy_data()
    item_vecs = np.eye(data.n_items + 1, dtype=np.float32)
    # informative on validation: alpha > 0, and the fused ranking puts the validation item first
    informative = FusionRanker(NoiseBase(data.n_items), TargetVectors(data.valid_targets, data.n_items + 1),
                               item_vecs, name="fused")
    informative.fit(data)
    assert informative.alpha is not None and informative.alpha > 0
    assert informative.validation["0"] < informative.validation[f"{informative.alpha:g}"]
    scores = informative.score(np.arange(5), [data.train[u] for u in range(5)])
    assert (scores[:, 1:].argmax(axis=1) + 1 == data.valid_targets[:5]).all()
    # uninformative (points at a random other item): the grid's 0 wins, the base ranking is kept
    rng = np.random.default_rng(7)
    decoy = np.array([rng.choice(np.setdiff1d(np.arange(1, data.n_items + 1), [v])) for v in data.valid_targets])
    useless = FusionRanker(NoiseBase(data.n_items), TargetVectors(decoy, data.n_items + 1), item_vecs, name="x")
    useless.fit(data)
    assert useless.alpha == 0.0
    base = NoiseBase(data.n_items).score(np.arange(3), [data.train[u] for u in range(3)])
    fused = useless.score(np.arange(3), [data.train[u] for u in range(3)])
    assert np.array_equal(base[:, 1:].argsort(axis=1), fused[:, 1:].argsort(axis=1))


def test_fusion_fits_only_on_its_fit_users() -> None:
    data = toy_data()
    vecs = TargetVectors(data.valid_targets, data.n_items + 1)
    fit_users = np.array([3, 5, 8])
    FusionRanker(NoiseBase(data.n_items), vecs, np.eye(data.n_items + 1, dtype=np.float32), name="f",
                 fit_users=fit_users).fit(data)
    assert [c.tolist() for c in vecs.calls] == [[3, 5, 8]]


def test_rationales_are_cached_per_prompt(tmp_path: Path) -> None:
    prompts_seen: list[str] = []

    def generate(batch: list[list[dict[str, str]]]) -> list[str]:
        prompts_seen.extend(m[1]["content"] for m in batch)
        return [f"Step 1: likes {len(m[1]['content'])} chars" for m in batch]

    items = [PromptItem("", None, ())] + [PromptItem(f"Movie {i}", None, ("Drama",)) for i in range(1, 9)]

    class LenEncoder:
        dim = 4

        def encode(self, texts: list[str]) -> np.ndarray:
            return np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32)

    def vectors() -> RationaleVectors:
        return RationaleVectors(generate, LenEncoder(), items, max_items=3, name="t", generator_id="gen/1",  # type: ignore[arg-type]
                                cache_dir=tmp_path)

    hist = [np.array([1, 2, 3, 4]), np.array([5, 6]), np.array([2, 3, 4])]  # 1st and 3rd share a window
    v1 = vectors()
    out = v1(np.arange(3), hist)
    assert len(prompts_seen) == 2 and v1.generated == 2 and v1.cached == 1
    assert "Movie 1" not in prompts_seen[0]  # only the newest max_items items are shown
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    v2 = vectors()  # a new run reads the cache file: nothing is generated again
    assert np.allclose(v2(np.arange(3), hist), out) and len(prompts_seen) == 2 and v2.cached == 3
    rows = [json.loads(line) for line in (tmp_path / "gen_1.jsonl").read_text().splitlines()]
    assert {r["key"] for r in rows} == {RationaleCache.key(v1.messages(h)) for h in hist}


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """slim-base and its fusion with the real SmolLM2 student (short rationales to keep it quick)."""
    settings = shared_settings(tmp_path_factory).updated(encoder={"batch_size": 64}, student={"max_new_tokens": 24, "prompt_max_items": 8})
    seen: list[str] = []
    from models import student as student_mod

    original = student_mod.TransformersStudent.generate

    def recording(self, batch):  # type: ignore[no-untyped-def]
        seen.extend(m[1]["content"] for m in batch)
        return original(self, batch)

    student_mod.TransformersStudent.generate = recording  # type: ignore[method-assign]
    try:
        out = run_evaluation(
            "ml-100k", ["popularity", "sasrec", "slim-base", "sasrec+slim-base", "sasrec+text-mean"],
            sample_users=5, limit_users=80, seed=3, out_dir=tmp_path_factory.mktemp("reports"), sasrec_epochs=1,
            sasrec_config=SASRecConfig(batch_size=32, dim=32), run_name="slim", settings=settings, plots=False)
    finally:
        student_mod.TransformersStudent.generate = original  # type: ignore[method-assign]
    out["_prompts"] = seen
    return out


def test_slim_methods_run_on_the_sample_and_share_rationales(slim_run: dict) -> None:
    res = slim_run["results"]
    assert set(res["sample"]) == {"popularity", "sasrec", "slim-base", "sasrec+slim-base", "sasrec+text-mean"}
    assert set(res["all"]) == {"popularity", "sasrec"}
    for key in ("slim-base", "sasrec+slim-base"):
        assert res["sample"][key]["users"] == 5
    info = {m["key"]: m for m in slim_run["methods"]}
    # 5 test-phase prompts for slim-base, then 5 validation-phase prompts for the fusion (the test-phase ones
    # are cache hits): one generation per user and phase, shared by the two methods
    assert len(slim_run["_prompts"]) == 10
    fused = info["sasrec+slim-base"]["details"]
    assert fused["alpha"] is not None and fused["fit_users"] == 5
    assert fused["rationales"]["generated"] == 10
    assert "alpha" in Path(slim_run["run_dir"], "results.md").read_text()


def test_no_rationale_prompt_shows_the_judged_item(slim_run: dict) -> None:
    """Validation-phase prompts never show the validation or test item; test-phase ones never the test item."""
    interactions = restrict_users(load_interactions("ml-100k"), 80, 3)
    split = leave_one_out(interactions)
    titles = {it.item_id: it.title for it in load_items("ml-100k")}
    from streams.splits import sample_user_indices

    sample = sample_user_indices(split.n_users, 5, 3)
    prompts = slim_run["_prompts"]
    test_prompts, valid_prompts = prompts[:5], prompts[5:]
    for p, u in zip(test_prompts, sample):
        test_title = titles[split.item_ids[split.test[u]]]
        assert f"{test_title}" not in p, (u, test_title)
        assert titles[split.item_ids[split.valid[u]]] in p  # the test phase does see the validation item
    for p, u in zip(valid_prompts, sample):
        for held_out in (split.valid[u], split.test[u]):
            assert titles[split.item_ids[held_out]] not in p
