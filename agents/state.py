"""The worker's single :class:`Runtime`, started with the app and closed with it."""

from __future__ import annotations

import logging

from agents.runtime import Runtime
from streams.app import app, settings

log = logging.getLogger(__name__)
runtime = Runtime(settings)


@app.task
async def start_runtime() -> None:
    try:
        await runtime.start()
    except Exception:
        log.exception("worker runtime failed to start; stopping")
        await app.stop()
        raise


@app.on_shutdown.connect
async def close_runtime(app_: object, **kwargs: object) -> None:
    runtime.close()
