"""Read-only HTTP views on the worker (Faust's web server): health, counters, a user's window."""

from __future__ import annotations

import time

from faust.web import Request, Response, View

from agents.state import runtime
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
            "uptime_s": round(time.time() - runtime.started_at, 1),
        })


@app.page("/metrics/")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        return self.json({
            "model_swaps": 0,
            "model_swap_failures": 0,
            **runtime.metrics,
            "student_model_version": runtime.model_version,
            "last_model_swap": runtime.last_swap,
            "ranker_version": runtime.rankers.version,
            "last_ranker_swap": runtime.rankers.last_swap,
            "load": runtime.load_snapshot(),
            "drift": runtime.drift_snapshot(),
        })


@app.page("/window/{user_id}/")
@app.table_route(table=windows, match_info="user_id")
async def get_window(web: View, request: Request, user_id: str) -> Response:
    state = windows.get(user_id)
    if state is None:
        return web.json({"error": f"no window for user {user_id!r}"}, status=404)
    return web.json(state)
