"""Non-neural baselines for offline evaluation: random, popularity, item-kNN. All are :class:`~models.rankers.Ranker`s.

They are fitted on training sequences only (``TrainingData.train``): the validation item a user's test-phase
history contains is used as *input* at scoring time, but never counted into popularity or co-occurrence, so
every method sees the same training data.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from streams.splits import TrainingData


class RandomRanker:
    """Uniform random scores (seeded): the floor every method must clear."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.n_items = 0

    def fit(self, data: TrainingData) -> None:
        self.n_items = data.n_items

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        # Seeded by the users themselves, so a user's scores do not depend on how the harness batches users.
        out = np.empty((len(users), self.n_items + 1), dtype=np.float32)
        for row, u in enumerate(users):
            out[row] = np.random.default_rng([self.seed, int(u)]).random(self.n_items + 1, dtype=np.float32)
        return out


class PopularityRanker:
    """Items by number of training interactions, the same list for everyone (history items are excluded by
    the harness). Strong on MovieLens, whose test items are themselves popular."""

    name = "popularity"

    def __init__(self) -> None:
        self.counts = np.zeros(1, dtype=np.float32)

    def fit(self, data: TrainingData) -> None:
        self.counts = data.item_counts().astype(np.float32)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


class ItemKNNRanker:
    """Item-based collaborative filtering: cosine similarity between items' columns of the binary user-item
    matrix (training interactions), each item keeping its ``neighbours`` most similar items; a user's score
    for item j is the sum over history items h of sim(h, j).

    The similarity matrix is dense, (n_items + 1)², which is 55 MB for ML-1M's 3.7k items; a catalogue of
    ~50k items or more would need a sparse top-k build instead.
    """

    def __init__(self, neighbours: int | None = 100) -> None:
        self.neighbours = neighbours
        self.name = "item-kNN" if neighbours is None else f"item-kNN (k={neighbours})"
        self.sim = np.zeros((1, 1), dtype=np.float32)

    def fit(self, data: TrainingData) -> None:
        n_cols = data.n_items + 1
        rows = np.repeat(np.arange(data.n_users), [len(t) for t in data.train])
        cols = np.concatenate(data.train) if data.train else np.zeros(0, dtype=np.int64)
        x = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(data.n_users, n_cols))
        x.data[:] = 1.0  # binary even if a pair were listed twice
        co = (x.T @ x).toarray().astype(np.float32)  # co-occurrence counts
        norms = np.sqrt(np.diag(co)).copy()
        norms[norms == 0] = 1.0  # items with no training interactions: similarity 0 to everything
        sim = co / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)  # an item is not its own neighbour
        sim[0, :] = sim[:, 0] = 0.0
        if self.neighbours is not None and self.neighbours < n_cols - 1:
            # Keep each row's top-k: pruning the long tail of tiny similarities removes noise (usually helps).
            drop = np.argpartition(-sim, self.neighbours, axis=1)[:, self.neighbours:]
            np.put_along_axis(sim, drop, 0.0, axis=1)
        self.sim = sim

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        n_cols = self.sim.shape[0]
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols = np.concatenate(histories) if len(histories) else np.zeros(0, dtype=np.int64)
        h = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(len(histories), n_cols))
        return np.asarray(h @ self.sim, dtype=np.float32)
