"""What the ``/v1`` endpoints do, apart from HTTP (agents/api/routes.py is the thin router over these).

Everything keyed by a user runs on the worker that owns the user's partition (the router proxies there first),
so the window table and the newest published recommendation are local reads. Nothing here blocks the loop:
the store and the ranker are called through the runtime's pools, the broker through Faust's producer.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
from pydantic import ValidationError

from agents.api.protocol import (AcceptedEvent, ApiItem, EventsAccepted, ForgetAccepted, PreferenceRequest,
                                 PreferenceResponse, RecommendationsResponse, UserResponse)
from agents.recommend import build_recommendations, publish_recommendations
from agents.runtime import Runtime
from streams.events import (EventLimits, ForgetUser, InteractionEvent, InvalidEvent, Recommendation,
                            RecommendationPath, describe_validation_error, make_recommendation_id, parse_event)
from streams.window import WindowState

# Items ranked to satisfy one filtered request. A genre filter ranks (nearly) the whole catalogue so that a
# rare genre still fills k: exact up to MAX_FETCH items (ML-1M has 3,706), the best MAX_FETCH beyond that.
MAX_FETCH = 5_000
MAX_LIST_VALUES = 200  # ids in one exclude / genres parameter


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx/5xx), a reason, optional per-item details."""

    def __init__(self, status: int, error: str, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.details = details


@dataclass(frozen=True)
class Filters:
    k: int
    exclude: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()

    @property
    def filtering(self) -> bool:
        return bool(self.exclude or self.genres)

    @property
    def fetch(self) -> int:
        """How many items to rank so that k remain after the filters."""
        return MAX_FETCH if self.genres else self.k + len(self.exclude)

    def key(self) -> str:
        """What the answer's recommendation_id depends on besides the window and the versions."""
        return f"k={self.k};exclude={','.join(sorted(self.exclude))};genres={','.join(sorted(self.genres))}"

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "exclude": list(self.exclude), "genres": list(self.genres)}


def _list_param(query: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = query.get(name) or ""
    values = tuple(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))
    if len(values) > MAX_LIST_VALUES:
        raise ApiError(400, f"{name}: at most {MAX_LIST_VALUES} comma-separated values, got {len(values)}")
    return values


def parse_filters(query: Mapping[str, str], default_k: int, max_k: int) -> Filters:
    """``k`` (1..max_k, default the stream's top_k), ``exclude`` (item ids) and ``genres`` (keep items with
    any of them), comma-separated; a bad value is a 400 naming it."""
    unknown = sorted(set(query) - {"k", "exclude", "genres"})
    if unknown:
        raise ApiError(400, f"unknown query parameter(s): {', '.join(unknown)} (expected k, exclude, genres)")
    k = default_k
    if query.get("k") not in (None, ""):
        try:
            k = int(query["k"])
        except ValueError:
            raise ApiError(400, f"k: expected an integer, got {query['k']!r}") from None
        if not 1 <= k <= max_k:
            raise ApiError(400, f"k: must be between 1 and {max_k} (SLIMSTREAM_API_MAX_K), got {k}")
    return Filters(k=k, exclude=_list_param(query, "exclude"), genres=_list_param(query, "genres"))


async def _items(rt: Runtime, ranked: Sequence[tuple[str, float, str]], filters: Filters) -> list[ApiItem]:
    """The ranked (id, score, title) with their genres, the filters applied, cut to k."""
    genres = await rt.item_genres_many([i for i, _, _ in ranked])
    wanted = {g.lower() for g in filters.genres}
    excluded = set(filters.exclude)
    out = []
    for item_id, score, title in ranked:
        item_genres = genres.get(item_id, ())
        if item_id in excluded or (wanted and not wanted & {g.lower() for g in item_genres}):
            continue
        out.append(ApiItem(item_id=item_id, score=score, title=title, genres=list(item_genres)))
        if len(out) == filters.k:
            break
    return out


def _from_recommendation(rec: Recommendation, items: list[ApiItem], source: str, current: int | None,
                         filters: Filters) -> RecommendationsResponse:
    return RecommendationsResponse(
        user_id=rec.user_id, recommendation_id=rec.recommendation_id, items=items, rationale=rec.rationale,
        rationale_current=rec.rationale_current, rationale_model_version=rec.rationale_model_version,
        ranker_version=rec.ranker_version, student_version=rec.student_version, path=rec.path, source=source,
        window_version=rec.window_version, current_window_version=current, produced_at=rec.produced_at,
        age_s=round(max(0.0, time.time() - rec.produced_at), 3), filters=filters.as_dict())


async def recommendations(rt: Runtime, user_id: str, raw_window: Mapping[str, Any] | None,
                          filters: Filters) -> RecommendationsResponse:
    """The user's current recommendation: the newest one published (same items as the topic's last message)
    unless filters ask for another ranking; a user without a window gets the fallback, marked so."""
    if raw_window is None:
        return await _fallback(rt, user_id, filters)
    state = WindowState.model_validate(raw_window)
    latest = rt.recent.latest(user_id)
    if latest is not None and not filters.filtering and filters.k <= rt.settings.retrieval.top_k:
        items = await _items(rt, [(i.item_id, i.score, i.title) for i in latest.items], filters)
        return _from_recommendation(latest, items, "published", state.version, filters)
    # Filters (or nothing published by this worker since it took the partition over): rank for this request.
    rec, = await build_recommendations(rt, [state], RecommendationPath.pull, k=filters.fetch,
                                       id_extra=filters.key())
    rt.metrics["api_recommendations_computed"] += 1
    items = await _items(rt, [(i.item_id, i.score, i.title) for i in rec.items], filters)
    return _from_recommendation(rec, items, "computed", state.version, filters)


async def _fallback(rt: Runtime, user_id: str, filters: Filters) -> RecommendationsResponse:
    """An unknown user: the items trending in this worker's recent events, or (before any) the ranker's
    training popularity."""
    fetch = filters.fetch
    trending = rt.trending.top(fetch)
    served = rt.rankers.served
    kind: str
    if trending or served is None:
        kind = "trending"
        titles = await rt.in_store(rt.store.get_items, [i for i, _ in trending]) if trending and rt.store else {}
        ranked = [(i, round(c, 4), str(titles.get(i, {}).get("title", i))) for i, c in trending]
    else:
        kind = "popular"
        popular = rt.rankers.popular(served, (), fetch)
        ranked = [(i, float(len(popular) - n), served.titles.get(i, i)) for n, i in enumerate(popular)]
    items = await _items(rt, ranked, filters)
    rt.metrics["api_recommendations_fallback"] += 1
    now = time.time()
    rec_id = make_recommendation_id(user_id, 0, "fallback", kind, rt.model_version, None,
                                    f"{filters.key()}|t={int(now)}")
    return RecommendationsResponse(
        user_id=user_id, recommendation_id=rec_id, items=items, rationale="", rationale_current=False,
        ranker_version=kind, student_version=rt.model_version, path=None, source="fallback", fallback=kind,  # type: ignore[arg-type]
        window_version=None, current_window_version=None, produced_at=now, age_s=0.0, filters=filters.as_dict())


# --- events -------------------------------------------------------------------------------------------------
def _content_event_id(event: InteractionEvent) -> str:
    """An id derived from the event's content: a client that retries a batch after a timeout sends the same
    ids again, and the window applies each once."""
    basis = event.model_dump_json(include={"user_id", "item_id", "event_type", "value", "timestamp"})
    return "http-" + hashlib.sha256(basis.encode()).hexdigest()[:24]


def validate_events(body: bytes, limits: EventLimits, max_events: int) -> list[InteractionEvent]:
    """Every event of a request body (one event, an array of them, or ``{"events": [...]}``), validated with
    the Kafka contract and limits; any bad one is a 422 naming each bad event, and nothing is published."""
    try:
        doc = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    if isinstance(doc, dict) and set(doc) == {"events"}:
        doc = doc["events"]
    raw = doc if isinstance(doc, list) else [doc]
    if not raw:
        raise ApiError(422, "no events in the request")
    if len(raw) > max_events:
        raise ApiError(413, f"{len(raw)} events in one request; at most {max_events} (SLIMSTREAM_API_MAX_EVENTS)")
    events, problems = [], []
    now = time.time()
    for n, item in enumerate(raw):
        try:
            ev = parse_event(pydantic_core.to_json(item), limits, now)
        except InvalidEvent as exc:
            problems.append({"index": n, "error": str(exc)})
            continue
        events.append(ev if ev.event_id else ev.model_copy(update={"event_id": _content_event_id(ev)}))
    if problems:
        raise ApiError(422, f"{len(problems)} of {len(raw)} event(s) invalid; none was published", problems)
    return events


async def publish_events(topic: Any, events: Sequence[InteractionEvent], timeout_s: float) -> EventsAccepted:
    """Send every event keyed by its user and wait for the broker's acks. A broker failure part-way is a 503:
    the client retries the whole batch, and the events' ids make the retry apply each event once."""
    futures = [await topic.send(key=ev.user_id.encode(), value=ev.model_dump_json(exclude_none=True).encode())
               for ev in events]
    try:
        metas = await asyncio.wait_for(asyncio.gather(*futures), timeout_s)
    except Exception as exc:
        raise ApiError(503, f"the broker did not acknowledge every event ({type(exc).__name__}: {exc}); retry the "
                            "request (event ids make a retry apply each event once)") from None
    return EventsAccepted(accepted=len(events), events=[
        AcceptedEvent(event_id=ev.event_id or "", partition=m.partition, offset=m.offset)
        for ev, m in zip(events, metas)])


async def request_forget(topic: Any, user_id: str, timeout_s: float) -> ForgetAccepted:
    try:
        record = ForgetUser(control="forget", user_id=user_id, requested_at=time.time())
    except ValidationError as exc:
        raise ApiError(400, f"user_id: {describe_validation_error(exc)}") from None
    future = await topic.send(key=user_id.encode(), value=record.model_dump_json().encode())
    try:
        meta = await asyncio.wait_for(future, timeout_s)
    except Exception as exc:
        raise ApiError(503, f"the broker did not acknowledge the forget record ({type(exc).__name__}); retry") from None
    return ForgetAccepted(user_id=user_id, partition=meta.partition, offset=meta.offset)


# --- users --------------------------------------------------------------------------------------------------
async def user_view(rt: Runtime, user_id: str, raw_window: Mapping[str, Any] | None) -> UserResponse:
    assert rt.store is not None
    stored = (await rt.in_store(rt.store.get_rationales, [user_id])).get(user_id)
    pref = (await rt.in_store(rt.store.get_preferences, [user_id])).get(user_id) if rt.preference_users else None
    if raw_window is None and stored is None and pref is None:
        raise ApiError(404, f"no window and no rationale for user {user_id!r}")
    state = WindowState.model_validate(raw_window) if raw_window is not None else None
    window = list(state.items) if state else []
    titles = await rt.in_store(rt.store.get_items, [w.item_id for w in window]) if window else {}
    payload = stored[1] if stored else {}
    latest = rt.recent.latest(user_id)
    return UserResponse(
        user_id=user_id, window=window,
        window_titles={i: str(p.get("title", i)) for i, p in titles.items()},
        window_version=state.version if state else None,
        last_event_timestamp=state.last_event_timestamp if state else None,
        rationale=payload.get("rationale") if stored else None,
        rationale_model_version=payload.get("model_version"),
        rationale_window_version=payload.get("window_version"),
        latest_recommendation_id=latest.recommendation_id if latest else None,
        preference=pref[1].get("text") if pref else None)


# --- preferences --------------------------------------------------------------------------------------------
def parse_preference(body: bytes) -> str:
    """The preference text of a PUT body, whitespace collapsed; 400/422 saying why not."""
    try:
        request = PreferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        status = 400 if any(e["type"] == "json_invalid" for e in exc.errors()) else 422
        raise ApiError(status, f"invalid preference: {describe_validation_error(exc)}") from None
    text = " ".join(request.text.split())  # newlines and tabs are layout, not meaning
    if not text:
        raise ApiError(422, "invalid preference: text is blank")
    if not text.isprintable():
        bad = next(c for c in text if not c.isprintable())
        raise ApiError(422, f"invalid preference: must be printable text (found U+{ord(bad):04X})")
    return text


async def set_preference(rt: Runtime, user_id: str, raw_window: Mapping[str, Any] | None, text: str | None,
                         topic: Any) -> PreferenceResponse:
    """Store (``text``) or delete (None) the user's preference, then answer the user again on ``topic`` (the
    recommendations topic) so the topic and the pull API reflect it at once."""
    if text is None:
        await rt.drop_preference(user_id)
    else:
        vector, = await rt.encode([text])
        await rt.store_preference(user_id, vector, text)
    rt.metrics["api_preferences_set" if text is not None else "api_preferences_deleted"] += 1
    rec_id = None
    if raw_window is not None:
        rec, = await build_recommendations(rt, [WindowState.model_validate(raw_window)], RecommendationPath.pull,
                                           id_extra=f"preference={text or ''}")
        await publish_recommendations(rt, topic, [rec])
        rec_id = rec.recommendation_id
    return PreferenceResponse(user_id=user_id, preference=text, mode=rt.settings.retrieval.preference_mode,
                              recommendation_id=rec_id)


__all__ = ["ApiError", "Filters", "parse_filters", "parse_preference", "publish_events", "recommendations",
           "request_forget", "set_preference", "user_view", "validate_events"]
