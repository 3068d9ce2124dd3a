"""A trained ranker on disk: what ``slimstream train-ranker`` and the retrain job publish and what a worker loads.

One directory per version (in the ranker registry, ``<registry>/rankers/<version>/``)::

    manifest.json    format, kind, the SLIMRecConfig, item count, rationale input, metrics, training data
    weights.pt       the network's state dict (tensors only: loaded with ``weights_only=True``)
    items.json       the item id of every index (index 0 is padding, "")
    item_text.npy    [n_items + 1, text_dim] item-text vectors, for models that read item text

A plain :class:`~models.sasrec.SASRecRanker` is stored as the ID-only :class:`~models.slim_rec.SLIMRecRanker`
without rationale input: the two networks have the same parameters, so one loader serves both.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.sasrec import SASRecRanker
from models.slim_rec import SLIMRecConfig, SLIMRecRanker, _SLIMNet
from streams.registry import write_text_atomic
from streams.splits import TrainingData

ARTIFACT_FORMAT = 1
WEIGHTS = "weights.pt"
ITEMS = "items.json"
ITEM_TEXT = "item_text.npy"
RANKER_MANIFEST = "manifest.json"
POPULAR_KEPT = 200  # the fallback for users with no usable window


class ArtifactError(ValueError):
    """A ranker directory that is missing a file or does not fit together."""


@dataclass(frozen=True)
class RankerArtifact:
    """A loaded ranker: the network in eval mode and what it needs to score item ids."""

    net: _SLIMNet
    config: SLIMRecConfig
    item_ids: tuple[str, ...]  # index -> item id; item_ids[0] == ""
    popular: tuple[str, ...]  # training popularity order, most popular first
    manifest: dict[str, Any]

    @property
    def rationale_dim(self) -> int | None:
        return self.net.rationale_dim


def save_ranker(ranker: SASRecRanker, data: TrainingData, out_dir: Path, *, dataset: str,
                metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``ranker`` (fitted on ``data``) into ``out_dir``; returns the manifest (without its version)."""
    if ranker.net is None:
        raise ValueError("save_ranker: the ranker is not fitted")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = ranker.cfg
    slim_cfg = cfg if isinstance(cfg, SLIMRecConfig) else SLIMRecConfig(**asdict(cfg), items="id")
    state = {k: v.detach().cpu().clone() for k, v in ranker.net.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS)
    write_text_atomic(out_dir / ITEMS, json.dumps(list(data.item_ids)))
    item_text = getattr(ranker, "item_text", None)
    if slim_cfg.items != "id":
        np.save(out_dir / ITEM_TEXT, np.asarray(item_text, dtype=np.float32))
    counts = data.item_counts()
    order = np.argsort(-counts[1:], kind="stable")[:POPULAR_KEPT] + 1
    rationales = getattr(ranker, "rationales", None)
    manifest = {
        "format": ARTIFACT_FORMAT,
        "kind": "slim-rec",
        "name": getattr(ranker, "name", "SASRec"),
        "created_at": time.time(),
        "config": asdict(slim_cfg),
        "n_items": data.n_items,
        "n_users": data.n_users,
        "train_interactions": int(sum(len(s) for s in data.train)),
        "dataset": dataset,
        "rationale": None if rationales is None else {
            "dim": int(rationales.vectors.shape[1]), "source": rationales.source, **rationales.counts},
        "popular": [data.item_ids[i] for i in order if counts[i] > 0],
        "training": {"best_epoch": ranker.best_epoch, "stopped_by": ranker.stopped_by,
                     "epochs": len(ranker.history), "seconds": round(sum(e.seconds for e in ranker.history), 1)},
        "metrics": metrics or {},
        **(extra or {}),
    }
    return manifest


def load_ranker(path: Path) -> RankerArtifact:
    """Rebuild the network of a saved ranker (eval mode, on the CPU)."""
    path = Path(path)
    for name in (RANKER_MANIFEST, WEIGHTS, ITEMS):
        if not (path / name).is_file():
            raise ArtifactError(f"ranker {path} has no {name}")
    manifest = json.loads((path / RANKER_MANIFEST).read_text(encoding="utf-8"))
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"ranker {path}: format {manifest.get('format')!r}, this code reads {ARTIFACT_FORMAT}")
    known = {f.name for f in fields(SLIMRecConfig)}
    cfg = SLIMRecConfig(**{k: v for k, v in manifest["config"].items() if k in known})
    item_ids = tuple(json.loads((path / ITEMS).read_text(encoding="utf-8")))
    n_items = int(manifest["n_items"])
    if len(item_ids) != n_items + 1 or item_ids[0] != "":
        raise ArtifactError(f"ranker {path}: {len(item_ids)} item ids for {n_items} items (+ padding)")
    text = None
    if cfg.items != "id":
        if not (path / ITEM_TEXT).is_file():
            raise ArtifactError(f"ranker {path} reads item text but has no {ITEM_TEXT}")
        text = torch.from_numpy(np.load(path / ITEM_TEXT).astype(np.float32))
    rationale = manifest.get("rationale")
    net = _SLIMNet(n_items, cfg, text, None if rationale is None else int(rationale["dim"]))
    net.load_state_dict(torch.load(path / WEIGHTS, map_location="cpu", weights_only=True))
    net.eval()
    return RankerArtifact(net=net, config=cfg, item_ids=item_ids, popular=tuple(manifest.get("popular") or ()),
                          manifest=manifest)


def as_slim_ranker(artifact: RankerArtifact) -> SLIMRecRanker:
    """The artifact as the harness's fitted ranker class (no rationales: every user gets the null vector)."""
    item_text = None
    if artifact.config.items != "id":
        item_text = artifact.net.item_text.numpy()
    ranker = SLIMRecRanker(artifact.config, item_text=item_text, name=artifact.manifest.get("name"))
    ranker.net, ranker.n_items = artifact.net, int(artifact.manifest["n_items"])
    return ranker


__all__ = ["ARTIFACT_FORMAT", "ArtifactError", "RankerArtifact", "as_slim_ranker", "load_ranker", "save_ranker"]
