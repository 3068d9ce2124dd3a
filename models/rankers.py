"""Rankers: turn what we know about a user into one query vector for the item index.

ID-agnostic SLIM retrieves items by the similarity of their text embedding to the embedding of the
user's rationale, which works for items no interaction has ever touched (cold start). The stream blends
in the user's most recent items so a brand-new event moves the recommendations before the student has
caught up (fast path), with weights from settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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
