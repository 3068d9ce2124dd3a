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
        self._columns: np.ndarray | None = None
        self.unknown_items = 0

    def fit(self, data: TrainingData) -> None:
        """Align the dataset's item indices with the ranker's (the same ids, possibly another order)."""
        self._columns = self.ranker.columns(data.item_ids)
        self.unknown_items = int((self._columns[1:] == 0).sum())

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self._columns is None:
            raise RuntimeError("ServedRankerMethod.score called before fit")
        return self.ranker.scores_in(self._columns, histories, self.window_size)

    def summary(self) -> dict[str, Any]:
        m = self.ranker.artifact.manifest
        return {"path": str(self.path), "version": self.ranker.version, "window_size": self.window_size,
                "unknown_items": self.unknown_items, "config": m.get("config"), "trained_on": m.get("dataset"),
                "training": m.get("training"), "metrics_at_training": m.get("metrics")}


__all__ = ["ServedRankerMethod"]
