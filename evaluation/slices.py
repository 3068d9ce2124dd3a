"""Cold-start slices of a test phase: users by the length of the history they are judged on, and test items by
how often they were seen in training. Full-ranking HR@10 and NDCG@10 per slice, with the users it holds."""

from __future__ import annotations

from typing import Any

import numpy as np

from models import metrics as M

# (name, lowest, highest) inclusive
HISTORY_SLICES = (("history <= 5", 0, 5), ("history 6-20", 6, 20), ("history > 20", 21, None))
ITEM_SLICES = (("item unseen", 0, 0), ("item rare (1-5)", 1, 5), ("item <= 5", 0, 5), ("item popular (> 5)", 6, None))


def _in(values: np.ndarray, low: int, high: int | None) -> np.ndarray:
    return (values >= low) & (values <= high) if high is not None else values >= low


def cold_start_slices(full_greater: np.ndarray, full_ties: np.ndarray, history_lengths: np.ndarray,
                      target_train_counts: np.ndarray, *, ci: str = "normal", seed: int = 0) -> dict[str, Any]:
    """``{slice: {"users", "HR@10", "NDCG@10"}}``; the arrays are aligned per scored user."""
    hit = M.hit_at_k(full_greater, 10, full_ties)
    ndcg = M.ndcg_at_k(full_greater, 10, full_ties)
    out: dict[str, Any] = {}
    for name, low, high, values in ([(n, lo, hi, history_lengths) for n, lo, hi in HISTORY_SLICES]
                                    + [(n, lo, hi, target_train_counts) for n, lo, hi in ITEM_SLICES]):
        mask = _in(np.asarray(values), low, high)
        if not mask.any():
            out[name] = {"users": 0, "HR@10": None, "NDCG@10": None}
            continue
        out[name] = {"users": int(mask.sum()),
                     "HR@10": M.mean_ci(hit[mask], method=ci, seed=seed).as_dict(),  # type: ignore[arg-type]
                     "NDCG@10": M.mean_ci(ndcg[mask], method=ci, seed=seed).as_dict()}  # type: ignore[arg-type]
    return out


__all__ = ["HISTORY_SLICES", "ITEM_SLICES", "cold_start_slices"]
