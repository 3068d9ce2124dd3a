"""Rankers: turn what we know about a user into one query vector for the item index.

ID-agnostic SLIM retrieves items by the similarity of their text embedding to the embedding of the
user's rationale, which works for items no interaction has ever touched (cold start). The stream blends
in the user's most recent items so a brand-new event moves the recommendations before the student has
caught up (fast path), with weights from settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from streams.splits import TrainingData


def _normalise(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def recent_items_vector(
    window_item_ids: Sequence[str], item_vectors: Mapping[str, np.ndarray], max_items: int, decay: float
) -> np.ndarray | None:
    """Recency-weighted mean of the newest ``max_items`` window items that have a vector."""
    vecs, weights = [], []
    for age, item_id in enumerate(reversed(window_item_ids)):
        if len(vecs) >= max_items:
            break
        v = item_vectors.get(item_id)
        if v is not None:
            vecs.append(np.asarray(v, dtype=np.float32))
            weights.append(decay**age)
    if not vecs:
        return None
    return _normalise(np.average(np.stack(vecs), axis=0, weights=np.asarray(weights)))


def blend_query(
    rationale_vector: np.ndarray | None, recent_vector: np.ndarray | None, rationale_weight: float
) -> np.ndarray | None:
    """Convex blend of the two unit vectors; whichever exists alone is used as is."""
    if rationale_vector is None and recent_vector is None:
        return None
    if rationale_vector is None:
        return recent_vector
    if recent_vector is None:
        return _normalise(np.asarray(rationale_vector, dtype=np.float32))
    r = _normalise(np.asarray(rationale_vector, dtype=np.float32))
    return _normalise(rationale_weight * r + (1.0 - rationale_weight) * recent_vector)


# --- offline evaluation: the Ranker protocol --------------------------------------------------------------
# Every method the evaluation harness (evaluation/harness.py) compares implements this: the baselines
# (models/baselines.py, models/sasrec.py), the text ranker below, and later the rationale-based SLIM methods.
# Item indices are the contiguous ones of streams.splits (0 = padding); score arrays have n_items + 1
# columns so that column i is item i.


@runtime_checkable
class Ranker(Protocol):
    """A recommender under offline evaluation.

    ``fit`` receives only training sequences and validation targets (never test targets). ``score`` receives
    user indices and, for each, the history the model may see in the current phase (validation: the training
    sequence; test: training sequence + validation item), oldest first. It returns float scores of shape
    ``(len(users), n_items + 1)``, higher = better; column 0 (padding) and history items are ignored by the
    harness, so a ranker need not mask them. The harness calls ``score`` in batches of users.
    """

    name: str

    def fit(self, data: "TrainingData") -> None: ...

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray: ...


@runtime_checkable
class UserVectors(Protocol):
    """Turns (users, the histories they may be judged on) into one query vector per user, in the item-text
    embedding space. The rationale-based SLIM methods implement this: prompt the (student) LLM with the
    history, embed the rationale. ``fit`` may precompute (e.g. generate rationales for a user sample)."""

    name: str

    def fit(self, data: "TrainingData") -> None: ...

    def __call__(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray: ...


class HistoryMeanVectors:
    """The mean of the text vectors of a user's last ``max_items`` history items, renormalised.

    No LLM: this is the floor a rationale has to beat, since the rationale is written from the same items.
    """

    def __init__(self, item_vectors: np.ndarray, max_items: int | None = None) -> None:
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.max_items = max_items
        self.name = "item-text mean (no LLM)" if max_items is None else f"item-text mean of last {max_items} (no LLM)"

    def fit(self, data: "TrainingData") -> None:
        """Nothing to learn."""

    def __call__(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        out = np.zeros((len(histories), self.item_vectors.shape[1]), dtype=np.float32)
        for row, hist in enumerate(histories):
            recent = hist if self.max_items is None else hist[-self.max_items:]
            if len(recent):
                out[row] = _normalise(self.item_vectors[recent].mean(axis=0))
        return out


class TextRanker:
    """ID-agnostic retrieval: cosine between a per-user query vector and every item's text vector.

    ``item_vectors`` is ``(n_items + 1, dim)`` with unit rows (row 0, padding, is ignored). The query comes
    from ``user_vectors``: :class:`HistoryMeanVectors` now, a rationale embedding for SLIM. Nothing here uses
    item ids or interaction counts, so it ranks never-interacted items exactly like popular ones.
    """

    def __init__(self, item_vectors: np.ndarray, user_vectors: UserVectors, name: str | None = None) -> None:
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.user_vectors = user_vectors
        self.name = name or user_vectors.name

    def fit(self, data: "TrainingData") -> None:
        if self.item_vectors.shape[0] != data.n_items + 1:
            raise ValueError(f"{self.item_vectors.shape[0]} item vectors for {data.n_items} items + padding")
        self.user_vectors.fit(data)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        queries = np.asarray(self.user_vectors(users, histories), dtype=np.float32)
        return queries @ self.item_vectors.T

    def summary(self) -> dict:
        summary = getattr(self.user_vectors, "summary", None)
        return summary() if summary is not None else {}
