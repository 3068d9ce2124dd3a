"""The trained SLIM recommenders (models/slim_rec.py): the learned no-rationale vector serves users without a
rationale, an item nobody interacted with is scored from its text alone, and no rationale prompt ever holds a
validation or test item (nor a training target its rationale is the input for)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from models.slim_rec import SLIMRecConfig, SLIMRecRanker, _user_windows, rationale_cuts, rationale_inputs
from streams.datasets import load_interactions
from streams.splits import TrainingData, leave_one_out, restrict_users

CFG = SLIMRecConfig(max_len=50, dim=32, batch_size=32, lr=3e-3, epochs=3, threads=1, bf16=False, rationale_tail=5)


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return leave_one_out(restrict_users(load_interactions("ml-100k"), 150, 0)).training_data()


@pytest.fixture(scope="module")
def text(data: TrainingData) -> np.ndarray:
    vecs = np.random.default_rng(0).normal(size=(data.n_items + 1, 24)).astype(np.float32)
    vecs[0] = 0
    return vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)


def _prefix_mean(text: np.ndarray, seen: list):  # type: ignore[no-untyped-def]
    def rationale(users: np.ndarray, prefixes) -> np.ndarray:  # type: ignore[no-untyped-def]
        seen.extend(zip(users.tolist(), [np.asarray(p) for p in prefixes]))
        v = np.stack([text[np.asarray(p)[-5:]].mean(axis=0) for p in prefixes])
        v[::7] = 0  # some rationales come back empty: those users are served as if they had none
        return v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    return rationale


def test_prompts_hold_only_the_training_prefix_and_the_gate_follows_it(data: TrainingData, text: np.ndarray) -> None:
    seen: list = []
    users = np.arange(0, data.n_users, 2)
    r = rationale_inputs(data, _prefix_mean(text, seen), users, tail=5, source="spy")
    cuts = rationale_cuts(data.train, 5)
    assert [u for u, _ in seen] == users.tolist()
    for u, prefix in seen:
        train = np.asarray(data.train[u])
        assert len(prefix) == cuts[u] < len(train) and np.array_equal(prefix, train[:len(prefix)])
        assert data.valid_targets[u] not in prefix  # nor, a fortiori, the test item (TrainingData holds none)
    assert r.counts["with_rationale"] + r.counts["empty"] == len(users) and r.counts["empty"] > 0
    assert (r.cuts[1::2] == -1).all()  # users never asked: no rationale
    ranker = SLIMRecRanker(CFG, rationales=r)
    windows = ranker._windows(data)
    seq, win_users, target_idx = _user_windows(data.train, CFG.max_len)
    use = windows["use"].numpy()
    for w in range(len(seq)):
        cut = r.cuts[win_users[w]]
        expected = (target_idx[w] >= cut) if cut >= 0 else np.zeros(CFG.max_len, dtype=bool)
        assert np.array_equal(use[w], expected)
        # a target the rationale's own prompt showed never sees that rationale
        assert not use[w][(target_idx[w] >= 0) & (target_idx[w] < max(cut, 0))].any()


def test_users_without_a_rationale_are_served_by_the_learned_null_vector(data: TrainingData, text: np.ndarray) -> None:
    r = rationale_inputs(data, _prefix_mean(text, []), np.arange(0, data.n_users, 2), tail=5)
    ranker = SLIMRecRanker(CFG, rationales=r)
    ranker.fit(data)
    net = ranker.net
    assert float(net.null_rationale.detach().abs().sum()) > 0, "the no-rationale vector was trained"
    assert float(net.fuse.weight.detach().abs().sum()) > 0, "the fusion was trained"
    without = np.where(r.cuts < 0)[0][:5]
    with_ = np.where(r.cuts >= 0)[0][:5]
    hist = [data.train[u] for u in without]
    before = ranker.score(without, hist)
    r.vectors[without] = 1.0  # garbage where there is no rationale: must not be read
    assert np.allclose(ranker.score(without, hist), before)
    # the same histories with a rationale score differently: the rationale is an input
    r.cuts[without] = 1
    assert not np.allclose(ranker.score(without, hist), before)
    r.cuts[without] = -1
    assert np.isfinite(ranker.score(with_, [data.train[u] for u in with_])[:, 1:]).all()


def test_an_item_nobody_interacted_with_is_scored_from_its_text(data: TrainingData, text: np.ndarray) -> None:
    seen = {int(i) for s in data.train for i in s}
    cold = [i for i in range(1, data.n_items + 1) if i not in seen]
    assert cold, "the slice has items only validation/test users touched"
    ranker = SLIMRecRanker(replace(CFG, items="text"), item_text=text)
    ranker.fit(data)
    users = np.arange(5)
    hist = [data.train[u] for u in users]
    scores = ranker.score(users, hist)
    assert np.isfinite(scores[:, cold]).all() and scores[:, cold].std() > 0
    # Give a cold item the text of a warm one: the same score, whatever its (non-existent) history.
    warm = next(iter(seen))
    ranker.net.item_text[cold[0]] = torch.from_numpy(text[warm])
    again = ranker.score(users, hist)
    assert np.allclose(again[:, cold[0]], again[:, warm], atol=1e-5)
    with pytest.raises(ValueError, match="needs item-text vectors"):
        SLIMRecRanker(replace(CFG, items="text"))
