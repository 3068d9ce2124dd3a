"""Stage 1 of a retrain cycle, *read events*: the interactions that arrived since the last cycle, from the
interactions topic (a groupless aiokafka consumer from the offsets stored in ``<registry>/retrain_state.json``)
or from a dataset (the last ``N`` events in time order), and the data window they span."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from retrain.forget import ForgetLedger, drop_forgotten
from streams.datasets import load_interactions
from streams.kafka_auth import client_options
from streams.registry import ModelRegistry, utc_now, write_text_atomic
from streams.settings import Settings

log = logging.getLogger(__name__)

RETRAIN_STATE = "retrain_state.json"
STATE_FORMAT = 1


class RecentEvent(NamedTuple):
    """One interaction read for a cycle; ``partition``/``offset`` locate it in its log (-1: unknown)."""

    user_id: str
    item_id: str
    timestamp: float
    value: float | None = None
    event_type: str | None = None
    partition: int = 0
    offset: int = -1



class DataWindow(BaseModel):
    """What a cycle read: the source, how many events, their time span and the log offsets."""

    model_config = ConfigDict(frozen=True)

    source: str = Field(description="'kafka:<topic>', 'dataset:<name or path>' or 'events'.")
    events: int
    first_timestamp: float | None = None
    last_timestamp: float | None = None
    offsets: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="partition -> {'start': first offset read, 'end': next offset to read}."
    )
    skipped_older: int = Field(0, description="Read but older than the most recent retrain_max_events: not used.")
    invalid: int = Field(0, description="Records that were not valid InteractionEvents.")
    forgotten_users: int = Field(0, description="Forget records read: those users' earlier events were dropped.")

    @classmethod
    def of_events(cls, events: Sequence[Any], source: str = "events") -> DataWindow:
        ts = [float(e.timestamp) for e in events]
        offsets: dict[str, dict[str, int]] = {}
        for e in events:
            off = int(getattr(e, "offset", -1))
            if off < 0:
                continue
            p = offsets.setdefault(str(int(getattr(e, "partition", 0))), {"start": off, "end": off + 1})
            p["start"], p["end"] = min(p["start"], off), max(p["end"], off + 1)
        return cls(source=source, events=len(events), first_timestamp=min(ts) if ts else None,
                   last_timestamp=max(ts) if ts else None, offsets=offsets)



@dataclass
class RecentEvents:
    """Events for one cycle plus what to store once they have been used."""

    events: list[RecentEvent]
    window: DataWindow
    next_offsets: dict[str, int]  # partition -> next offset to read in the next cycle
    # Users a forget control record named in this read (DELETE /v1/users/..., slimstream forget): the cycle
    # takes them off the disk too (retrain/forget.py), whoever sent the record.
    forgotten: list[str] = field(default_factory=list)



def _sort_and_cap(events: list[RecentEvent], max_events: int) -> tuple[list[RecentEvent], int]:
    events.sort(key=lambda e: (e.timestamp, e.partition, e.offset))
    if len(events) > max_events:
        return events[-max_events:], len(events) - max_events
    return events, 0



class RetrainState:
    """``<registry>/retrain_state.json``: per source, the next offsets to read and the last data window."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_registry(cls, registry: ModelRegistry) -> RetrainState:
        return cls(registry.root / RETRAIN_STATE)

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"format": STATE_FORMAT, "sources": {}}
        data = json.loads(self.path.read_text(encoding="utf-8"))
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.path}: retrain state format {data.get('format')}, this code reads {STATE_FORMAT}")
        return data

    def next_offsets(self, source: str) -> dict[str, int] | None:
        entry = self.load()["sources"].get(source)
        return None if entry is None else {str(p): int(o) for p, o in entry["next_offsets"].items()}

    def commit(self, recent: RecentEvents, *, version: str | None, status: str) -> None:
        """Store ``recent``'s next offsets and data window for its source (one atomic rename)."""
        data = self.load()
        data["sources"][recent.window.source] = {
            "next_offsets": recent.next_offsets, "window": recent.window.model_dump(mode="json"),
            "version": version, "status": status, "updated_at": utc_now()}
        write_text_atomic(self.path, json.dumps(data, indent=2) + "\n")



def dataset_source_key(data: str) -> str:
    return f"dataset:{data if data in ('ml-1m', 'ml-100k') else str(Path(data).expanduser().resolve())}"



def load_recent_from_dataset(data: str, state: RetrainState, max_events: int,
                             ledger: ForgetLedger | None = None) -> RecentEvents:
    """The dataset as one log in time order (ties: file order): the events after the stored offset, or the
    last ``max_events`` on the first cycle; at most the ``max_events`` most recent are used. Users in the
    forget ``ledger`` are left out (a dataset has no order against the forget: all their events go)."""
    source = dataset_source_key(data)
    inter = load_interactions(data)
    order = sorted(range(len(inter)), key=lambda i: (inter[i].timestamp, i))
    stored = state.next_offsets(source)
    n = len(order)
    start = min(stored.get("0", 0), n) if stored is not None else max(0, n - max_events)
    events = [RecentEvent(inter[i].user_id, inter[i].item_id, inter[i].timestamp, inter[i].rating,
                          "rating" if inter[i].rating is not None else "view", 0, pos)
              for pos, i in enumerate(order[start:], start=start)]
    if ledger is not None:
        events = ledger.keep(events)
    events, older = _sort_and_cap(events, max_events)
    ts = [e.timestamp for e in events]
    window = DataWindow(source=source, events=len(events), first_timestamp=min(ts) if ts else None,
                        last_timestamp=max(ts) if ts else None, offsets={"0": {"start": start, "end": n}},
                        skipped_older=older)
    return RecentEvents(events, window, {"0": n})



async def load_recent_from_kafka(settings: Settings, state: RetrainState, max_events: int, *,
                                 idle_s: float = 1.0, timeout_s: float = 120.0) -> RecentEvents:
    """Every event on the interactions topic after the stored offsets (first cycle: the last ``max_events``
    per partition), read with a groupless consumer until the log end and one idle poll; at most the
    ``max_events`` most recent are used. The offsets stored next are the positions actually reached (on
    Tansu the reported end offset can lag the log end; reading on to an empty poll covers that)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from streams.events import InteractionEvent, InvalidEvent, control_record

    topic = settings.kafka.topic_interactions
    source = f"kafka:{topic}"
    consumer = AIOKafkaConsumer(**client_options(settings.kafka), group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return RecentEvents([], DataWindow(source=source, events=0), state.next_offsets(source) or {})
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        stored = state.next_offsets(source) or {}
        start: dict[int, int] = {}
        for tp in tps:
            s = stored.get(str(tp.partition))
            s = max(begin[tp], end[tp] - max_events) if s is None else max(s, begin[tp])
            consumer.seek(tp, s)
            start[tp.partition] = s
        events: list[RecentEvent] = []
        invalid = forgotten = 0
        forgotten_ids: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            for tp, msgs in batch.items():
                for m in msgs:
                    try:
                        forget = control_record(m.value)
                    except InvalidEvent:
                        invalid += 1
                        continue
                    if forget is not None:
                        # In log order: every event of the user read so far came before the forget.
                        events = drop_forgotten(events, forget.user_id)
                        forgotten += 1
                        forgotten_ids.append(forget.user_id)
                        continue
                    try:
                        ev = InteractionEvent.model_validate_json(m.value)
                    except ValueError:
                        invalid += 1
                        continue
                    events.append(RecentEvent(ev.user_id, ev.item_id, ev.timestamp, ev.value, ev.event_type,
                                              tp.partition, m.offset))
            if loop.time() > deadline:
                log.warning("reading %s: stopped after %.0f s", topic, timeout_s)
                break
            if not any(batch.values()):
                positions = {tp: await consumer.position(tp) for tp in tps}
                if all(positions[tp] >= end[tp] for tp in tps):
                    break
        nxt = {str(tp.partition): int(await consumer.position(tp)) for tp in tps}
    finally:
        await consumer.stop()
    events, older = _sort_and_cap(events, max_events)
    ts = [e.timestamp for e in events]
    window = DataWindow(source=source, events=len(events), first_timestamp=min(ts) if ts else None,
                        last_timestamp=max(ts) if ts else None,
                        offsets={p: {"start": start[int(p)], "end": o} for p, o in nxt.items()},
                        skipped_older=older, invalid=invalid, forgotten_users=forgotten)
    return RecentEvents(events, window, nxt, list(dict.fromkeys(forgotten_ids)))


__all__ = ["DataWindow", "RecentEvent", "RecentEvents", "RetrainState", "dataset_source_key",
           "load_recent_from_dataset", "load_recent_from_kafka"]
