"""What every stage of a retrain cycle shares: the cycle's context (settings, registry, catalogue, events and the
window geometry), its result, and the registry's record of which datasets a version was trained on."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from retrain.gate import GateDecision
from retrain.recent import DataWindow
from streams.datasets import Item
from streams.registry import ModelRegistry
from streams.settings import Settings

log = logging.getLogger("retrain.cycle")

DATA_DIR = "data"  # <registry>/data: the cycles' rationale datasets
K = 10

Publish = Callable[..., None]
"""``publish(action="promote", version=..., reason=...)``: announce a promotion (e.g. a ModelUpdate event)."""
Progress = Callable[[str], None]
CycleStatus = Literal["promoted", "rejected", "dry_run", "skipped"]


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
    ranker: dict[str, Any] | None = Field(None, description="The cycle's ranker candidate (retrain/ranker_cycle.py).")



@dataclass
class CycleContext:
    """One cycle's inputs, fixed before the first stage runs. ``window``: items per prompt;
    ``n_targets``: next items that score a training window's teacher samples; ``holdout``: a user's last
    events kept out of training (a held-out user's evaluation targets)."""

    settings: Settings
    registry: ModelRegistry
    catalogue: dict[str, Item]
    events: list[Any]
    data_window: DataWindow
    drift_reason: Any  # as JSON (drift_reason_json)
    parent: str | None  # the serving version: what the candidate continues from and is gated against
    say: Progress
    window: int
    n_targets: int
    holdout: int
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def create(cls, settings: Settings, *, registry: ModelRegistry, events: Iterable[Any],
               catalogue: Mapping[str, Item] | Sequence[Item], drift_reason: Any, data_window: DataWindow | None,
               progress: Progress | None) -> CycleContext:
        cat = dict(catalogue) if isinstance(catalogue, Mapping) else {it.item_id: it for it in catalogue}
        events = list(events)
        return cls(settings=settings, registry=registry, catalogue=cat, events=events,
                   data_window=data_window or DataWindow.of_events(events),
                   drift_reason=drift_reason_json(drift_reason), parent=registry.current(),
                   say=progress or (lambda message: log.info("retrain: %s", message)),
                   window=settings.retrain.window_size or settings.worker.window_size,
                   n_targets=settings.retrain.targets, holdout=settings.retrain.holdout_events)

    @property
    def need(self) -> int:
        """Recent events a user needs to take part: window + targets + held-out events."""
        return self.window + self.n_targets + self.holdout

    @cached_property
    def item_ids(self) -> tuple[str, ...]:
        """The catalogue in a fixed order, index 0 the padding item (the rationale job's layout)."""
        return ("",) + tuple(sorted(self.catalogue))

    @cached_property
    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    @property
    def data_dir(self) -> Path:
        return self.registry.root / DATA_DIR

    def done(self, status: CycleStatus, why: str, **fields: Any) -> CycleResult:
        return CycleResult(status=status, reason=why, data_window=self.data_window, drift_reason=self.drift_reason,
                           parent_version=self.parent, wall_s=round(time.perf_counter() - self.started, 3),
                           **fields)


def drift_reason_json(reason: Any) -> Any:
    """The manifest's ``drift_reason``: the decision as JSON, or ``"scheduled"``."""
    if reason is None:
        return "scheduled"
    if isinstance(reason, BaseModel):
        return reason.model_dump(mode="json")
    if isinstance(reason, Mapping):
        return json.loads(json.dumps(dict(reason), default=str))
    return str(reason)



def registry_relative(path: Path, root: Path) -> str:
    """``path`` as a manifest stores it: relative to the registry when it lies inside it."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path.resolve())


def registry_absolute(path: str, root: Path) -> Path:
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


__all__ = ["DATA_DIR", "K", "CycleContext", "CycleResult", "CycleStatus", "Progress", "Publish", "drift_reason_json",
           "registry_absolute", "registry_relative", "version_datasets"]
