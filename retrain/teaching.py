"""Stage 3 of a retrain cycle, *write data*: the teacher's rationales for the training users' windows, kept by
outcome, as a versioned dataset.

For every training user the last ``holdout`` events are left out; of the rest, the last ``targets`` events are
the targets and the ``window`` events before them the window. The teacher writes ``retrain.samples`` rationales
of the stream's SLIM prompt per window and the one whose embedding best retrieves the targets is kept
(:func:`retrain.rationales.teacher_record`, the offline job's code). The records are a versioned
``RationaleRecord`` JSONL dataset: ``<registry>/data/<dataset_version>.jsonl`` (+ ``.meta.json``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.prompts import PROMPT_VERSION, PromptItem, build_slim_messages, prompt_item
from retrain.context import CycleContext
from retrain.dataset import DATASET_FORMAT, RationaleRecord, write_records
from retrain.rationales import RationaleWindow, item_vectors, make_window, teacher_record
from retrain.recent import RecentEvent
from retrain.selection import Selection
from streams.datasets import Item
from streams.registry import utc_now, write_text_atomic
from streams.settings import ChatEndpoint, Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder


def _prompt_items(events: Sequence[RecentEvent], catalogue: Mapping[str, Item]) -> list[PromptItem]:
    return [prompt_item(e.item_id, catalogue.get(e.item_id), event_type=e.event_type, value=e.value) for e in events]


def stream_messages(events: Sequence[RecentEvent], catalogue: Mapping[str, Item], settings: Settings) -> list[dict[str, str]]:
    """The SLIM prompt the stream sends for this window (titles, years, genres, event types and values)."""
    return build_slim_messages(_prompt_items(events, catalogue), settings.student.prompt_max_items)



@dataclass(frozen=True)
class NewDataset:
    """What the teacher wrote for this cycle, and the catalogue vectors that scored it."""

    version: str
    path: Path
    records: list[RationaleRecord]
    windows: int  # training windows sent to the teacher
    teacher_id: str
    item_vecs: np.ndarray  # ctx.item_ids' text vectors (row 0: padding)

    def summary(self) -> dict[str, Any]:
        return {"dataset_version": self.version, "dataset_path": self.path}


def training_windows(ctx: CycleContext, selection: Selection) -> list[tuple[str, RationaleWindow, list[dict[str, str]]]]:
    """``(user, window, prompt)`` of every training user with a full window before their held-out events."""
    windows = []
    for j, user in enumerate(selection.train_users):
        seq = list(selection.sequences[user].events[:-ctx.holdout])
        wt = make_window([ctx.index[e.item_id] for e in seq], ctx.window, ctx.n_targets)
        if wt is None:
            continue
        cut = len(seq) - ctx.n_targets
        messages = stream_messages(seq[cut - len(wt[0]):cut], ctx.catalogue, ctx.settings)
        windows.append((user, RationaleWindow(user=j, window=tuple(wt[0]), targets=tuple(wt[1])), messages))
    return windows


def write_dataset(ctx: CycleContext, selection: Selection, teacher: Any, encoder: TextEncoder) -> NewDataset:
    """Ask the teacher for every training window (``teacher``: a ChatClient not yet used in another event loop,
    an endpoint, a factory, or None for the configured teacher) and write the kept records and their
    ``.meta.json``."""
    settings = ctx.settings
    windows = training_windows(ctx, selection)
    ctx.data_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    version = f"retrain-{stamp}-{uuid.uuid4().hex[:6]}"
    path = ctx.data_dir / f"{version}.jsonl"
    vecs = item_vectors(ctx.item_ids, ctx.catalogue, encoder, Path(settings.data.data_dir) / "item-vectors")
    records, teacher_id, teacher_stats = asyncio.run(_teacher_records(
        settings, teacher, windows, ctx.item_ids, ctx.catalogue, encoder, vecs, ctx.window, version))
    write_records(path, records, append=False)
    meta = {"dataset_version": version, "format": DATASET_FORMAT, "teacher": teacher_id,
            "encoder": getattr(encoder, "version", type(encoder).__name__),
            "data_window": ctx.data_window.model_dump(mode="json"),
            "parameters": {"window_size": ctx.window, "targets": ctx.n_targets, "holdout_events": ctx.holdout,
                           "samples": settings.retrain.samples, "temperature": settings.retrain.temperature,
                           "prompt_version": PROMPT_VERSION, "prompt_max_items": settings.student.prompt_max_items},
            "counts": {"records": len(records), "windows": len(windows), "empty": len(windows) - len(records)},
            "users": {"train": selection.train_users, "held_out": selection.heldout_users},
            "teacher_stats": teacher_stats, "created_at": utc_now()}
    write_text_atomic(ctx.data_dir / f"{version}.meta.json", json.dumps(meta, indent=2) + "\n")
    ctx.say(f"teacher: {len(records)} outcome-filtered rationales -> {path}")
    return NewDataset(version, path, records, len(windows), teacher_id, vecs)


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


__all__ = ["NewDataset", "stream_messages", "training_windows", "write_dataset"]
