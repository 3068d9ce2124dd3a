"""Answering a user's HTTP request on the worker that owns the user's partition: any worker takes the request,
and one that does not own the user forwards it (method, query, body and the headers that matter) and returns
the owner's answer as is.

Not Faust's ``table_route``: it hashes the table's *serialized* key (JSON: the id in quotes), which names
another partition than the one the user's events (raw key bytes) and their window live on, so with two
workers it asked the wrong one 3 times in 4 (found by benchmarks/reliability.py); and Faust's router forwards
no body. The owner is looked up with the raw key, exactly as producers partition the user's events.
"""

from __future__ import annotations

from faust.web import Request, Response, View
from faust.web.exceptions import ServiceUnavailable

from streams.app import app, windows

ROUTED_HEADER = "X-Slimstream-Routed"  # set on a forwarded request: the next hop answers, never forwards again
_FORWARDED_HEADERS = ("authorization", "content-type", "accept")
_FORWARD_TIMEOUT_S = 30.0


async def at_owner(web: View, request: Request, user_id: str) -> Response | None:
    """The owner's answer for ``user_id`` (proxied), or None when this worker owns the user's partition."""
    import aiohttp

    try:
        # The changelog partition of a window is its events' partition (co-partitioned, same count): hash the
        # raw key over the changelog's partitions, the assignor's map of who holds which.
        owner = app.assignor.key_store(windows.changelog_topic.get_topic_name(), user_id.encode())
    except KeyError:
        raise ServiceUnavailable() from None
    ident = app.router._urlident  # type: ignore[attr-defined]  # Faust's own same-node test (its _route_req's)
    if ident(owner) == ident(app.conf.canonical_url):
        return None
    if request.headers.get(ROUTED_HEADER):
        # Forwarded here, yet not ours: the assignment moved meanwhile (a rebalance). The client retries.
        return web.json({"error": "the user's partition is moving between workers; retry shortly"}, status=503,
                        headers={"Retry-After": "1"})
    raw = request  # Faust's aiohttp driver hands views the aiohttp request
    body = await raw.read() if raw.can_read_body else None  # type: ignore[attr-defined]
    headers = {k: v for k, v in raw.headers.items() if k.lower() in _FORWARDED_HEADERS}  # type: ignore[attr-defined]
    headers[ROUTED_HEADER] = "1"
    url = raw.url.with_host(owner.host).with_port(int(owner.port))  # type: ignore[attr-defined]
    try:
        async with app.http_client.request(method=raw.method, url=url, headers=headers, data=body,  # type: ignore[attr-defined]
                                           timeout=aiohttp.ClientTimeout(total=_FORWARD_TIMEOUT_S)) as resp:
            content = await resp.read()
            return web.bytes(content, content_type=resp.content_type, status=resp.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json({"error": f"the worker owning the user ({owner}) did not answer: {type(exc).__name__}"},
                        status=502)


__all__ = ["ROUTED_HEADER", "at_owner"]
