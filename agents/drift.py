"""Drift check: every ``drift.check_every_s`` seconds ask this worker's DriftMonitor to decide; a decision
goes to the ``drift-decisions`` topic (JSON :class:`streams.drift.DriftDecision`, key ``<host>:<pid>``) and to
the log, at most once per ``drift.cooldown_s``. Deciding what to do about it (retrain) is a consumer's job.

The monitor is fed by the agents (``runtime.observe_event`` in the window agent, ``on_recommendation`` where a
recommendation goes out, ``on_rationale`` where a rationale is stored); each call is O(1) and a decision is
O(genres), so everything here runs on the loop without blocking it.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from agents.state import runtime
from streams.app import app, drift_topic, settings

log = logging.getLogger(__name__)
WORKER_KEY = f"{socket.gethostname()}:{os.getpid()}".encode()


@app.timer(interval=settings.drift.check_every_s)
async def check_drift() -> None:
    if not runtime.models_ready.is_set():
        return
    runtime.metrics["drift_checks"] += 1
    try:
        decision = runtime.drift.decide()
    except Exception:
        runtime.drift_failed("decide")
        return
    if decision is None:
        return
    now = time.monotonic()
    last = runtime.drift_last_published
    if last is not None and now - last < settings.drift.cooldown_s:
        runtime.metrics["drift_decisions_suppressed"] += 1
        return
    runtime.drift_last_published = now
    runtime.drift_last_decision = decision.model_dump(mode="json")
    await drift_topic.send(key=WORKER_KEY, value=decision.model_dump_json().encode())
    runtime.metrics["drift_decisions_published"] += 1
    log.warning("drift detected for %s after %d events: %s", decision.model_version, decision.events_seen,
                ", ".join(f"{f.signal}={f.value:.3f} > {f.threshold}" for f in decision.fired))
