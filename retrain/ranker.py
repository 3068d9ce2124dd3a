"""Train, judge and publish a ranker version: ``slimstream train-ranker`` and the first run of ``slimstream up``.

Stages (each a function): split the interactions leave-one-out; fit the SLIM recommender (by default the
ID-based SASRec backbone over the worker's window length, so it is trained on the histories it will serve);
write the artifact into a staging directory of the ranker registry; load it back through the serving class and
score the test phase exactly as a worker would (history = the newest ``worker.window_size`` items); gate it
against popularity on the same users and against the serving version; publish it, promote it if asked and
announce the change to the workers.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models import metrics as M
from models.ranker_artifact import load_ranker, save_ranker
from models.served_ranker import ServedRanker
from models.slim_rec import RationaleInputs, SLIMRecConfig, SLIMRecRanker
from streams.datasets import item_text, load_interactions, load_items
from streams.registry import ModelRegistry
from streams.settings import Settings
from streams.splits import LeaveOneOutSplit, leave_one_out, restrict_users

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RankerSpec:
    """What to train. ``max_len`` None: the worker's window (``worker.window_size``)."""

    items: Literal["id", "text", "id+text"] = "id"
    max_len: int | None = None
    epochs: int = 200
    minutes: float | None = 30.0  # training time budget (None: until early stopping)
    patience: int = 5
    seed: int = 0
    limit_users: int | None = None  # a seeded slice of the users (quick runs, tests)
    checkpoint_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # other SLIMRecConfig fields (dim, lr, ...)


@dataclass
class RankerResult:
    version: str | None  # None: not published (dry run)
    promoted: bool
    manifest: dict[str, Any]
    reason: str


def split_for(source: str, spec: RankerSpec) -> LeaveOneOutSplit:
    interactions = load_interactions(source)
    if spec.limit_users is not None:
        interactions = restrict_users(interactions, spec.limit_users, spec.seed)
    split = leave_one_out(interactions)
    if split.n_users == 0:
        raise ValueError(f"{source}: no user has at least {split.stats.min_interactions} interactions")
    return split


def item_text_vectors(settings: Settings, source: str, item_ids: Sequence[str]) -> np.ndarray:
    """[n + 1, dim] the catalogue's text vectors by index (the worker's item collection holds the same ones)."""
    from models.encoder import load_encoder

    encoder = load_encoder(settings)
    catalogue = {it.item_id: it for it in load_items(source)}
    texts = [item_text(catalogue[i]) if i in catalogue else i for i in item_ids[1:]]
    out = np.zeros((len(item_ids), encoder.dim), dtype=np.float32)
    out[1:] = encoder.encode(texts)
    return out


def fit(settings: Settings, source: str, split: LeaveOneOutSplit, spec: RankerSpec,
        rationales: RationaleInputs | None = None, progress: Progress | None = None) -> SLIMRecRanker:
    cfg = SLIMRecConfig(**{**asdict(SLIMRecConfig()), **spec.config, "items": spec.items,
                           "max_len": spec.max_len or settings.worker.window_size, "epochs": spec.epochs,
                           "seed": spec.seed, "patience": spec.patience, "checkpoint_dir": spec.checkpoint_dir,
                           "time_budget_s": None if spec.minutes is None else spec.minutes * 60.0})
    item_text = item_text_vectors(settings, source, split.item_ids) if spec.items != "id" else None
    label = {"id": "ID-based", "text": "ID-agnostic", "id+text": "ID + text"}[spec.items]
    ranker = SLIMRecRanker(cfg, item_text=item_text, rationales=rationales,
                           name=f"SLIM {label} ({'with' if rationales is not None else 'no'} rationale)",
                           progress=(lambda msg, done, total: progress(msg)) if progress else None)
    ranker.fit(split.training_data())
    return ranker


def served_metrics(ranker: ServedRanker, split: LeaveOneOutSplit, window_size: int) -> dict[str, Any]:
    """Test-phase NDCG@10 / HR@10 (full catalogue, history excluded) of the served ranker, its input being
    the newest ``window_size`` items of each user's history, next to popularity on the same users."""
    test = split.phase("test")
    to_ranker = np.asarray([ranker.index.get(i, 0) for i in split.item_ids], dtype=np.int64)
    excluded = M.history_mask(test.histories, split.n_items + 1)
    out: dict[str, Any] = {"users": split.n_users, "window_size": window_size}
    served = np.empty((split.n_users, split.n_items + 1), dtype=np.float32)
    for start in range(0, split.n_users, 512):
        windows = [to_ranker[h[-window_size:]] for h in test.histories[start:start + 512]]
        served[start:start + len(windows)] = ranker.scores([w[w > 0] for w in windows])[:, to_ranker]
    counts = split.training_data().item_counts().astype(np.float32)
    popular = np.broadcast_to(counts, served.shape)
    for name, scores in (("served", served), ("popularity", popular)):
        g, t = M.full_rank_counts(scores, test.targets, excluded)
        out[name] = {"NDCG@10": round(float(M.ndcg_at_k(g, 10, t).mean()), 5),
                     "HR@10": round(float(M.hit_at_k(g, 10, t).mean()), 5)}
    return out


def gate(metrics: dict[str, Any], current: dict[str, Any] | None, source: str) -> tuple[bool, str]:
    """Serve it only if it beats popularity and, when the serving version was judged on the same data, it."""
    ndcg = metrics["served"]["NDCG@10"]
    pop = metrics["popularity"]["NDCG@10"]
    if not ndcg > pop:
        return False, f"NDCG@10 {ndcg:.4f} does not beat popularity {pop:.4f}"
    if current is not None and current.get("dataset") == source and current.get("metrics", {}).get("served"):
        theirs = current["metrics"]["served"]["NDCG@10"]
        if ndcg < theirs:
            return False, f"NDCG@10 {ndcg:.4f} is below the serving version's {theirs:.4f} on the same data"
    return True, f"NDCG@10 {ndcg:.4f} (popularity {pop:.4f})"


def train_ranker(settings: Settings, source: str, spec: RankerSpec, *, promote: bool = False,
                 publish: bool = True, rationales: RationaleInputs | None = None, version: str | None = None,
                 progress: Progress | None = None) -> RankerResult:
    """The whole job; with ``publish=False`` nothing is written to the registry (the metrics are returned)."""
    say = progress or (lambda msg: log.info("%s", msg))
    t0 = time.monotonic()
    say(f"loading {source}")
    split = split_for(source, spec)
    say(f"training on {split.n_users} users, {split.n_items} items")
    ranker = fit(settings, source, split, spec, rationales, say)
    registry = ModelRegistry.rankers_for_settings(settings)
    staging = registry.staging_dir()
    try:
        manifest = save_ranker(ranker, split.training_data(), staging, dataset=source,
                               extra={"window_size": settings.worker.window_size,
                                      "spec": {**asdict(spec), "checkpoint_dir": None}})
        _write_manifest(staging, manifest)
        served = ServedRanker(load_ranker(staging))
        say("scoring the test phase through the serving code")
        manifest["metrics"] = served_metrics(served, split, settings.worker.window_size)
        manifest["train_job_s"] = round(time.monotonic() - t0, 1)
        current = registry.current()
        ok, reason = gate(manifest["metrics"], registry.get(current) if current else None, source)
        manifest["gate"] = {"passed": ok, "reason": reason, "against": current}
        if not publish:
            return RankerResult(None, False, manifest, reason)
        name = registry.publish(staging, version, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    promoted = False
    if promote and ok:
        registry.promote(name, reason=f"train-ranker: {reason}")
        promoted = True
    return RankerResult(name, promoted, manifest, reason)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    import json

    from streams.registry import write_text_atomic

    write_text_atomic(path / "manifest.json", json.dumps({**manifest, "version": None}, indent=2) + "\n")


__all__ = ["RankerResult", "RankerSpec", "fit", "gate", "item_text_vectors", "served_metrics", "split_for",
           "train_ranker"]
