"""Build :class:`Recommendation` s for users' windows: the part both paths share, batched.

With a trained ranker (the ranker registry's CURRENT, :mod:`agents.ranker_slot`): the ranker's top-K over the
catalogue for the user's window, its input the user's latest rationale vector (fast path: the stored one,
whatever window it was written for; slow path: the one just written for this window); a window with no item the
ranker knows gets its training popularity order. Without one (nothing promoted yet, or
``retrieval.ranker=text``): the text ranker, the rationale vector blended with the embeddings of the newest window
items, against the items' text vectors. Either way the items already in the window are excluded, and each
answer names the ranker version and the student that served it.

A user who set a preference (PUT /v1/users/{id}/preference) has it folded into that input
(``retrieval.preference_mode``: averaged with the rationale vector, or instead of it).

One call serves a whole batch of users with a few store round trips (their rationales; for the text ranker the
union of their recent items' vectors and one batched search) and one batched ranker call, so the cost of
answering a backlog grows with the users in it, not with its events.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agents.ranker_slot import Served
from agents.runtime import Runtime
from models.rankers import blend_query, recent_items_vector
from streams.events import Recommendation, RecommendationPath, RecommendedItem, make_recommendation_id
from streams.registry import TEXT_RANKER
from streams.window import WindowState
from vectorstore.store import rationale_key

Rationale = tuple[np.ndarray, dict]


async def build_recommendations(
    rt: Runtime,
    states: Sequence[WindowState],
    path: RecommendationPath,
    rationales: Mapping[str, Rationale] | None = None,
    k: int | None = None,
    id_extra: str = "",
) -> list[Recommendation]:
    """One recommendation per state, in order. ``rationales``: user -> (vector, payload) to use instead of
    the stored ones (the slow path's fresh rationales); users missing from it are looked up in the store.
    ``k``: items per answer (default ``retrieval.top_k``; the pull API asks for more to filter them);
    ``id_extra``: what else the answer's recommendation_id depends on (the pull API's filters)."""
    if not states:
        return []
    assert rt.store is not None
    given = dict(rationales or {})
    lookup = [st.user_id for st in states if st.user_id not in given]
    stored = await rt.in_store(rt.store.get_rationales, lookup) if lookup else {}
    chosen = [given.get(st.user_id) or stored.get(st.user_id) for st in states]
    if rt.preference_users > 0:
        prefs = await rt.in_store(rt.store.get_preferences, [st.user_id for st in states])
        if prefs:
            mode = rt.settings.retrieval.preference_mode
            chosen = [with_preference(r, prefs.get(st.user_id), mode) for st, r in zip(states, chosen)]
    k = k or rt.settings.retrieval.top_k
    arms = [rt.arm(st.user_id) for st in states]
    # One ranker call per ranker in use: every user's arm picks it (taken once per batch, so a swap during it
    # does not mix versions within a user's answer).
    groups: dict[int, tuple[Served | None, list[int]]] = {}
    for n, arm in enumerate(arms):
        served = rt.rankers.served_for(arm)
        groups.setdefault(id(served), (served, []))[1].append(n)
    ranked: list[tuple[list[RecommendedItem], str]] = [([], TEXT_RANKER)] * len(states)
    for served, members in groups.values():
        sub_states, sub_chosen = [states[n] for n in members], [chosen[n] for n in members]
        answers = (await _rank(rt, served, sub_states, sub_chosen, k) if served is not None
                   else await _text_rank(rt, sub_states, sub_chosen, k))
        for n, answer in zip(members, answers):
            ranked[n] = answer
    now = time.time()
    out = []
    for st, (items, label), rationale, arm in zip(states, ranked, chosen, arms):
        payload = rationale[1] if rationale else {}
        student_backend = rt.student_for(arm)
        student = student_backend.model_version if student_backend is not None else None
        rec_id = make_recommendation_id(st.user_id, st.version, path.value, label, student,
                                        payload.get("window_version"), f"{id_extra}|arm={arm or ''}")
        out.append(Recommendation(
            user_id=st.user_id,
            items=items,
            rationale=payload.get("rationale", ""),
            rationale_model_version=payload.get("model_version"),
            rationale_window_version=payload.get("window_version"),
            rationale_current=bool(payload) and rationale_key(payload) == st.key,
            window_version=st.version,
            last_event_timestamp=st.last_event_timestamp,
            produced_at=now,
            path=path,
            ranker_version=label,
            student_version=student,
            recommendation_id=rec_id,
            arm=arm,
        ))
    return out


async def publish_recommendations(rt: Runtime, topic: Any, recs: Sequence[Recommendation]) -> None:
    """Send each answer keyed by its user, and record it (the pull API's newest, attribution, the drift
    judge; ``recommendations_<path>`` counted): every path sends its answers through here."""
    for rec in recs:
        await topic.send(key=rec.user_id.encode(), value=rec.model_dump_json().encode())
        rt.observe_recommendation(rec)
        rt.metrics[f"recommendations_{rec.path.value}"] += 1


def with_preference(rationale: Rationale | None, preference: Rationale | None, mode: str) -> Rationale | None:
    """The ranker's rationale input with the user's preference: both unit vectors averaged (blend) or the
    preference alone (replace). The payload stays the rationale's: its text is the explanation, and whether
    it is current still says whether the student has read the newest window."""
    if preference is None:
        return rationale
    pref = preference[0] / (float(np.linalg.norm(preference[0])) or 1.0)
    if rationale is None or mode == "replace":
        return pref.astype(np.float32), (rationale[1] if rationale else {})
    mixed = rationale[0] / (float(np.linalg.norm(rationale[0])) or 1.0) + pref
    norm = float(np.linalg.norm(mixed))
    return (mixed / norm if norm > 0 else pref).astype(np.float32), rationale[1]


async def _rank(rt: Runtime, served: Served, states: Sequence[WindowState],
                chosen: Sequence[Rationale | None], k: int) -> list[tuple[list[RecommendedItem], str]]:
    """The trained ranker's top-K per window; the popularity fallback where it knows no window item."""
    assert rt.store is not None
    windows = [st.item_ids for st in states]
    vectors = [None if r is None else r[0] for r in chosen]
    ranked = await rt.rankers.rank(served, rt.store, windows, vectors, k)
    # Validated construction: pydantic 2's (compiled) __init__ costs 0.7 us an item here, model_construct 1.7 us.
    item = RecommendedItem
    out = []
    for window, hits in zip(windows, ranked):
        if hits is None:
            rt.metrics["recommendations_popular_fallback"] += 1
            popular = rt.rankers.popular(served, window, k)
            out.append(([item(item_id=i, score=float(k - n), title=served.titles.get(i, i))
                         for n, i in enumerate(popular)], f"popular+{served.version}"))
            continue
        out.append(([item(item_id=h.item_id, score=float(h.score), title=served.titles.get(h.item_id, h.item_id))
                     for h in hits if math.isfinite(h.score)], served.label))  # the check validation did
    return out


async def _text_rank(rt: Runtime, states: Sequence[WindowState],
                     chosen: Sequence[Rationale | None], k: int) -> list[tuple[list[RecommendedItem], str]]:
    """The text ranker: rationale + recent items' text vectors against the items' text vectors."""
    s = rt.settings
    assert rt.store is not None
    store = rt.store
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
    for st, rationale in zip(states, chosen):
        ids = recent[st.user_id]
        query = blend_query(rationale[0] if rationale else None,
                            recent_items_vector(ids, item_vectors, s.retrieval.fast_path_recent_items, s.retrieval.recency_decay),
                            s.retrieval.rationale_weight)
        if query is None or not np.all(np.isfinite(query)):
            slots.append(None)
            continue
        slots.append(len(queries))
        queries.append((query, st.item_ids))
    results = await rt.in_store(store.search_items_batch, queries, k) if queries else []
    return [([] if slot is None else
             [RecommendedItem(item_id=h.item_id, score=float(h.score), title=h.title) for h in results[slot]],
             TEXT_RANKER) for slot in slots]
