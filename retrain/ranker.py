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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from models import metrics as M
from models.ranker_artifact import load_ranker, save_ranker
from models.served_ranker import ServedRanker
from models.slim_rec import RationaleInputs, SLIMRecConfig, SLIMRecRanker
from streams.datasets import Item, item_text, load_interactions, load_items
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
    # Users (seeded) whose training prefix gets a base-student rationale as the model's input; 0: none (every
    # user on the learned no-rationale vector, and the model ignores rationales when served).
    rationale_users: int = 0
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


def item_text_vectors(settings: Settings, catalogue: str | Mapping[str, Item], item_ids: Sequence[str]) -> np.ndarray:
    """[n + 1, dim] the text vectors of ``item_ids`` (index 0: padding, zero) from ``catalogue`` (a dataset name
    or items by id; an item it lacks is its id), as the worker's item collection holds them."""
    from models.encoder import load_encoder

    encoder = load_encoder(settings)
    if isinstance(catalogue, str):
        catalogue = {it.item_id: it for it in load_items(catalogue)}
    texts = [item_text(catalogue[i]) if i in catalogue else i for i in item_ids[1:]]
    out = np.zeros((len(item_ids), encoder.dim), dtype=np.float32)
    out[1:] = encoder.encode(texts)
    return out


def fit(settings: Settings, catalogue: str | Mapping[str, Item], split: LeaveOneOutSplit, spec: RankerSpec,
        rationales: RationaleInputs | None = None, progress: Progress | None = None) -> SLIMRecRanker:
    cfg = SLIMRecConfig(**{**asdict(SLIMRecConfig()), **spec.config, "items": spec.items,
                           "max_len": spec.max_len or settings.worker.window_size, "epochs": spec.epochs,
                           "seed": spec.seed, "patience": spec.patience, "checkpoint_dir": spec.checkpoint_dir,
                           "time_budget_s": None if spec.minutes is None else spec.minutes * 60.0})
    item_text = item_text_vectors(settings, catalogue, split.item_ids) if spec.items != "id" else None
    if rationales is None and spec.rationale_users > 0:
        rationales = student_rationales(settings, catalogue, split, spec.rationale_users, cfg.rationale_tail,
                                        spec.seed, progress)
    label = {"id": "ID-based", "text": "ID-agnostic", "id+text": "ID + text"}[spec.items]
    ranker = SLIMRecRanker(cfg, item_text=item_text, rationales=rationales,
                           name=f"SLIM {label} ({'with' if rationales is not None else 'no'} rationale)",
                           progress=(lambda msg, done, total: progress(msg)) if progress else None)
    ranker.fit(split.training_data())
    return ranker


def student_rationales(settings: Settings, catalogue: str | Mapping[str, Item], split: LeaveOneOutSplit, n: int,
                       tail: int, seed: int, progress: Progress | None = None) -> RationaleInputs:
    """Base-student rationales for ``n`` seeded users' training prefixes (all but their last ``tail`` training
    items: the rationale is the input of the predictions after it only), cached like the harness's."""
    from models.encoder import load_encoder
    from models.rationale_source import student_rationale_vectors
    from models.slim_rec import rationale_inputs
    from streams.splits import sample_user_indices

    if isinstance(catalogue, str):
        catalogue = {it.item_id: it for it in load_items(catalogue)}
    vecs = student_rationale_vectors(settings, split.item_ids, catalogue, load_encoder(settings), progress=progress)
    users = sample_user_indices(split.n_users, min(n, split.n_users), seed)
    if progress:
        progress(f"rationales for {len(users)} users from {vecs.generator_id} (cached under the data dir)")
    return rationale_inputs(split.training_data(), vecs, users, tail, source=vecs.generator_id)


def served_metrics(ranker: ServedRanker, split: LeaveOneOutSplit, window_size: int) -> dict[str, Any]:
    """Test-phase NDCG@10 / HR@10 (full catalogue of the split, history excluded) of a served ranker, its input
    the newest ``window_size`` items of each user's history (items it does not know skipped, as a worker does)."""
    columns = ranker.columns(split.item_ids)
    histories = split.phase("test").histories
    scores = np.empty((split.n_users, split.n_items + 1), dtype=np.float32)
    for start in range(0, split.n_users, 512):
        scores[start:start + 512] = ranker.scores_in(columns, histories[start:start + 512], window_size)
    return _ranked(scores, split)


def popularity_metrics(split: LeaveOneOutSplit) -> dict[str, Any]:
    counts = split.training_data().item_counts().astype(np.float32)
    return _ranked(np.broadcast_to(counts, (split.n_users, len(counts))), split)


def _ranked(scores: np.ndarray, split: LeaveOneOutSplit) -> dict[str, Any]:
    test = split.phase("test")
    g, t = M.full_rank_counts(scores, test.targets, M.history_mask(test.histories, split.n_items + 1))
    return {"NDCG@10": round(float(M.ndcg_at_k(g, 10, t).mean()), 5),
            "HR@10": round(float(M.hit_at_k(g, 10, t).mean()), 5)}


def judge(settings: Settings, registry: ModelRegistry, candidate: ServedRanker, split: LeaveOneOutSplit
          ) -> dict[str, Any]:
    """The candidate, popularity and the serving version, scored on the same users through the serving code."""
    window = settings.worker.window_size
    out: dict[str, Any] = {"users": split.n_users, "window_size": window,
                           "served": served_metrics(candidate, split, window), "popularity": popularity_metrics(split)}
    current = registry.current()
    if current is not None:
        try:
            out["current"] = {"version": current, **served_metrics(
                ServedRanker(load_ranker(registry.version_dir(current)), current), split, window)}
        except Exception as exc:  # an unloadable serving version must not block a good candidate
            out["current"] = {"version": current, "error": f"{type(exc).__name__}: {exc}"}
    return out


def gate(metrics: dict[str, Any], margin: float = 0.0) -> tuple[bool, str]:
    """Serve it only if it beats popularity and is not worse than the serving version (by more than ``margin``)
    on the same users."""
    ndcg = metrics["served"]["NDCG@10"]
    pop = metrics["popularity"]["NDCG@10"]
    if not ndcg > pop:
        return False, f"NDCG@10 {ndcg:.4f} does not beat popularity {pop:.4f}"
    current = metrics.get("current") or {}
    if "NDCG@10" in current:
        theirs = current["NDCG@10"]
        if ndcg < theirs - margin:
            return False, f"NDCG@10 {ndcg:.4f} is below the serving {current['version']}'s {theirs:.4f} on the same users"
        return True, f"NDCG@10 {ndcg:.4f} vs serving {current['version']} {theirs:.4f} (popularity {pop:.4f})"
    return True, f"NDCG@10 {ndcg:.4f} (popularity {pop:.4f})"


def publish_ranker(settings: Settings, registry: ModelRegistry, ranker: SLIMRecRanker, split: LeaveOneOutSplit, *,
                   dataset: str, extra: dict[str, Any], promote: bool, margin: float = 0.0, publish: bool = True,
                   version: str | None = None, say: Progress) -> RankerResult:
    """Save, reload through the serving class, judge against popularity and the serving version, publish, and
    promote when asked and the gate passes."""
    staging = registry.staging_dir()
    try:
        manifest = save_ranker(ranker, split.training_data(), staging, dataset=dataset,
                               extra={"window_size": settings.worker.window_size, **extra})
        _write_manifest(staging, manifest)
        say("scoring the test phase through the serving code")
        manifest["metrics"] = judge(settings, registry, ServedRanker(load_ranker(staging)), split)
        ok, reason = gate(manifest["metrics"], margin)
        manifest["gate"] = {"passed": ok, "reason": reason, "margin": margin}
        if not publish:
            return RankerResult(None, False, manifest, reason)
        name = registry.publish(staging, version, manifest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if promote and ok:
        registry.promote(name, reason=reason)
    return RankerResult(name, promote and ok, manifest, reason)


def train_ranker(settings: Settings, source: str, spec: RankerSpec, *, promote: bool = False,
                 publish: bool = True, rationales: RationaleInputs | None = None, version: str | None = None,
                 progress: Progress | None = None) -> RankerResult:
    """``slimstream train-ranker``: the whole job on a dataset; ``publish=False``: nothing is written."""
    say = progress or (lambda msg: log.info("%s", msg))
    say(f"loading {source}")
    split = split_for(source, spec)
    say(f"training on {split.n_users} users, {split.n_items} items")
    ranker = fit(settings, source, split, spec, rationales, say)
    return publish_ranker(settings, ModelRegistry.rankers_for_settings(settings), ranker, split, dataset=source,
                          extra={"spec": {**asdict(spec), "checkpoint_dir": None}}, promote=promote,
                          publish=publish, version=version, say=say)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    import json

    from streams.registry import write_text_atomic

    write_text_atomic(path / "manifest.json", json.dumps({**manifest, "version": None}, indent=2) + "\n")


__all__ = ["RankerResult", "RankerSpec", "fit", "gate", "item_text_vectors", "judge", "popularity_metrics",
           "publish_ranker", "served_metrics", "split_for", "student_rationales", "train_ranker"]
