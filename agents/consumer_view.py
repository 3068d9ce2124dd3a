"""``/consumer/``: what the worker's Kafka consumer is doing, per assigned partition, for an operator asking
"why does it not consume?": Faust's flow control and its active / paused / buffered partition sets, and from
aiokafka (which Faust runs in its own thread) each partition's fetch position, whether it is paused, how many
fetched records wait in its buffer, and the fetches in flight. Read without locks from the other thread: a
diagnostic snapshot, not a consistent cut. Private attributes of Faust 0.15 and aiokafka 0.12; whatever a
version lacks is reported as missing, never raised."""

from __future__ import annotations

from typing import Any

from faust.web import Request, Response, View

from streams.app import app


def _tp(tp: Any) -> str:
    return f"{tp.topic}[{tp.partition}]"


def _tps(tps: Any) -> list[str] | None:
    return None if tps is None else sorted(_tp(tp) for tp in tps)


def consumer_snapshot() -> dict[str, Any]:
    consumer = app.consumer
    out: dict[str, Any] = {
        "flow_active": getattr(consumer, "flow_active", None),
        "flow_control_active": app.flow_control.is_active(),
        "in_recovery": app.tables.recovery.in_recovery,
        "recovery_completed": app.tables.recovery.completed.is_set(),
        "faust_active": _tps(getattr(consumer, "_active_partitions", None)),
        "faust_paused": _tps(getattr(consumer, "_paused_partitions", None)),
        "faust_buffered": _tps(getattr(consumer, "_buffered_partitions", None)),
    }
    # Where the conductor routes each input partition's records: the channels registered at the assignment and
    # how many records wait in each one's queue (a record fetched but never read by an agent sits here).
    conductor = app.topics
    routes = {}
    for tp, channels in list((getattr(conductor, "_tp_index", {}) or {}).items()):
        routes[_tp(tp)] = [{"channel": type(ch).__name__, "iterator": getattr(ch, "is_iterator", None),
                            "queued": ch.queue.qsize() if getattr(ch, "_queue", None) is not None else None}
                           for ch in list(channels)]
    out["conductor_routes"] = routes
    out["conductor_topics"] = len(getattr(conductor, "_topics", ()) or ())
    committed = getattr(consumer, "_committed_offset", {}) or {}
    read = getattr(consumer, "_read_offset", {}) or {}
    aio = getattr(getattr(consumer, "_thread", None), "_consumer", None)
    if aio is None:
        out["aiokafka"] = "missing"
        return out
    fetcher = getattr(aio, "_fetcher", None)
    records = getattr(fetcher, "_records", {}) or {}
    assignment = getattr(getattr(aio, "_subscription", None), "subscription", None)
    assignment = getattr(assignment, "assignment", None)
    partitions = []
    for tp in sorted(getattr(assignment, "tps", ()) or (), key=_tp):
        state = assignment.state_value(tp)
        buffered = records.get(tp)
        partitions.append({
            "tp": _tp(tp),
            "position": getattr(state, "_position", None),
            "paused": getattr(state, "paused", None),
            "valid_position": getattr(state, "has_valid_position", None),
            "highwater": getattr(state, "highwater", None),
            "buffered": None if buffered is None else type(buffered).__name__,
            "faust_committed": committed.get(tp),
            # The last offset Faust's fetcher handed to the agents' queues (it drops anything at or below it).
            "faust_read": read.get(tp),
        })
    out["aiokafka"] = {
        "partitions": partitions,
        "fetches_in_flight_to_nodes": sorted(getattr(fetcher, "_in_flight", ()) or ()),
        "pending_fetch_tasks": len(getattr(fetcher, "_pending_tasks", ()) or ()),
    }
    return out


@app.page("/consumer/")
class ConsumerView(View):
    async def get(self, request: Request) -> Response:
        return self.json(consumer_snapshot())
