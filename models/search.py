"""A small, budgeted hyper-parameter search for SASRec on the validation split (after Gorse's model search:
a few seeded random trials inside a time budget, the best by validation NDCG@10 kept).

Only the validation phase is looked at (history = the training sequence, target = the validation item); the test
items are never seen. The first trial is always the given configuration, so the search can only match or beat
the default on validation; the winner is the trained model itself (no refit), with every trial in ``summary()``.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from models.sasrec import SASRecConfig, SASRecRanker
from streams.splits import TrainingData

# What most changes SASRec between datasets of MovieLens scale: capacity, regularisation and step size.
SPACE: dict[str, Sequence[Any]] = {
    "dim": (32, 64, 128),
    "dropout": (0.1, 0.2, 0.3, 0.5),
    "lr": (5e-4, 1e-3, 2e-3),
    "weight_decay": (0.0, 1e-4),
}


@dataclass
class Trial:
    params: dict[str, Any]
    valid_ndcg10: float
    best_epoch: int | None
    epochs: int
    seconds: float


class TunedSASRec:
    """A :class:`~models.rankers.Ranker`: ``trials`` SASRec fits (``budget_s`` seconds in all), the best by
    validation NDCG@10 serves."""

    def __init__(self, base: SASRecConfig | None = None, *, trials: int = 4, budget_s: float = 1800.0,
                 space: dict[str, Sequence[Any]] | None = None, seed: int = 0,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        if trials < 1:
            raise ValueError("trials must be at least 1")
        self.base = base or SASRecConfig()
        self.trials = trials
        self.budget_s = budget_s
        self.space = space or SPACE
        self.seed = seed
        self.progress = progress
        self.best: SASRecRanker | None = None
        self.log: list[Trial] = []
        self.name = "SASRec (tuned on validation)"

    def candidates(self) -> list[dict[str, Any]]:
        """The default first, then seeded draws from the grid without repeats."""
        grid = [dict(zip(self.space, values)) for values in itertools.product(*self.space.values())]
        default = {k: getattr(self.base, k) for k in self.space}
        rest = [g for g in grid if g != default]
        random.Random(self.seed).shuffle(rest)
        return [default, *rest][: self.trials]

    def fit(self, data: TrainingData) -> None:
        started = time.monotonic()
        best_score = -1.0
        candidates = self.candidates()
        for n, params in enumerate(candidates):
            left = self.budget_s - (time.monotonic() - started)
            if n and left <= 0:
                break
            # Each trial gets an equal share of what is left; early stopping may hand time back to the next.
            share = left / (len(candidates) - n)
            cfg = replace(self.base, **params, time_budget_s=share if self.base.time_budget_s is None
                          else min(share, self.base.time_budget_s))
            ranker = SASRecRanker(cfg, progress=self._say(n))
            t0 = time.monotonic()
            ranker.fit(data)
            score = max((e.valid_ndcg10 for e in ranker.history if e.valid_ndcg10 is not None), default=-1.0)
            self.log.append(Trial(params, score, ranker.best_epoch, len(ranker.history), time.monotonic() - t0))
            if score > best_score:
                best_score, self.best = score, ranker
            else:
                del ranker

    def _say(self, n: int) -> Callable[[str, int, int], None] | None:
        if self.progress is None:
            return None
        progress = self.progress
        return lambda msg, done, total: progress(f"trial {n + 1}/{self.trials}: {msg}", done, total)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.best is None:
            raise RuntimeError("TunedSASRec.score called before fit")
        return self.best.score(users, histories)

    def summary(self) -> dict[str, Any]:
        out = self.best.summary() if self.best is not None else {}
        out["search"] = {"budget_s": self.budget_s, "trials": [asdict(t) for t in self.log],
                         "chosen": None if self.best is None else {k: getattr(self.best.cfg, k) for k in self.space}}
        return out


__all__ = ["SPACE", "Trial", "TunedSASRec"]
