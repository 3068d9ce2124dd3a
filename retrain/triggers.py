"""When the retrain job runs a cycle: every ``--every`` and early when a drift decision arrives on the drift topic."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Callable
from typing import Any

from retrain.context import CycleResult
from streams.kafka_auth import client_options
from streams.settings import Settings

log = logging.getLogger("retrain.cycle")

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"90s"``, ``"30m"``, ``"1h"``, ``"1h30m"``, ``"1.5h"``, ``"2d"``. Raises ValueError."""
    import re

    raw = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise ValueError(f"bad duration {text!r}: use a number and a unit, e.g. 90s, 30m, 1h, 1h30m")
    seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"bad duration {text!r}: must be more than 0")
    return seconds


def drift_topic_name(settings: Settings) -> str:
    return settings.kafka.topic_drift


def parse_drift_message(value: bytes) -> Any:
    """A drift topic message as a :class:`DriftDecision` when it is one (or wraps one under ``decision``),
    else its JSON; None when it is not JSON."""
    from streams.drift import DriftDecision

    try:
        data = json.loads(value)
    except (ValueError, TypeError):
        return None
    for candidate in (data, data.get("decision") if isinstance(data, dict) else None):
        if isinstance(candidate, dict) and "fired" in candidate:
            try:
                return DriftDecision.model_validate(candidate)
            except ValueError:
                pass
    return data


async def watch_drift(settings: Settings, on_decision: Callable[[Any], None],
                      ready: asyncio.Event | None = None) -> bool:
    """Call ``on_decision`` for every new message on the drift topic (groupless consumer from the end).
    Returns False at once (after setting ``ready``) when the topic does not exist: the caller keeps its timer."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    topic = drift_topic_name(settings)
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), group_id=None,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            log.info("retrain: no drift topic %r: waking on the timer only", topic)
            return False
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # resolve "end" now, so a decision sent after `ready` is seen
        if ready is not None:
            ready.set()
        async for msg in consumer:
            decision = parse_drift_message(msg.value)
            if decision is not None:
                on_decision(decision)
        return True
    finally:
        if ready is not None:
            ready.set()
        await consumer.stop()


async def retrain_every(interval_s: float, cycle: Callable[[Any], CycleResult], settings: Settings | None, *,
                        on_result: Callable[[CycleResult], None] | None = None,
                        on_error: Callable[[BaseException], None] | None = None,
                        max_cycles: int | None = None) -> None:
    """Run ``cycle(drift_reason)`` (in a thread) now and then every ``interval_s``, and early when a drift
    decision arrives on the drift topic (``settings`` None: timer only). A decision that arrives during a
    cycle starts the next one right after it. ``on_error``: a failed cycle is reported and the loop goes on."""
    wake = asyncio.Event()
    pending: list[Any] = []

    def on_decision(decision: Any) -> None:
        pending.append(decision)
        wake.set()

    watcher: asyncio.Task[bool] | None = None
    if settings is not None:
        ready = asyncio.Event()
        watcher = asyncio.create_task(watch_drift(settings, on_decision, ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if watcher.done() and watcher.exception() is not None:
            log.warning("retrain: drift topic unavailable (%s): waking on the timer only", watcher.exception())
    reason: Any = None
    n = 0
    try:
        while True:
            try:
                result = await asyncio.to_thread(cycle, reason)
                if on_result is not None:
                    on_result(result)
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(exc)
            n += 1
            if max_cycles is not None and n >= max_cycles:
                return
            if not pending:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=interval_s)
                except TimeoutError:
                    pass
            reason = pending[-1] if pending else None
            pending.clear()
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


__all__ = ["drift_topic_name", "parse_drift_message", "parse_duration", "retrain_every", "watch_drift"]
