"""Ranking metrics for leave-one-out evaluation (one held-out target per user, binary relevance).

Ranks
-----
A user's ranking is summarised by two counts over the *candidates* (the items being ranked besides the target):
``greater``, how many score strictly higher than the target, and ``ties``, how many score exactly the same.

* **Full ranking** — candidates are every catalogue item except padding and the items in the history the
  model was given (the standard choice: recommending what the user already has is not useful and MovieLens
  never repeats an item). Computed by :func:`full_rank_counts`.
* **Sampled ranking** — SLIM's protocol: the target against ``n`` negatives drawn (seeded) uniformly without
  replacement from the items the user *never* interacted with (:func:`sample_negatives`; the same draw is used
  for every method). Computed by :func:`sampled_rank_counts`.

Ties are resolved by *expected value under uniformly random tie-breaking*: the target is equally likely to
sit at any 0-based position ``greater .. greater + ties``. This is exact, deterministic and fair: a ranker that
gives every item the same score gets the metrics of a random ranking, not a perfect one (which "count only
strictly greater" would give) nor zero. Without ties it reduces to the usual definitions with
``rank = greater + 1``:

* ``HR@K = 1 if rank <= K`` and ``NDCG@K = 1 / log2(rank + 1) if rank <= K`` (one relevant item, so IDCG = 1).

Per-list statistics (over the top-K lists themselves):

* **coverage@K** = distinct items over all users' top-K lists / catalogue size (real items, padding excluded).
* **average recommended popularity@K** (``avg_pop``) = for each user, the mean number of *training*
  interactions of its K recommended items, then averaged over users. ``avg_pop_share`` divides that count by
  the number of users, i.e. the average fraction of users who interacted with a recommended item; it is in
  [0, 1] and comparable across datasets of different size.

Confidence intervals (:func:`mean_ci`) are 95% by default, over users, by the normal approximation
(mean ± z·sd/√n) or a seeded percentile bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

from streams.splits import PAD_ITEM  # index 0 of every item table: the padding item, never ranked


# --- ranks ------------------------------------------------------------------------------------------------
def history_mask(histories: Sequence[np.ndarray], n_columns: int) -> np.ndarray:
    """Boolean [n_users, n_columns]: True for padding (column 0) and every history item of each user."""
    mask = np.zeros((len(histories), n_columns), dtype=bool)
    mask[:, PAD_ITEM] = True
    for row, hist in enumerate(histories):
        mask[row, hist] = True
    return mask


def full_rank_counts(scores: np.ndarray, targets: np.ndarray, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(greater, ties) of each target among all non-excluded items. ``excluded`` is a boolean mask like
    :func:`history_mask`; a target that is itself excluded raises (it would make the ranking meaningless).

    NaN scores count as the lowest possible score.
    """
    scores = _clean(scores)
    rows = np.arange(len(targets))
    if excluded[rows, targets].any():
        raise ValueError("a target item is in the excluded set (history or padding)")
    t = scores[rows, targets][:, None]
    candidates = ~excluded
    candidates[rows, targets] = False  # the target is not its own competitor
    greater = ((scores > t) & candidates).sum(axis=1)
    ties = ((scores == t) & candidates).sum(axis=1)
    return greater.astype(np.int64), ties.astype(np.int64)


def sampled_rank_counts(scores: np.ndarray, targets: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(greater, ties) of each target among its sampled negatives (``negatives``: [n_users, n_neg] indices;
    entries equal to padding are unused slots, for users with fewer eligible items than requested)."""
    scores = _clean(scores)
    rows = np.arange(len(targets))
    t = scores[rows, targets][:, None]
    neg = scores[rows[:, None], negatives]
    used = negatives != PAD_ITEM
    return ((neg > t) & used).sum(axis=1).astype(np.int64), ((neg == t) & used).sum(axis=1).astype(np.int64)


def _clean(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return scores


def sample_negatives(interacted: Sequence[np.ndarray], n_items: int, n: int, seed: int) -> np.ndarray:
    """[n_users, n] negatives per user, uniform without replacement over items 1..n_items that the user never
    interacted with (``interacted[u]``: every item of user u, including held-out ones). Seeded and independent
    of anything but the arguments. A user with fewer than ``n`` eligible items gets them all, padded with 0."""
    rng = np.random.default_rng([seed, 0xE9])
    out = np.zeros((len(interacted), n), dtype=np.int64)
    for u, seen in enumerate(interacted):
        seen_set = set(int(i) for i in seen)
        eligible_n = n_items - len(seen_set - {PAD_ITEM})
        if eligible_n <= n:  # rare: take every eligible item
            pool = np.setdiff1d(np.arange(1, n_items + 1), np.fromiter(seen_set, np.int64, len(seen_set)))
            out[u, :len(pool)] = pool
            continue
        # Rejection sampling: users have seen a small part of the catalogue, so this ends quickly, and unlike
        # a permutation of the whole catalogue it costs O(n) per user.
        chosen: list[int] = []
        taken = set(seen_set)
        while len(chosen) < n:
            for c in rng.integers(1, n_items + 1, size=2 * (n - len(chosen))):
                c = int(c)
                if c not in taken:
                    taken.add(c)
                    chosen.append(c)
                    if len(chosen) == n:
                        break
        out[u] = chosen
    return out


# --- per-user metrics --------------------------------------------------------------------------------------
def _discount_prefix(k: int) -> np.ndarray:
    """D[m] = sum_{p < m} 1 / log2(p + 2): the summed discounts of the first m 0-based positions."""
    return np.concatenate(([0.0], np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))))


def hit_at_k(greater: np.ndarray, k: int, ties: np.ndarray | None = None) -> np.ndarray:
    """Per-user HR@K (the expected value under random tie-breaking; 0/1 when there are no ties)."""
    g = np.asarray(greater, dtype=np.float64)
    t = np.zeros_like(g) if ties is None else np.asarray(ties, dtype=np.float64)
    # Positions g .. g+t are equally likely; those below k are hits.
    return np.clip(np.minimum(k, g + t + 1) - g, 0, None) / (t + 1)


def ndcg_at_k(greater: np.ndarray, k: int, ties: np.ndarray | None = None) -> np.ndarray:
    """Per-user NDCG@K with one relevant item (IDCG = 1): 1/log2(rank + 1) if rank <= K, where rank =
    greater + 1; with ties, the mean of that over the tied positions."""
    g = np.asarray(greater, dtype=np.int64)
    t = np.zeros_like(g) if ties is None else np.asarray(ties, dtype=np.int64)
    prefix = _discount_prefix(k)
    lo = np.minimum(g, k)
    hi = np.minimum(g + t + 1, k)
    return (prefix[hi] - prefix[lo]) / (t + 1)


def hit_curve(greater: np.ndarray, ties: np.ndarray, max_k: int) -> np.ndarray:
    """Mean HR@K for K = 1 .. max_k."""
    return np.array([hit_at_k(greater, k, ties).mean() if len(greater) else float("nan")
                     for k in range(1, max_k + 1)])


# --- list metrics -----------------------------------------------------------------------------------------
def top_k(scores: np.ndarray, excluded: np.ndarray, k: int) -> np.ndarray:
    """[n_users, k] best items per user, best first, never an excluded item.

    Ties inside the list are ordered by item index; which of several items tied at the K-th place gets in is
    decided by numpy's (deterministic) partition. Users with fewer than k candidates get padding (0) at the end.
    """
    s = np.where(excluded, -np.inf, _clean(scores))
    k_eff = min(k, s.shape[1])
    part = np.argpartition(-s, k_eff - 1, axis=1)[:, :k_eff]
    part_scores = np.take_along_axis(s, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    best = np.take_along_axis(part, order, axis=1)
    best = np.where(np.take_along_axis(part_scores, order, axis=1) == -np.inf, PAD_ITEM, best)
    if k_eff < k:
        best = np.pad(best, ((0, 0), (0, k - k_eff)))
    return best


def coverage(lists: np.ndarray, n_items: int) -> float:
    """Distinct recommended items (padding ignored) / catalogue size."""
    distinct = np.unique(lists)
    return float(np.count_nonzero(distinct != PAD_ITEM)) / n_items if n_items else float("nan")


def average_popularity(lists: np.ndarray, item_counts: np.ndarray) -> np.ndarray:
    """Per-user mean training-interaction count of the recommended items (padding slots ignored)."""
    used = lists != PAD_ITEM
    counts = np.where(used, item_counts[lists], 0).sum(axis=1)
    n = used.sum(axis=1)
    return np.divide(counts, n, out=np.full(len(lists), np.nan), where=n > 0)


# --- confidence intervals ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A mean over users with its confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def mean_ci(values: np.ndarray, level: float = 0.95, method: Literal["normal", "bootstrap"] = "normal",
            n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Mean of per-user ``values`` (NaN ignored) and its ``level`` confidence interval.

    ``normal``: mean ± z·sd/√n (sd with n-1); fine for the hundreds-to-thousands of users we average over.
    ``bootstrap``: percentile interval of ``n_boot`` seeded resamples, for small samples or skewed values.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    n = len(v)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(v.mean())
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    if method == "normal":
        half = NormalDist().inv_cdf(0.5 + level / 2) * float(v.std(ddof=1)) / np.sqrt(n)
        return Estimate(mean, mean - half, mean + half, n)
    if method == "bootstrap":
        rng = np.random.default_rng([seed, 0xB007])
        means = np.array([v[rng.integers(0, n, n)].mean() for _ in range(n_boot)])
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return Estimate(mean, float(lo), float(hi), n)
    raise ValueError(f"unknown CI method {method!r}")
