"""Build a :class:`Recommendation` for one user's window: the part both paths share.

Fast path: the user's last rationale vector (whatever window it was written for) blended with the
embeddings of the newest window items. Slow path: the same with the rationale that was just written
for this window. Either way the items already in the window are excluded.
"""

from __future__ import annotations

import time

import numpy as np

from agents.runtime import Runtime
from models.rankers import blend_query, recent_items_vector
from streams.events import Recommendation, RecommendationPath, RecommendedItem
from streams.window import WindowState
from vectorstore.store import rationale_key


async def build_recommendation(
    rt: Runtime,
    state: WindowState,
    path: RecommendationPath,
    rationale: tuple[np.ndarray, dict] | None = None,
) -> Recommendation:
    s = rt.settings
    assert rt.store is not None
    store = rt.store
    recent_ids = state.item_ids[-s.fast_path_recent_items:]

    if rationale is None:
        rationale = await rt.in_store(store.get_rationale, state.user_id)
    item_vectors = await rt.in_store(store.get_item_vectors, recent_ids)
    unknown = [i for i in recent_ids if i not in item_vectors]
    if unknown:
        # Items the catalogue has never seen are still usable: their id is their text (ID-agnostic).
        for item_id, vec in zip(unknown, await rt.encode(unknown)):
            item_vectors[item_id] = vec
            rt.metrics["unknown_items_embedded"] += 1

    recent = recent_items_vector(recent_ids, item_vectors, s.fast_path_recent_items, s.recency_decay)
    query = blend_query(rationale[0] if rationale else None, recent, s.rationale_weight)
    hits = [] if query is None else await rt.in_store(store.search_items, query, state.item_ids, s.top_k)

    payload = rationale[1] if rationale else {}
    r_version = payload.get("window_version")
    return Recommendation(
        user_id=state.user_id,
        items=[RecommendedItem(item_id=h.item_id, score=float(h.score), title=h.title) for h in hits],
        rationale=payload.get("rationale", ""),
        rationale_model_version=payload.get("model_version"),
        rationale_window_version=r_version,
        rationale_current=bool(payload) and rationale_key(payload) == (state.epoch, state.version),
        window_version=state.version,
        last_event_timestamp=state.last_event_timestamp,
        produced_at=time.time(),
        path=path,
    )
