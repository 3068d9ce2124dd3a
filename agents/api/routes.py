"""The ``/v1`` router on the worker's web server: authentication, routing to the user's owner, readiness, and
JSON in and out; what each endpoint does is in agents/api/serving.py, its bodies in agents/api/protocol.py.

==========================================  =========================================================
``GET    /v1/recommendations/{user_id}``    the user's current recommendation (``k``, ``exclude``, ``genres``)
``POST   /v1/events``                        publish one or a batch of interaction events (all or none)
``GET    /v1/users/{user_id}``              the user's window and rationale
``DELETE /v1/users/{user_id}``              forget the user (the ``forget`` control record)
``PUT    /v1/users/{user_id}/preference``   set the user's own preference text (``DELETE``: remove it)
==========================================  =========================================================
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

from faust.web import Request, Response, View
from pydantic import BaseModel

from agents.api.protocol import Problem
from agents.api.serving import (ApiError, parse_filters, parse_preference, publish_events, recommendations,
                                 request_forget, set_preference, user_view, validate_events)
from agents.routing import at_owner
from agents.state import runtime
from streams.app import app, interactions_topic, recommendations_topic, windows
from streams.events import EventLimits

log = logging.getLogger(__name__)


def _problem(view: View, exc: ApiError) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="slimstream"'} if exc.status == 401 else None
    body = Problem(error=exc.error, details=exc.details).model_dump(mode="json", exclude_none=True)
    return view.json(body, status=exc.status, headers=headers)


def authorize(request: Request) -> None:
    token = runtime.settings.api.token
    if token is None:
        return
    given = request.headers.get("Authorization", "")  # type: ignore[attr-defined]
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                             token.get_secret_value().encode()):
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <SLIMSTREAM_API_TOKEN>)")


def _require_ready(*, table: bool) -> None:
    # What the fast path needs (the store, and the encoder loaded before it), not the student: a worker that is
    # still loading its student already answers, exactly as its window agent does.
    missing = [name for name, ok in (("vector store", runtime.store_ready.is_set()),
                                     ("table recovery", not table or app.tables.recovery.completed.is_set()))
               if not ok]
    if missing:
        raise ApiError(503, f"not ready: {', '.join(missing)} still loading; retry shortly")


async def _answer(view: View, request: Request, handler: Callable[[], Awaitable[BaseModel]], *,
                  user_id: str | None = None, status: int = 200, table: bool = True) -> Response:
    try:
        authorize(request)
        if user_id is not None:
            routed = await at_owner(view, request, user_id)
            if routed is not None:
                return routed
        _require_ready(table=table)
        model = await handler()
    except ApiError as exc:
        return _problem(view, exc)
    return view.json(model.model_dump(mode="json"), status=status)


async def _body(request: Request) -> bytes:
    limit = runtime.settings.api.max_body_bytes
    size = request.content_length  # type: ignore[attr-defined]
    if size is not None and size > limit:
        raise ApiError(413, f"body of {size} bytes; at most {limit} (SLIMSTREAM_API_MAX_BODY_BYTES)")
    body = await request.read()
    if len(body) > limit:
        raise ApiError(413, f"body of {len(body)} bytes; at most {limit} (SLIMSTREAM_API_MAX_BODY_BYTES)")
    return body


@app.page("/v1/recommendations/{user_id}")
class RecommendationsView(View):
    async def get(self, request: Request, user_id: str) -> Response:
        async def handle() -> BaseModel:
            s = runtime.settings
            filters = parse_filters(request.query, s.retrieval.top_k, s.api.max_k)
            return await recommendations(runtime, user_id, windows.get(user_id), filters)

        return await _answer(self, request, handle, user_id=user_id)


@app.page("/v1/events")
class EventsView(View):
    async def post(self, request: Request) -> Response:
        async def handle() -> BaseModel:
            s = runtime.settings
            body = await _body(request)
            events = validate_events(body, EventLimits.from_settings(s), s.api.max_events)
            accepted = await publish_events(interactions_topic, events, s.api.publish_timeout_s)
            runtime.metrics["api_events_published"] += accepted.accepted
            return accepted

        try:
            return await _answer(self, request, handle, status=202, table=False)
        finally:
            runtime.metrics["api_event_requests"] += 1


@app.page("/v1/users/{user_id}")
class UsersView(View):
    async def get(self, request: Request, user_id: str) -> Response:
        async def handle() -> BaseModel:
            return await user_view(runtime, user_id, windows.get(user_id))

        return await _answer(self, request, handle, user_id=user_id)

    async def delete(self, request: Request, user_id: str) -> Response:
        # Any worker may send the record: it goes to the user's partition, whose owner applies it in order.
        async def handle() -> BaseModel:
            return await request_forget(interactions_topic, user_id, runtime.settings.api.publish_timeout_s)

        return await _answer(self, request, handle, status=202, table=False)


@app.page("/v1/users/{user_id}/preference")
class PreferenceView(View):
    async def put(self, request: Request, user_id: str) -> Response:
        async def handle() -> BaseModel:
            body = await _body(request)
            return await set_preference(runtime, user_id, windows.get(user_id), parse_preference(body),
                                        recommendations_topic)

        return await _answer(self, request, handle, user_id=user_id)

    async def delete(self, request: Request, user_id: str) -> Response:
        async def handle() -> BaseModel:
            return await set_preference(runtime, user_id, windows.get(user_id), None, recommendations_topic)

        return await _answer(self, request, handle, user_id=user_id)


__all__ = ["EventsView", "PreferenceView", "RecommendationsView", "UsersView"]
