"""One retrain cycle: recent interactions -> drifted users -> teacher rationales -> continue-trained student ->
held-out evaluation -> gate -> registry version (promoted or not).

:func:`run_cycle` is the cycle itself, a plain function over the recent events it is given:

a. **Drifted users.** The events become per-user, time-ordered sequences (items outside the catalogue
   dropped, a repeated item kept at its first occurrence). Users with at least ``window + targets + holdout``
   recent events are ranked by the Jensen-Shannon divergence between their recent genre mix and the serving
   version's reference (``<registry>/<CURRENT>/drift_reference.json``; else the genre mix of the windows the
   serving version was trained on; for the base model, the mix of all recent events) and capped at
   ``retrain.max_users``.
b. **Split.** A seeded ``retrain.holdout_users`` share of them is held out for evaluation only. For every
   training user, the last ``holdout`` events are left out too; of the rest, the last ``targets`` events
   are the targets and the ``window`` events before them the window. The teacher writes ``retrain.samples``
   rationales of the stream's SLIM prompt per window and the one whose embedding best retrieves the targets
   is kept (:func:`retrain.rationales.teacher_record`, the offline job's code). The records are a versioned
   ``RationaleRecord`` JSONL dataset: ``<registry>/data/<dataset_version>.jsonl`` (+ ``.meta.json``).
c. **Continue-training.** The CURRENT adapter (or a fresh one on the base model) is trained for
   ``retrain.max_steps`` steps on the new records plus a seeded replay sample of earlier records
   (``retrain.replay_fraction`` per new record, from the datasets in the serving version's manifest; never
   a held-out user's), so older behaviour is not forgotten.
d. **Evaluation.** For each held-out user: window = the ``window`` events before their last ``holdout``
   events, targets = those last events. The serving and the candidate student each write one greedy
   rationale per window; its embedding ranks every catalogue item outside the window by cosine. Each target
   is ranked with the other targets removed from the candidates (leave-one-out per target,
   :mod:`models.metrics`); NDCG@10 and HR@10 are averaged over a user's targets, then over users.
e. **Gate and registry.** :func:`retrain.gate.gate` compares the two; the candidate is published as a new
   registry version either way, its manifest holding the parent, the data window (first/last timestamp and
   topic offsets), the drift reason, both models' metrics, the gate decision and the datasets. Only a
   passing candidate is promoted (and ``publish(action="promote", ...)`` is called); a rejected one stays in
   the registry, unpromoted, its manifest saying why. Every version gets a ``drift_reference.json``: the genre
   mix of the last ``drift.window_events`` events the cycle read and the centroid of its held-out rationales
   with their count (workers use that centroid only when it rests on ``drift.min_events`` rationales, and
   otherwise take the new student's first ones).

:func:`retrain_once` wraps it for the CLI: it reads the events that arrived since the last cycle, from the
interactions topic (a groupless aiokafka consumer from the offsets stored in ``<registry>/retrain_state.json``)
or from a dataset (the last ``N`` events in time order), runs the cycle, and stores the new offsets and the
data window (atomically) once a candidate was built from them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import random
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.prompts import PROMPT_VERSION, PromptItem, build_slim_messages, prompt_item
from models import metrics as M
from retrain.dataset import DATASET_FORMAT, RationaleRecord, read_records, write_records
from streams.drift import (
    DRIFT_REFERENCE_FILE,
    DriftReference,
    GenreDistribution,
    drift_reference_path,
    js_divergence,
    read_drift_reference,
)
from retrain.gate import GateDecision, gate
from retrain.rationales import (
    RationaleWindow,
    item_vectors,
    make_window,
    teacher_record,
)
from streams.registry import ADAPTER, ModelRegistry, utc_now, write_text_atomic
from streams.datasets import Item, load_interactions, load_items
from streams.settings import ChatEndpoint, Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.student_base import StudentBackend
    from models.openai_client import ChatClient
    from retrain.distill import DistillConfig

log = logging.getLogger(__name__)

RETRAIN_STATE = "retrain_state.json"
DATA_DIR = "data"
STATE_FORMAT = 1
K = 10

Publish = Callable[..., None]
"""``publish(action="promote", version=..., reason=...)``: announce a promotion (e.g. a ModelUpdate event)."""
Progress = Callable[[str], None]
CycleStatus = Literal["promoted", "rejected", "dry_run", "skipped"]


# --------------------------------------------------------------------------------------------------------
# recent events and where they came from


RETRAIN_LOCK = ".retrain.lock"


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


def load_recent_from_dataset(data: str, state: RetrainState, max_events: int) -> RecentEvents:
    """The dataset as one log in time order (ties: file order): the events after the stored offset, or the
    last ``max_events`` on the first cycle; at most the ``max_events`` most recent are used."""
    source = dataset_source_key(data)
    inter = load_interactions(data)
    order = sorted(range(len(inter)), key=lambda i: (inter[i].timestamp, i))
    stored = state.next_offsets(source)
    n = len(order)
    start = min(stored.get("0", 0), n) if stored is not None else max(0, n - max_events)
    events = [RecentEvent(inter[i].user_id, inter[i].item_id, inter[i].timestamp, inter[i].rating,
                          "rating" if inter[i].rating is not None else "view", 0, pos)
              for pos, i in enumerate(order[start:], start=start)]
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

    from streams.events import InteractionEvent

    topic = settings.kafka.topic_interactions
    source = f"kafka:{topic}"
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None,
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
        invalid = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            for tp, msgs in batch.items():
                for m in msgs:
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
                        skipped_older=older, invalid=invalid)
    return RecentEvents(events, window, nxt)


# --------------------------------------------------------------------------------------------------------
# the result


class CycleResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: CycleStatus
    reason: str
    version: str | None = None
    parent_version: str | None = None
    promoted: bool = False
    gate: GateDecision | None = None
    candidate_metrics: dict[str, float] | None = None
    current_metrics: dict[str, float] | None = None
    data_window: DataWindow | None = None
    drift_reason: Any = "scheduled"
    dataset_version: str | None = None
    dataset_path: Path | None = None
    new_records: int = 0
    replay_records: int = 0
    eligible_users: int = 0
    train_users: list[str] = Field(default_factory=list)
    heldout_users: list[str] = Field(default_factory=list)
    reference: str | None = Field(None, description="What the users' drift was measured against.")
    published: bool = False
    publish_error: str | None = None
    wall_s: float = 0.0


# --------------------------------------------------------------------------------------------------------
# pieces of the cycle (public: tests and other jobs use them)


@dataclass(frozen=True)
class UserSequence:
    user_id: str
    events: tuple[RecentEvent, ...]  # time order, catalogue items only, an item at its first occurrence


def user_sequences(events: Iterable[Any], catalogue: Mapping[str, Item]) -> tuple[dict[str, UserSequence], int]:
    """Per-user time-ordered sequences (ties: partition, offset, input order) of catalogue items, each item
    kept at its first occurrence; and how many events named an item outside the catalogue."""
    by_user: dict[str, list[tuple[tuple[float, int, int, int], RecentEvent]]] = defaultdict(list)
    unknown = 0
    for n, e in enumerate(events):
        if e.item_id not in catalogue:
            unknown += 1
            continue
        ev = e if isinstance(e, RecentEvent) else RecentEvent(
            str(e.user_id), str(e.item_id), float(e.timestamp), getattr(e, "value", getattr(e, "rating", None)),
            getattr(e, "event_type", None), int(getattr(e, "partition", 0)), int(getattr(e, "offset", -1)))
        by_user[ev.user_id].append(((ev.timestamp, ev.partition, ev.offset, n), ev))
    out = {}
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r[0])
        seen: set[str] = set()
        seq = []
        for _, ev in rows:
            if ev.item_id not in seen:
                seen.add(ev.item_id)
                seq.append(ev)
        out[user] = UserSequence(user, tuple(seq))
    return out, unknown


def latest_in_stream_order(events: Sequence[RecentEvent], n: int) -> list[RecentEvent]:
    """The ``n`` events that arrived last: each partition's tail by offset, partitions in proportion to their
    share of ``events``. Arrival order, not event time: a replay of old data, or users whose clocks differ,
    publishes events whose timestamps say nothing about which came last."""
    if len(events) <= n:
        return list(events)
    by_partition: dict[int, list[RecentEvent]] = defaultdict(list)
    for e in events:
        by_partition[e.partition].append(e)
    out: list[RecentEvent] = []
    for part in by_partition.values():
        part.sort(key=lambda e: e.offset)
        take = max(1, round(n * len(part) / len(events)))
        out.extend(part[-take:])
    return out


def genre_mix(item_ids: Iterable[str], catalogue: Mapping[str, Item]) -> dict[str, float]:
    dist = GenreDistribution(window=None)
    for i in item_ids:
        item = catalogue.get(i)
        if item is not None:
            dist.add(item.genres)
    return dist.counts()


def rank_drifted_users(sequences: Mapping[str, UserSequence], reference: Mapping[str, float], min_events: int,
                       catalogue: Mapping[str, Item], max_users: int) -> tuple[list[tuple[str, float]], int]:
    """``[(user, JS divergence)]`` of the users with at least ``min_events`` events, most drifted first
    (ties: user id), at most ``max_users``; and how many were eligible. Users without any genre rank last."""
    scored = []
    for user, seq in sequences.items():
        if len(seq.events) < min_events:
            continue
        counts = genre_mix((e.item_id for e in seq.events), catalogue)
        score = js_divergence(counts, reference) if counts and reference else -1.0
        scored.append((user, score))
    scored.sort(key=lambda us: (-us[1], us[0]))
    return scored[:max_users], len(scored)


def split_heldout(users: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded ``(train, held_out)``: ``round(fraction * n)`` users held out, at least one on each side."""
    if len(users) < 2:
        raise ValueError("need at least two users to hold some out")
    order = sorted(users)
    random.Random(seed).shuffle(order)
    n_hold = min(len(order) - 1, max(1, round(fraction * len(order))))
    held = set(order[:n_hold])
    return [u for u in users if u not in held], [u for u in users if u in held]


def _prompt_items(events: Sequence[RecentEvent], catalogue: Mapping[str, Item]) -> list[PromptItem]:
    return [prompt_item(e.item_id, catalogue.get(e.item_id), event_type=e.event_type, value=e.value) for e in events]


def stream_messages(events: Sequence[RecentEvent], catalogue: Mapping[str, Item], settings: Settings) -> list[dict[str, str]]:
    """The SLIM prompt the stream sends for this window (titles, years, genres, event types and values)."""
    return build_slim_messages(_prompt_items(events, catalogue), settings.student.prompt_max_items)


def heldout_metrics(rationale_vecs: np.ndarray, item_vecs: np.ndarray, windows: Sequence[Sequence[int]],
                    targets: Sequence[Sequence[int]], k: int = K) -> dict[str, float]:
    """Mean over users of the mean over each user's targets of NDCG@k / HR@k, every catalogue item outside
    the window (and outside the user's other targets) ranked by cosine to the user's rationale vector. A zero
    vector (empty rationale) ties every item: it scores like a random ranking."""
    v = np.asarray(rationale_vecs, dtype=np.float32)
    v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    iv = np.asarray(item_vecs, dtype=np.float32)
    iv = iv / np.clip(np.linalg.norm(iv, axis=1, keepdims=True), 1e-12, None)
    scores = v @ iv.T
    rows, hist, tgt = [], [], []
    for u, (w, ts) in enumerate(zip(windows, targets)):
        for t in ts:
            rows.append(u)
            hist.append(np.asarray(list(w) + [x for x in ts if x != t], dtype=np.int64))
            tgt.append(int(t))
    if not rows:
        return {f"ndcg@{k}": float("nan"), f"hr@{k}": float("nan"), "users": 0, "targets": 0}
    s = scores[np.asarray(rows)]
    greater, ties = M.full_rank_counts(s, np.asarray(tgt), M.history_mask(hist, s.shape[1]))
    ndcg, hit = M.ndcg_at_k(greater, k, ties), M.hit_at_k(greater, k, ties)
    per_user_ndcg = defaultdict(list)
    per_user_hit = defaultdict(list)
    for r, n_, h in zip(rows, ndcg, hit):
        per_user_ndcg[r].append(float(n_))
        per_user_hit[r].append(float(h))
    return {f"ndcg@{k}": float(np.mean([np.mean(x) for x in per_user_ndcg.values()])),
            f"hr@{k}": float(np.mean([np.mean(x) for x in per_user_hit.values()])),
            "users": len(per_user_ndcg), "targets": len(rows)}


def _embed(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    if nonempty:
        enc = np.asarray(encoder.encode([texts[i] for i in nonempty]), dtype=np.float32)
        out[nonempty] = enc / np.clip(np.linalg.norm(enc, axis=1, keepdims=True), 1e-12, None)
    return out


def drift_reason_json(reason: Any) -> Any:
    """The manifest's ``drift_reason``: the decision as JSON, or ``"scheduled"``."""
    if reason is None:
        return "scheduled"
    if isinstance(reason, BaseModel):
        return reason.model_dump(mode="json")
    if isinstance(reason, Mapping):
        return json.loads(json.dumps(dict(reason), default=str))
    return str(reason)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def _abs(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def version_datasets(registry: ModelRegistry, version: str | None) -> list[dict[str, Any]]:
    """The rationale datasets behind ``version`` (its lineage of retrain datasets, or the records file it was
    distilled from), each ``{"version", "path", "records"}``, paths as stored (relative to the registry)."""
    if version is None or not registry.exists(version):
        return []
    manifest = registry.get(version)
    if manifest.get("datasets"):
        return list(manifest["datasets"])
    data = manifest.get("data") or {}
    return [{"version": data.get("version"), "path": data["path"], "records": data.get("records")}] if data.get("path") else []


def current_reference(registry: ModelRegistry, catalogue: Mapping[str, Item],
                      recent_items: Iterable[str]) -> tuple[dict[str, float], str]:
    """The genre mix users' drift is measured against, and where it came from."""
    current = registry.current()
    if current is not None:
        ref = read_drift_reference(registry, current)
        if ref is not None and ref.genres is not None and ref.genres.proportions:
            return dict(ref.genres.proportions), f"{current}/{DRIFT_REFERENCE_FILE}"
        windows: list[str] = []
        for ds in version_datasets(registry, current):
            p = _abs(ds["path"], registry.root)
            if p.is_file():
                windows.extend(i for r in read_records(p) for i in r.window)
        mix = genre_mix(windows, catalogue)
        if mix:
            return mix, f"{current}: training windows"
    return genre_mix(recent_items, catalogue), "recent events (no reference for the served model)"


def _replay_pool(registry: ModelRegistry, version: str | None, exclude_users: set[str]) -> tuple[list[RationaleRecord], list[str]]:
    pool: list[RationaleRecord] = []
    versions = []
    for ds in version_datasets(registry, version):
        p = _abs(ds["path"], registry.root)
        if not p.is_file():
            log.warning("replay: dataset %s of %s is missing", p, version)
            continue
        versions.append(str(ds.get("version")))
        pool.extend(r for r in read_records(p) if r.user_id not in exclude_users)
    return pool, versions


def _resolve(obj: Any, attr: str) -> Any:
    """``obj`` if it has ``attr``, else ``obj()`` (a factory), so costly things load only when needed."""
    return obj if hasattr(obj, attr) else obj()


# --------------------------------------------------------------------------------------------------------
# the cycle


def run_cycle(
    settings: Settings,
    *,
    events: Iterable[Any],
    catalogue: Mapping[str, Item] | Iterable[Item],
    teacher: ChatClient | ChatEndpoint | Callable[[], ChatClient] | None = None,
    encoder: TextEncoder | Callable[[], TextEncoder] | None = None,
    registry: ModelRegistry | None = None,
    drift_reason: Any = None,
    publish: Publish | None = None,
    data_window: DataWindow | None = None,
    dry_run: bool = False,
    max_users: int | None = None,
    distill_config: DistillConfig | None = None,
    candidate_metrics: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> CycleResult:
    """One retrain cycle over ``events`` (see the module docstring). Blocking; call it outside an event loop
    (or in a thread). Events: anything with ``user_id``, ``item_id``, ``timestamp`` (``value``/``rating``,
    ``event_type``, ``partition``, ``offset`` used when present).

    ``teacher``: a :class:`~models.openai_client.ChatClient` not yet used in another event loop, an endpoint or a
    factory (default: from the settings, answers cached under ``<data_dir>/teacher-cache``). ``encoder``: a
    text encoder or a factory (default: :func:`models.encoder.load_encoder`). ``drift_reason``: the
    :class:`~streams.drift.DriftDecision` (or its JSON) that triggered the cycle; None: ``"scheduled"``.
    ``publish``: called as ``publish(action="promote", version=..., reason=...)`` after a promotion (None:
    nothing is announced; its failure is logged and reported, the promotion stands). ``dry_run``: publish
    the candidate but never promote it. ``distill_config``: overrides the ``retrain_*`` training settings.
    ``candidate_metrics``: use these instead of measuring the candidate (an operator's or a test's override;
    the manifest says so).
    """
    started = time.perf_counter()
    say = progress or (lambda message: log.info("retrain: %s", message))
    registry = registry or ModelRegistry.for_settings(settings)
    cat = dict(catalogue) if isinstance(catalogue, Mapping) else {it.item_id: it for it in catalogue}
    events = list(events)
    data_window = data_window or DataWindow.of_events(events)
    reason_json = drift_reason_json(drift_reason)
    window = settings.retrain.window_size or settings.worker.window_size
    n_targets, holdout = settings.retrain.targets, settings.retrain.holdout_events
    need = window + n_targets + holdout
    parent = registry.current()

    def done(status: CycleStatus, why: str, **fields: Any) -> CycleResult:
        return CycleResult(status=status, reason=why, data_window=data_window, drift_reason=reason_json,
                           parent_version=parent, wall_s=round(time.perf_counter() - started, 3), **fields)

    if not events:
        return done("skipped", "no new events since the last cycle")

    # a. drifted users ------------------------------------------------------------------------------------
    sequences, unknown = user_sequences(events, cat)
    reference, reference_source = current_reference(registry, cat, (e.item_id for e in events))
    ranked, eligible = rank_drifted_users(sequences, reference, need, cat, max_users or settings.retrain.max_users)
    if len(ranked) < 2:
        return done("skipped", f"{eligible} user(s) with at least {need} recent events (window {window} + targets "
                               f"{n_targets} + held out {holdout}); a cycle needs 2", eligible_users=eligible,
                    reference=reference_source)
    users = [u for u, _ in ranked]
    train_users, heldout_users = split_heldout(users, settings.retrain.holdout_users, settings.retrain.seed)
    say(f"{len(events)} events ({unknown} outside the catalogue), {eligible} eligible users; "
        f"{len(train_users)} to train on, {len(heldout_users)} held out (drift vs {reference_source})")

    # b. teacher rationales for the training users ---------------------------------------------------------
    item_ids = ("",) + tuple(sorted(cat))
    index = {item: i for i, item in enumerate(item_ids)}
    windows: list[tuple[str, RationaleWindow, list[dict[str, str]]]] = []
    for j, user in enumerate(train_users):
        seq = list(sequences[user].events[:-holdout])
        wt = make_window([index[e.item_id] for e in seq], window, n_targets)
        if wt is None:
            continue
        cut = len(seq) - n_targets
        messages = stream_messages(seq[cut - len(wt[0]):cut], cat, settings)
        windows.append((user, RationaleWindow(user=j, window=tuple(wt[0]), targets=tuple(wt[1])), messages))

    enc: TextEncoder = _resolve(encoder, "encode") if encoder is not None else _load_encoder(settings)
    data_dir = registry.root / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dataset_version = f"retrain-{stamp}-{uuid.uuid4().hex[:6]}"
    dataset_path = data_dir / f"{dataset_version}.jsonl"
    vecs_cache = Path(settings.data.data_dir) / "item-vectors"
    vecs = item_vectors(item_ids, cat, enc, vecs_cache)
    records, teacher_id, teacher_stats = asyncio.run(_teacher_records(
        settings, teacher, windows, item_ids, cat, enc, vecs, window, dataset_version))
    write_records(dataset_path, records, append=False)
    meta = {"dataset_version": dataset_version, "format": DATASET_FORMAT, "teacher": teacher_id,
            "encoder": getattr(enc, "version", type(enc).__name__), "data_window": data_window.model_dump(mode="json"),
            "parameters": {"window_size": window, "targets": n_targets, "holdout_events": holdout,
                           "samples": settings.retrain.samples, "temperature": settings.retrain.temperature,
                           "prompt_version": PROMPT_VERSION, "prompt_max_items": settings.student.prompt_max_items},
            "counts": {"records": len(records), "windows": len(windows), "empty": len(windows) - len(records)},
            "users": {"train": train_users, "held_out": heldout_users},
            "teacher_stats": teacher_stats, "created_at": utc_now()}
    write_text_atomic(data_dir / f"{dataset_version}.meta.json", json.dumps(meta, indent=2) + "\n")
    say(f"teacher: {len(records)} outcome-filtered rationales -> {dataset_path}")
    if not records:
        return done("skipped", "the teacher returned no usable rationale", eligible_users=eligible,
                    train_users=train_users, heldout_users=heldout_users, reference=reference_source,
                    dataset_version=dataset_version, dataset_path=dataset_path)

    # c. continue-train the current adapter on new + replayed records -----------------------------------------
    pool, replay_versions = _replay_pool(registry, parent, set(heldout_users))
    n_replay = min(len(pool), round(settings.retrain.replay_fraction * len(records)))
    replay = random.Random(settings.retrain.seed).sample(pool, n_replay) if n_replay else []
    train_path = data_dir / f"{dataset_version}.train.jsonl"
    write_records(train_path, records + replay, append=False)
    scratch = registry.root / f".cycle-{uuid.uuid4().hex[:12]}"
    try:
        say(f"continue-training {parent or 'the base model'} on {len(records)} new + {len(replay)} replayed records")
        result = _distill(settings, train_path, scratch, parent, registry, distill_config,
                          data_version=dataset_version + (f"+replay({','.join(sorted(set(replay_versions)))})"
                                                          if replay else ""))
        candidate_dir = result.version_dir

        # d. evaluate both on the held-out users ---------------------------------------------------------
        eval_windows, eval_targets, eval_prompts = [], [], []
        for user in heldout_users:
            seq = sequences[user].events
            win = seq[:-holdout][-window:]
            eval_windows.append([index[e.item_id] for e in win])
            eval_targets.append([index[e.item_id] for e in seq[-holdout:]])
            eval_prompts.append(stream_messages(win, cat, settings))
        say(f"evaluating {parent or 'the base model'} and the candidate on {len(heldout_users)} held-out users")
        current_texts = _generate(settings, registry.adapter_dir(parent) if parent else None, eval_prompts)
        current_m = heldout_metrics(_embed(enc, current_texts), vecs, eval_windows, eval_targets)
        candidate_texts = _generate(settings, candidate_dir / ADAPTER, eval_prompts)
        candidate_vecs = _embed(enc, candidate_texts)
        measured = heldout_metrics(candidate_vecs, vecs, eval_windows, eval_targets)
        candidate_m = dict(candidate_metrics) if candidate_metrics is not None else measured

        # e. gate, publish, promote ----------------------------------------------------------------------
        decision = gate(candidate_m, current_m, settings.retrain.gate_margin, settings.retrain.gate_metric)
        manifest = json.loads((candidate_dir / "manifest.json").read_text(encoding="utf-8"))
        new_ds = {"version": dataset_version, "path": _rel(dataset_path, registry.root), "records": len(records)}
        lineage = [new_ds] + [d for d in version_datasets(registry, parent) if d.get("path") != new_ds["path"]]
        manifest.update({
            "parent_version": parent,
            "data_window": data_window.model_dump(mode="json"),
            "drift_reason": reason_json,
            "evaluation": {
                "protocol": f"held-out users: window = {window} events before their last {holdout}, targets = "
                            f"those {holdout}; greedy rationale, cosine vs every catalogue item outside the window "
                            f"(other targets removed per target); mean over targets, then users",
                "held_out_users": heldout_users,
                "candidate": candidate_m,
                "candidate_measured": measured,
                "candidate_source": "override" if candidate_metrics is not None else "measured",
                "current": current_m,
                "current_version": parent,
                "examples": [{"user": u, "current": c, "candidate": d}
                             for u, c, d in list(zip(heldout_users, current_texts, candidate_texts))[:2]],
            },
            "gate": decision.model_dump(mode="json"),
            "datasets": lineage,
            "retrain": {
                "dataset_version": dataset_version,
                "train_path": _rel(train_path, registry.root),
                "new_records": len(records),
                "replay_records": len(replay),
                "replay_from": sorted(set(replay_versions)),
                "train_users": train_users,
                "held_out_users": heldout_users,
                "eligible_users": eligible,
                "drift_scores": {u: round(s, 6) for u, s in ranked},
                "reference": reference_source,
                "dry_run": dry_run,
                "teacher": teacher_id,
            },
        })
        manifest["created_at"] = utc_now()
        version = registry.publish(candidate_dir, None, manifest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    # The genre reference is the stream this cycle read, i.e. the regime the new student was distilled for: its
    # last drift_window_events events in arrival order (all users), the same span the workers' live mix covers.
    # Training windows (and the replayed ones) end before the users' latest events, so after a shift they are
    # still mostly pre-shift, and a reference built from them kept the genre signal firing after a promotion.
    recent_items = [e.item_id for e in latest_in_stream_order(events, settings.drift.window_events)]
    written = candidate_vecs[np.linalg.norm(candidate_vecs, axis=1) > 0]
    mean = written.mean(axis=0) if len(written) else None
    has_centroid = mean is not None and float(np.linalg.norm(mean)) > 0
    DriftReference(
        model_version=registry.model_version(version, settings),
        genres=GenreDistribution.from_items(recent_items, cat) if genre_mix(recent_items, cat) else None,
        rationale_centroid=mean.tolist() if has_centroid else None,
        # a worker takes the centroid only if it rests on drift_min_events rationales
        rationale_samples=len(written) if has_centroid else None,
    ).save(drift_reference_path(registry, version))

    common: dict[str, Any] = {
        "version": version, "gate": decision, "candidate_metrics": candidate_m, "current_metrics": current_m,
        "dataset_version": dataset_version, "dataset_path": dataset_path, "new_records": len(records),
        "replay_records": len(replay), "eligible_users": eligible, "train_users": train_users,
        "heldout_users": heldout_users, "reference": reference_source}
    if dry_run:
        say(f"{version}: dry run, not promoted ({decision.reason})")
        return done("dry_run", f"dry run: {decision.reason}", **common)
    if not decision.promoted:
        say(f"{version}: rejected ({decision.reason})")
        return done("rejected", decision.reason, **common)
    why = f"retrain: {decision.reason}"
    registry.promote(version, reason=why)
    published, error = False, None
    if publish is not None:
        try:
            publish(action="promote", version=version, reason=why)
            published = True
        except Exception as exc:  # the promotion stands; workers pick it up on their next start
            text = " ".join(str(exc).split())
            error = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
            if progress is None:  # with a progress callback the caller reports result.publish_error itself
                log.error("retrain: %s promoted but the model update could not be published: %s", version, error)
    say(f"{version}: promoted ({decision.reason})")
    return done("promoted", decision.reason, promoted=True, published=published, publish_error=error, **common)


def _load_encoder(settings: Settings) -> TextEncoder:
    from models.encoder import load_encoder

    return load_encoder(settings)


async def _teacher_records(settings: Settings, teacher: Any, windows: Sequence[tuple[str, RationaleWindow, list]],
                           item_ids: Sequence[str], catalogue: dict[str, Item], encoder: Any, vecs: np.ndarray,
                           window_size: int, dataset_version: str) -> tuple[list[RationaleRecord], str, dict[str, Any]]:
    from models.openai_client import ChatClient
    from models.teacher import open_teacher, teacher_cache_dir
    from models.teacher import teacher_id as name_teacher

    owned = not isinstance(teacher, ChatClient)
    if teacher is None:
        client = open_teacher(settings)
    elif isinstance(teacher, ChatEndpoint):
        client = ChatClient(teacher, cache_dir=teacher_cache_dir(settings.data.data_dir), name="teacher")
    elif isinstance(teacher, ChatClient):
        client = teacher
    else:
        client = teacher()
    cfg = client.config
    teacher_id = name_teacher(cfg)
    limit = asyncio.Semaphore(2 * cfg.max_concurrency)

    async def item_vecs() -> np.ndarray:
        return vecs

    async def one(user: str, w: RationaleWindow, messages: list[dict[str, str]]) -> RationaleRecord | None:
        async with limit:
            return await teacher_record(
                w, user_id=user, item_ids=item_ids, catalogue=catalogue, teacher=client, encoder=encoder,
                item_vecs=item_vecs, samples=settings.retrain.samples, window_size=window_size,
                temperature=settings.retrain.temperature, max_tokens=settings.retrain.teacher_max_tokens,
                seed=settings.retrain.seed, teacher_id=teacher_id, dataset_version=dataset_version,
                messages=messages)

    try:
        results = await asyncio.gather(*(one(u, w, m) for u, w, m in windows))
    finally:
        if owned:
            await client.aclose()
    return [r for r in results if r is not None], teacher_id, client.stats.as_dict()


def _distill(settings: Settings, train_path: Path, scratch: Path, parent: str | None, registry: ModelRegistry,
             config: DistillConfig | None, data_version: str):  # type: ignore[no-untyped-def]
    from retrain.distill import DistillConfig, distill

    config = config or DistillConfig(max_steps=settings.retrain.max_steps, lr=settings.retrain.lr,
                                     batch_size=settings.retrain.batch_size, max_seq_len=settings.retrain.max_seq_len,
                                     val_fraction=0.0, seed=settings.retrain.seed)
    resume = registry.adapter_dir(parent) if parent is not None else None
    return distill(train_path, settings, registry=ModelRegistry(scratch), config=config, resume_from=resume,
                   version="candidate", data_version=data_version)


def _generate(settings: Settings, adapter_dir: Path | None, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Greedy rationales of the student with ``adapter_dir`` (None: the base model), on the configured backend
    (``SLIMSTREAM_STUDENT_BACKEND``), so the gate judges the weights the workers will serve: the Q8_0 export
    under llama.cpp, the LoRA adapter loaded into vLLM under ``openai``. Freed afterwards."""
    from models.student_factory import load_student

    student: StudentBackend = load_student(settings, adapter_dir=adapter_dir)
    try:
        return student.generate(prompts)
    finally:
        del student
        gc.collect()


# --------------------------------------------------------------------------------------------------------
# the CLI's cycle: load the recent events, run, store the offsets


def default_publisher(settings: Settings, registry: ModelRegistry) -> Publish:
    """Announce a promotion on the model-updates topic (``streams.model_updates``), so workers hot-swap."""

    def publish(*, action: str, version: str | None = None, reason: str = "") -> None:
        from streams.model_updates import model_update_for, publish_model_update_sync

        publish_model_update_sync(settings, model_update_for(registry, settings, action, reason))

    return publish


def retrain_once(
    settings: Settings,
    *,
    data: str | None = None,
    registry: ModelRegistry | None = None,
    teacher: Any = None,
    encoder: Any = None,
    drift_reason: Any = None,
    publish: Publish | None = None,
    dry_run: bool = False,
    max_users: int | None = None,
    max_events: int | None = None,
    distill_config: DistillConfig | None = None,
    candidate_metrics: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> CycleResult:
    """Read the events since the last cycle (``data``: a dataset, else the interactions topic), run one cycle
    on them, and store the new offsets once a candidate was built from them (not on a dry run, not when the
    cycle was skipped: those events are read again, with the newer ones, next time). The catalogue is
    ``data``'s, else ``settings.data.dataset``'s."""
    from filelock import FileLock, Timeout

    registry = registry or ModelRegistry.for_settings(settings)
    # One cycle per registry at a time (two retrain processes, or a scaled-out compose service, would read the
    # same offsets and race for the next version name); the loser skips this round instead of waiting.
    registry.root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(registry.root / RETRAIN_LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return CycleResult(status="skipped", reason=f"another retrain cycle holds {registry.root / RETRAIN_LOCK}",
                           drift_reason=drift_reason_json(drift_reason), parent_version=registry.current())
    try:
        return _retrain_locked(settings, registry, data=data, teacher=teacher, encoder=encoder,
                               drift_reason=drift_reason, publish=publish, dry_run=dry_run, max_users=max_users,
                               max_events=max_events, distill_config=distill_config,
                               candidate_metrics=candidate_metrics, progress=progress)
    finally:
        lock.release()


def _retrain_locked(settings: Settings, registry: ModelRegistry, *, data: str | None, teacher: Any, encoder: Any,
                    drift_reason: Any, publish: Publish | None, dry_run: bool, max_users: int | None,
                    max_events: int | None, distill_config: DistillConfig | None,
                    candidate_metrics: Mapping[str, float] | None, progress: Progress | None) -> CycleResult:
    state = RetrainState.for_registry(registry)
    cap = max_events or settings.retrain.max_events
    if data is not None:
        recent = load_recent_from_dataset(data, state, cap)
    else:
        recent = asyncio.run(load_recent_from_kafka(settings, state, cap))
    catalogue = load_items(data if data is not None else settings.data.dataset)
    result = run_cycle(settings, events=recent.events, catalogue=catalogue, teacher=teacher, encoder=encoder,
                       registry=registry, drift_reason=drift_reason, publish=publish, data_window=recent.window,
                       dry_run=dry_run, max_users=max_users, distill_config=distill_config,
                       candidate_metrics=candidate_metrics, progress=progress)
    if result.status in ("promoted", "rejected"):
        state.commit(recent, version=result.version, status=result.status)
    return result


# --------------------------------------------------------------------------------------------------------
# --every


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
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None,
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


__all__ = [
    "CycleResult",
    "DataWindow",
    "RecentEvent",
    "RecentEvents",
    "RetrainState",
    "current_reference",
    "dataset_source_key",
    "default_publisher",
    "drift_reason_json",
    "drift_topic_name",
    "heldout_metrics",
    "load_recent_from_dataset",
    "load_recent_from_kafka",
    "parse_drift_message",
    "parse_duration",
    "rank_drifted_users",
    "retrain_every",
    "retrain_once",
    "run_cycle",
    "split_heldout",
    "stream_messages",
    "user_sequences",
    "version_datasets",
    "watch_drift",
]
