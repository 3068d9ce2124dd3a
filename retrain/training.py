"""Stage 4 of a retrain cycle, *continue-train*: the serving adapter (or a fresh one on the base model) trained
for ``retrain.max_steps`` steps on the new records plus a seeded replay sample of earlier records
(``retrain.replay_fraction`` per new record, from the datasets in the serving version's manifest; never a
held-out user's), so older behaviour is not forgotten. The candidate is built in a scratch registry."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrain.context import CycleContext, registry_absolute, version_datasets
from retrain.dataset import RationaleRecord, read_records, write_records
from retrain.selection import Selection
from retrain.teaching import NewDataset
from streams.registry import ModelRegistry
from streams.settings import Settings

if TYPE_CHECKING:
    from retrain.distill import DistillConfig

log = logging.getLogger("retrain.cycle")


@dataclass(frozen=True)
class Candidate:
    """The continue-trained student, not yet in the registry."""

    version_dir: Path  # <scratch>/candidate: adapter + manifest
    train_path: Path  # new + replayed records it was trained on
    replay: list[RationaleRecord]
    replay_versions: list[str]  # the datasets the replay was drawn from


@contextmanager
def scratch_registry(registry: ModelRegistry) -> Iterator[Path]:
    """A private directory inside the registry (same file system: publishing is a rename), removed after."""
    import shutil

    scratch = registry.root / f".cycle-{uuid.uuid4().hex[:12]}"
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _replay_pool(registry: ModelRegistry, version: str | None, exclude_users: set[str]) -> tuple[list[RationaleRecord], list[str]]:
    pool: list[RationaleRecord] = []
    versions = []
    for ds in version_datasets(registry, version):
        p = registry_absolute(ds["path"], registry.root)
        if not p.is_file():
            log.warning("replay: dataset %s of %s is missing", p, version)
            continue
        versions.append(str(ds.get("version")))
        pool.extend(r for r in read_records(p) if r.user_id not in exclude_users)
    return pool, versions



def continue_train(ctx: CycleContext, selection: Selection, data: NewDataset, scratch: Path,
                   distill_config: DistillConfig | None) -> Candidate:
    """Train the candidate on ``data``'s records plus the replay sample (``distill_config`` overrides the
    ``retrain`` section's training settings)."""
    settings = ctx.settings
    pool, replay_versions = _replay_pool(ctx.registry, ctx.parent, set(selection.heldout_users))
    n_replay = min(len(pool), round(settings.retrain.replay_fraction * len(data.records)))
    replay = random.Random(settings.retrain.seed).sample(pool, n_replay) if n_replay else []
    train_path = ctx.data_dir / f"{data.version}.train.jsonl"
    write_records(train_path, data.records + replay, append=False)
    ctx.say(f"continue-training {ctx.parent or 'the base model'} on {len(data.records)} new + {len(replay)} "
            "replayed records")
    label = data.version + (f"+replay({','.join(sorted(set(replay_versions)))})" if replay else "")
    result = _distill(settings, train_path, scratch, ctx.parent, ctx.registry, distill_config, data_version=label)
    return Candidate(result.version_dir, train_path, replay, replay_versions)


def _distill(settings: Settings, train_path: Path, scratch: Path, parent: str | None, registry: ModelRegistry,
             config: DistillConfig | None, data_version: str):  # type: ignore[no-untyped-def]
    from retrain.distill import DistillConfig, distill

    config = config or DistillConfig(max_steps=settings.retrain.max_steps, lr=settings.retrain.lr,
                                     batch_size=settings.retrain.batch_size, max_seq_len=settings.retrain.max_seq_len,
                                     val_fraction=0.0, seed=settings.retrain.seed)
    resume = registry.adapter_dir(parent) if parent is not None else None
    return distill(train_path, settings, registry=ModelRegistry(scratch), config=config, resume_from=resume,
                   version="candidate", data_version=data_version)


__all__ = ["Candidate", "continue_train", "scratch_registry"]
