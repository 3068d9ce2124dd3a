"""The ``served`` method of the harness: a registry ranker version scored exactly as the worker serves it.

Same artifact, same :class:`~models.served_ranker.ServedRanker`, the same history a worker would hold (the
newest ``worker.window_size`` items; the ranker reads at most its ``max_len``), users without a rationale in
the store get the null vector, as a worker serves a user whose first rationale is not written yet. So the
figure the report gives for ``served`` is the offline quality of what the stream publishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.ranker_artifact import load_ranker
from models.served_ranker import ServedRanker
from streams.splits import TrainingData


class ServedRankerMethod:
    """A :class:`~models.rankers.Ranker` over a saved ranker; ``fit`` only maps the dataset's item indices."""

    def __init__(self, path: Path, version: str | None, window_size: int) -> None:
        self.path = Path(path)
        self.ranker = ServedRanker(load_ranker(self.path), version=version)
        self.window_size = window_size
        self.name = f"served ranker {version or self.path.name} ({self.ranker.artifact.manifest.get('name')})"
        self._to_ranker: np.ndarray | None = None
        self._from_ranker: np.ndarray | None = None
        self.unknown_items = 0

    def fit(self, data: TrainingData) -> None:
        """Align the dataset's item indices with the ranker's (the same ids, possibly another order)."""
        index = self.ranker.index
        to_ranker = np.asarray([index.get(i, 0) for i in data.item_ids], dtype=np.int64)
        to_ranker[0] = 0
        self.unknown_items = int((to_ranker[1:] == 0).sum())
        self._to_ranker = to_ranker

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self._to_ranker is None:
            raise RuntimeError("ServedRankerMethod.score called before fit")
        windows = [self._to_ranker[np.asarray(h, dtype=np.int64)[-self.window_size:]] for h in histories]
        windows = [w[w > 0] for w in windows]  # items the ranker does not know, as a worker skips them
        s = self.ranker.scores(windows)
        out = s[:, self._to_ranker]  # back to the dataset's columns; unknown items take the padding's -inf
        out[:, 0] = -np.inf
        return out

    def summary(self) -> dict[str, Any]:
        m = self.ranker.artifact.manifest
        return {"path": str(self.path), "version": self.ranker.version, "window_size": self.window_size,
                "unknown_items": self.unknown_items, "config": m.get("config"), "trained_on": m.get("dataset"),
                "training": m.get("training"), "metrics_at_training": m.get("metrics")}


__all__ = ["ServedRankerMethod"]
