"""Ranking metrics on hand-made rankings, and the leave-one-out split's leakage guarantees."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models import metrics as M
from streams.splits import leave_one_out, restrict_users, sample_user_indices
from streams.datasets import Interaction


# --- metrics ----------------------------------------------------------------------------------------------
def test_hit_and_ndcg_without_ties() -> None:
    greater = np.array([0, 2, 9, 10, 50])  # ranks 1, 3, 10, 11, 51
    assert M.hit_at_k(greater, 10).tolist() == [1, 1, 1, 0, 0]
    assert M.hit_at_k(greater, 1).tolist() == [1, 0, 0, 0, 0]
    nd = M.ndcg_at_k(greater, 10)
    assert nd[0] == pytest.approx(1.0)
    assert nd[1] == pytest.approx(1 / math.log2(4))  # rank 3
    assert nd[2] == pytest.approx(1 / math.log2(11))  # rank 10 is still inside the cut-off
    assert nd[3] == nd[4] == 0.0
    assert M.ndcg_at_k(greater, 20)[3] == pytest.approx(1 / math.log2(12))


def test_ties_count_as_random_tie_breaking() -> None:
    # Target tied with 3 others right at the top: positions 0..3 equally likely.
    g, t = np.array([0]), np.array([3])
    assert M.hit_at_k(g, 2, t)[0] == pytest.approx(0.5)
    assert M.ndcg_at_k(g, 2, t)[0] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    # A constant scorer over 100 candidates (the target + 99 tied) gets the random expectation, not 1.0.
    assert M.hit_at_k(np.array([0]), 10, np.array([99]))[0] == pytest.approx(0.1)


def test_rank_counts_full_and_sampled() -> None:
    #                   pad   1    2    3    4    5    6
    scores = np.array([[9.0, 0.5, 0.9, 0.1, 0.7, 0.7, 0.8]])
    target = np.array([4])
    excluded = M.history_mask([np.array([2])], 7)  # item 2 (the best) is history: not a competitor
    g, t = M.full_rank_counts(scores, target, excluded)
    assert (g[0], t[0]) == (1, 1)  # item 6 above, item 5 tied; padding ignored despite its high score
    assert M.hit_at_k(g, 2, t)[0] == pytest.approx(0.5) and M.hit_at_k(g, 3, t)[0] == pytest.approx(1.0)
    assert M.ndcg_at_k(g, 10, t)[0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 2)
    g, t = M.sampled_rank_counts(scores, target, np.array([[1, 3, 6, 0]]))  # 0 = unused slot
    assert (g[0], t[0]) == (1, 0)
    with pytest.raises(ValueError):
        M.full_rank_counts(scores, np.array([2]), excluded)  # target inside the history


def test_nan_scores_rank_last() -> None:
    scores = np.array([[0.0, np.nan, 0.2, 0.1]])
    g, t = M.full_rank_counts(scores, np.array([3]), M.history_mask([np.array([], dtype=np.int64)], 4))
    assert (g[0], t[0]) == (1, 0)


def test_top_k_coverage_and_popularity() -> None:
    scores = np.array([[0, 1, 5, 3, 4], [0, 5, 4, 3, 2]], dtype=float)
    excluded = M.history_mask([np.array([2]), np.array([], dtype=np.int64)], 5)
    top = M.top_k(scores, excluded, 2)
    assert top.tolist() == [[4, 3], [1, 2]]
    assert M.coverage(top, n_items=4) == pytest.approx(1.0)
    assert M.coverage(top[:, :1], n_items=4) == pytest.approx(0.5)
    counts = np.array([0, 10, 20, 30, 40])
    assert M.average_popularity(top, counts).tolist() == [35.0, 15.0]
    assert M.top_k(scores[:1], excluded[:1], 6).tolist() == [[4, 3, 1, 0, 0, 0]]  # 3 candidates only


def test_mean_ci() -> None:
    v = np.array([0.0, 1.0] * 50)
    e = M.mean_ci(v)
    assert e.mean == pytest.approx(0.5)
    assert e.high - e.mean == pytest.approx(1.959964 * np.std(v, ddof=1) / 10, rel=1e-5)
    b1, b2 = M.mean_ci(v, method="bootstrap", seed=3), M.mean_ci(v, method="bootstrap", seed=3)
    assert b1 == b2 and b1.low < 0.5 < b1.high
    assert M.mean_ci(np.array([])).n == 0


def test_sampled_negatives_exclude_the_users_items() -> None:
    rng = np.random.default_rng(0)
    interacted = [np.sort(rng.choice(np.arange(1, 301), size=n, replace=False)) for n in (5, 150, 250)]
    neg = M.sample_negatives(interacted, n_items=300, n=100, seed=7)
    assert neg.shape == (3, 100)
    for seen, row in zip(interacted, neg):
        used = row[row != 0]
        assert not set(used) & set(seen)
        assert len(set(used)) == len(used)  # without replacement
        assert used.min() >= 1 and used.max() <= 300
    assert (neg[2] != 0).sum() == 300 - len(interacted[2])  # fewer eligible than asked: all of them
    assert np.array_equal(neg, M.sample_negatives(interacted, 300, 100, seed=7))
    assert not np.array_equal(neg, M.sample_negatives(interacted, 300, 100, seed=8))


# --- leave-one-out ----------------------------------------------------------------------------------------
def _log() -> list[Interaction]:
    return [
        Interaction("u1", "c", None, 30.0),
        Interaction("u1", "a", None, 10.0),
        Interaction("u2", "x", None, 5.0),
        Interaction("u1", "b", None, 20.0),
        Interaction("u1", "d", None, 30.0),  # same second as "c": file order says c, then d
        Interaction("u2", "y", None, 6.0),  # u2 has only 2 items: dropped
        Interaction("u3", "a", None, 1.0),
        Interaction("u3", "a", None, 2.0),  # a repeat: dropped, keeps the first
        Interaction("u3", "b", None, 3.0),
        Interaction("u3", "e", None, 4.0),
    ]


def test_leave_one_out_order_ids_and_stats() -> None:
    split = leave_one_out(_log())
    assert split.user_ids == ("u1", "u3")
    assert split.item_ids == ("", "a", "b", "c", "d", "e")  # 0 = padding; data order, not file order
    idx = {i: k for k, i in enumerate(split.item_ids)}
    assert split.train[0].tolist() == [idx["a"], idx["b"]]
    assert (split.valid[0], split.test[0]) == (idx["c"], idx["d"])
    assert split.train[1].tolist() == [idx["a"]]
    assert (split.valid[1], split.test[1]) == (idx["b"], idx["e"])
    s = split.stats
    assert (s.users_in, s.users, s.users_dropped, s.interactions_dropped, s.repeats_dropped) == (3, 2, 1, 2, 1)
    assert (s.items, s.train_interactions) == (5, 3)
    assert leave_one_out(list(reversed(_log()))).item_ids == split.item_ids  # ids don't depend on file order


def test_test_item_never_reaches_training_or_validation_history() -> None:
    rng = np.random.default_rng(1)
    log = [Interaction(f"u{u}", f"i{rng.integers(60)}", None, float(rng.integers(0, 1000)))
           for u in range(40) for _ in range(rng.integers(1, 30))]
    split = leave_one_out(log)
    data = split.training_data()
    valid, test = split.phase("valid"), split.phase("test")
    assert not hasattr(data, "test") and not hasattr(data, "test_targets")
    for u in range(split.n_users):
        t = split.test[u]
        assert t not in data.train[u] and t != data.valid_targets[u]
        assert t not in valid.histories[u]
        assert t not in test.histories[u]
        assert split.valid[u] not in valid.histories[u]
        assert test.histories[u].tolist() == data.train[u].tolist() + [split.valid[u]]
        # the test item is the user's latest new item (repeats count at their first time)
        first: dict[str, float] = {}
        for it in log:
            if it.user_id == split.user_ids[u]:
                first[it.item_id] = min(first.get(it.item_id, it.timestamp), it.timestamp)
        assert first[split.item_ids[t]] == max(first.values())
    assert (data.item_counts()[1:].sum()) == split.stats.train_interactions


def test_user_sampling_is_seeded() -> None:
    a = sample_user_indices(100, 10, seed=1)
    assert np.array_equal(a, sample_user_indices(100, 10, seed=1)) and len(set(a)) == 10
    assert not np.array_equal(a, sample_user_indices(100, 10, seed=2))
    assert np.array_equal(sample_user_indices(5, None, 0), np.arange(5))
    sliced = restrict_users(_log(), 1, seed=0)
    assert len({it.user_id for it in sliced}) == 1 and sliced[0].user_id in {"u1", "u3"}
