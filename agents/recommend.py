"""Build :class:`Recommendation` s for users' windows: the part both paths share, batched.

Fast path: each user's last rationale vector (whatever window it was written for) blended with the embeddings
of the newest window items. Slow path: the same with the rationale that was just written for this window.
Either way the items already in the window are excluded.

One call serves a whole batch of users with three store round trips (their rationales, the union of their
recent items' vectors, one batched search) and at most one encoder call (items the catalogue does not know),
so the cost of answering a backlog grows with the users in it, not with its events.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from agents.runtime import Runtime
from models.rankers import blend_query, recent_items_vector
from streams.events import Recommendation, RecommendationPath, RecommendedItem
from streams.window import WindowState
from vectorstore.store import rationale_key

Rationale = tuple[np.ndarray, dict]


async def build_recommendations(
    rt: Runtime,
    states: Sequence[WindowState],
    path: RecommendationPath,
    rationales: Mapping[str, Rationale] | None = None,
) -> list[Recommendation]:
    """One recommendation per state, in order. ``rationales``: user -> (vector, payload) to use instead of
    the stored ones (the slow path's fresh rationales); users missing from it are looked up in the store."""
    if not states:
        return []
    s = rt.settings
    assert rt.store is not None
    store = rt.store
    given = dict(rationales or {})
    lookup = [st.user_id for st in states if st.user_id not in given]
    stored = await rt.in_store(store.get_rationales, lookup) if lookup else {}
    recent = {st.user_id: st.item_ids[-s.retrieval.fast_path_recent_items:] for st in states}
    wanted = list(dict.fromkeys(i for ids in recent.values() for i in ids))
    item_vectors = await rt.in_store(store.get_item_vectors, wanted) if wanted else {}
    unknown = [i for i in wanted if i not in item_vectors]
    if unknown:
        # Items the catalogue has never seen are still usable: their id is their text (ID-agnostic).
        for item_id, vec in zip(unknown, await rt.encode(unknown)):
            item_vectors[item_id] = vec
        rt.metrics["unknown_items_embedded"] += len(unknown)

    queries: list[tuple[np.ndarray, list[str]]] = []
    slots: list[int | None] = []
    chosen: list[Rationale | None] = []
    for st in states:
        rationale = given.get(st.user_id) or stored.get(st.user_id)
        chosen.append(rationale)
        ids = recent[st.user_id]
        query = blend_query(rationale[0] if rationale else None,
                            recent_items_vector(ids, item_vectors, s.retrieval.fast_path_recent_items, s.retrieval.recency_decay),
                            s.retrieval.rationale_weight)
        if query is None or not np.all(np.isfinite(query)):
            slots.append(None)
            continue
        slots.append(len(queries))
        queries.append((query, st.item_ids))
    results = await rt.in_store(store.search_items_batch, queries, s.retrieval.top_k) if queries else []

    now = time.time()
    out = []
    for st, slot, rationale in zip(states, slots, chosen):
        hits = [] if slot is None else results[slot]
        payload = rationale[1] if rationale else {}
        out.append(Recommendation(
            user_id=st.user_id,
            items=[RecommendedItem(item_id=h.item_id, score=float(h.score), title=h.title) for h in hits],
            rationale=payload.get("rationale", ""),
            rationale_model_version=payload.get("model_version"),
            rationale_window_version=payload.get("window_version"),
            rationale_current=bool(payload) and rationale_key(payload) == st.key,
            window_version=st.version,
            last_event_timestamp=st.last_event_timestamp,
            produced_at=now,
            path=path,
        ))
    return out
