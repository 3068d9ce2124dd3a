"""HTTP views on the worker (Faust's web server): health (``/healthz/``, ``/livez``, ``/readyz``), the counters
(``/stats/`` as JSON, ``/metrics`` in the Prometheus text format) and a user's window (any worker answers: it
proxies to the owner)."""

from __future__ import annotations

import time
from typing import Any

from faust.exceptions import SameNode
from faust.web import Request, Response, View
from faust.web.exceptions import ServiceUnavailable

from agents.state import owned_partitions, runtime
from agents.telemetry import CONTENT_TYPE
from streams.app import app, windows


@app.page("/healthz/")
class Health(View):
    async def get(self, request: Request) -> Response:
        return self.json({
            "store_ready": runtime.store_ready.is_set(),
            "models_ready": runtime.models_ready.is_set(),
            "student": runtime.model_version,
            "model_version": runtime.model_version,
            "registry_version": runtime.student_version,
            "model_swap_in_progress": runtime.swap_in_progress,
            "ranker_version": runtime.rankers.version,
            # Table state is complete only once changelog recovery has finished.
            "recovery_completed": app.tables.recovery.completed.is_set(),
            "assigned_partitions": len(app.assignor.assigned_actives()),
            "partitions": sorted(owned_partitions()),  # of the interactions topic (= the windows it serves)
            "uptime_s": round(time.time() - runtime.started_at, 1),
        })


def _readiness() -> dict[str, bool]:
    return {
        "store_loaded": runtime.store_ready.is_set(),
        "models_loaded": runtime.models_ready.is_set(),
        "recovery_done": app.tables.recovery.completed.is_set(),
        "partitions_assigned": bool(app.assignor.assigned_actives()),
    }


@app.page("/livez")
class Live(View):
    """The process serves HTTP on its event loop: restart it only when this stops answering."""

    async def get(self, request: Request) -> Response:
        return self.json({"live": True, "uptime_s": round(time.time() - runtime.started_at, 1)})


@app.page("/readyz")
class Ready(View):
    """200 once partitions are assigned, the store and the models are loaded and recovery is done; else 503
    with what is missing (a load balancer or a rollout waits on it)."""

    async def get(self, request: Request) -> Response:
        checks = _readiness()
        ready = all(checks.values())
        return self.json({"ready": ready, **checks}, status=200 if ready else 503)


def _telemetry_state() -> dict[str, Any]:
    """What agents/telemetry.py exports at each scrape, read from the runtime and Faust's monitor."""
    monitor = app.monitor
    lag = {}
    for tp, end in list(monitor.tp_end_offsets.items()):
        committed = monitor.tp_committed_offsets.get(tp)
        if committed is not None and app.assignor.is_active(tp):
            lag[(tp.topic, tp.partition)] = max(0, end - committed)
    judge = runtime.drift.hit_rate
    return {
        "counters": dict(runtime.metrics),
        "backlog": runtime.backlog.snapshot(),
        "stale_share": runtime.stale.share(),
        "hit_rate": {"all": judge.rate(), **{v: judge.rate(v) for v in judge.versions()}},
        "lag": lag,
        "partitions": owned_partitions(),
        "versions": {"student": runtime.model_version, "ranker": runtime.rankers.version or "text",
                     "registry_version": runtime.student_version or "base"},
    }


runtime.telemetry.watch(_telemetry_state)


@app.page("/metrics")
class Prometheus(View):
    """The Prometheus text format (agents/telemetry.py); the same counters as JSON at ``/stats/``."""

    async def get(self, request: Request) -> Response:
        return self.bytes(runtime.telemetry.exposition(), content_type=CONTENT_TYPE.split(";")[0])


@app.page("/stats/")
class Stats(View):
    async def get(self, request: Request) -> Response:
        return self.json(_stats())


@app.page("/metrics/")
class Metrics(View):
    """``/stats/`` under its old name (scripts and dashboards written before ``/metrics`` was Prometheus)."""

    async def get(self, request: Request) -> Response:
        return self.json(_stats())


def _stats() -> dict[str, Any]:
    return {
        "model_swaps": 0,
        "model_swap_failures": 0,
        **runtime.metrics,
        "student_model_version": runtime.model_version,
        "last_model_swap": runtime.last_swap,
        "ranker_version": runtime.rankers.version,
        "last_ranker_swap": runtime.rankers.last_swap,
        "load": runtime.load_snapshot(),
        "drift": runtime.drift_snapshot(),
    }


async def _at_owner(web: View, request: Request, user_id: str) -> Response | None:
    """The owner's answer for ``user_id`` (proxied), or None when this worker owns the user's partition.

    Not Faust's ``table_route``: it hashes the table's *serialized* key (JSON: the id in quotes), which names
    another partition than the one the user's events (raw key bytes) and their window live on, so with two
    workers it asked the wrong one 3 times in 4 (found by benchmarks/reliability.py). The owner is looked up
    with the raw key, exactly as producers partition the user's events."""
    try:
        # The changelog partition of a window is its events' partition (co-partitioned, same count): hash the
        # raw key over the changelog's partitions, the assignor's map of who holds which.
        owner = app.assignor.key_store(windows.changelog_topic.get_topic_name(), user_id.encode())
    except KeyError:
        raise ServiceUnavailable() from None
    try:
        return await app.router._route_req(owner, web, request)  # type: ignore[attr-defined]
    except SameNode:
        return None


@app.page("/window/{user_id}/")
async def get_window(web: View, request: Request, user_id: str) -> Response:
    routed = await _at_owner(web, request, user_id)
    if routed is not None:
        return routed
    state = windows.get(user_id)
    if state is None:
        return web.json({"error": f"no window for user {user_id!r}"}, status=404)
    return web.json(state)
