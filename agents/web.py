"""HTTP views on the worker (Faust's web server): health (``/healthz/``, ``/livez``, ``/readyz``), the counters
(``/stats/`` as JSON, ``/metrics`` in the Prometheus text format) and a user's window (any worker answers: it
proxies to the owner)."""

from __future__ import annotations

import time
from typing import Any

from faust.web import Request, Response, View

from agents.routing import at_owner
from agents.state import owned_partitions, runtime
from agents.telemetry import CONTENT_TYPE
from streams.ab import ARMS, arm_report
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
            "in_recovery": app.tables.recovery.in_recovery,  # reading changelogs after a rebalance, now
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


def telemetry_state() -> dict[str, Any]:
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
        "attribution": {"impressions": dict(runtime.attribution.impressions),
                        "responses": dict(runtime.attribution.responses)},
        "ab": {arm: dict(c) for arm, c in runtime.arms.counts.items()},
        "versions": {"student": runtime.model_version, "ranker": runtime.rankers.version or "text",
                     "registry_version": runtime.student_version or "base", **_arm_b_versions()},
    }


def _arm_b_versions() -> dict[str, str]:
    if not runtime.settings.ab.enabled:
        return {}
    student, served = runtime.student_for("b"), runtime.rankers.served_for("b")
    return {"ab_student_b": student.model_version if student else "none",
            "ab_ranker_b": served.version if served else "text"}


runtime.telemetry.watch(telemetry_state)


@app.page("/metrics")
class Prometheus(View):
    """The Prometheus text format (agents/telemetry.py); the same counters as JSON at ``/stats/``."""

    async def get(self, request: Request) -> Response:
        return self.bytes(runtime.telemetry.exposition(), content_type=CONTENT_TYPE.split(";")[0])


@app.page("/stats/")
class Stats(View):
    async def get(self, request: Request) -> Response:
        return self.json(stats_snapshot())


@app.page("/metrics/")
class Metrics(View):
    """``/stats/`` under its old name (scripts and dashboards written before ``/metrics`` was Prometheus)."""

    async def get(self, request: Request) -> Response:
        return self.json(stats_snapshot())


def stats_snapshot() -> dict[str, Any]:
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
        "attribution": runtime.attribution.snapshot(),
        "api_cached_users": len(runtime.recent),
        "ab": ab_snapshot(),
    }


def ab_snapshot() -> dict[str, Any]:
    """The experiment's settings, each arm's versions and this worker's per-arm figures (streams/ab.py)."""
    ab = runtime.settings.ab
    if not ab.enabled:
        return {"enabled": False}
    versions = {}
    for arm in ARMS:
        student, served = runtime.student_for(arm), runtime.rankers.served_for(arm)
        versions[arm] = {"student": student.model_version if student else None,
                         "ranker": served.label if served else "text-cosine"}
    return {"enabled": True, "salt": ab.salt, "share_b": ab.share_b, "versions": versions,
            **arm_report(runtime.arms.counts)}


@app.page("/window/{user_id}/")
async def get_window(web: View, request: Request, user_id: str) -> Response:
    routed = await at_owner(web, request, user_id)
    if routed is not None:
        return routed
    state = windows.get(user_id)
    if state is None:
        return web.json({"error": f"no window for user {user_id!r}"}, status=404)
    return web.json(state)
