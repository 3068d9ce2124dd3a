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
            "student": runtime.student.model_version if runtime.student else None,
            # Table state is complete only once changelog recovery has finished.
            "recovery_completed": app.tables.recovery.completed.is_set(),
            "assigned_partitions": len(app.assignor.assigned_actives()),
            "uptime_s": round(time.time() - runtime.started_at, 1),
        })


@app.page("/metrics/")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        return self.json(dict(runtime.metrics))


@app.page("/window/{user_id}/")
@app.table_route(table=windows, match_info="user_id")
async def get_window(web: View, request: Request, user_id: str) -> Response:
    state = windows.get(user_id)
    if state is None:
        return web.json({"error": f"no window for user {user_id!r}"}, status=404)
    return web.json(state)
