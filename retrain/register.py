"""Stages 6 and 7 of a retrain cycle, *gate* and *register*: the candidate is published as a new registry version
either way, its manifest holding the parent, the data window (first/last timestamp and topic offsets), the
drift reason, both models' metrics, the gate decision and the datasets. Only a passing candidate is promoted
(and ``publish(action="promote", ...)`` is called); a rejected one stays in the registry, unpromoted, its
manifest saying why. Every version gets a ``drift_reference.json``: the genre mix of the last
``drift.window_events`` events the cycle read and the centroid of its held-out rationales with their count
(workers use that centroid only when it rests on ``drift.min_events`` rationales, and otherwise take the new
student's first ones).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from retrain.context import CycleContext, CycleResult, Progress, Publish, registry_relative, version_datasets
from retrain.gate import GateDecision, gate
from retrain.heldout import HeldoutEvaluation
from retrain.selection import Selection, genre_mix, latest_in_stream_order
from retrain.teaching import NewDataset
from retrain.training import Candidate
from streams.drift import GenreDistribution
from streams.drift_reference import DriftReference, drift_reference_path
from streams.registry import utc_now

log = logging.getLogger("retrain.cycle")


def gate_candidate(ctx: CycleContext, evaluation: HeldoutEvaluation) -> GateDecision:
    r = ctx.settings.retrain
    return gate(evaluation.candidate, evaluation.current, r.gate_margin, r.gate_metric)


def candidate_manifest(ctx: CycleContext, selection: Selection, data: NewDataset, candidate: Candidate,
                       evaluation: HeldoutEvaluation, decision: GateDecision, *, dry_run: bool) -> dict[str, Any]:
    """The candidate's manifest: what distillation wrote plus the cycle's lineage, evaluation and gate."""
    registry = ctx.registry
    manifest = json.loads((candidate.version_dir / "manifest.json").read_text(encoding="utf-8"))
    new_ds = {"version": data.version, "path": registry_relative(data.path, registry.root), "records": len(data.records)}
    lineage = [new_ds] + [d for d in version_datasets(registry, ctx.parent) if d.get("path") != new_ds["path"]]
    manifest.update({
        "parent_version": ctx.parent,
        "data_window": ctx.data_window.model_dump(mode="json"),
        "drift_reason": ctx.drift_reason,
        "evaluation": {
            "protocol": evaluation.protocol(ctx),
            "held_out_users": selection.heldout_users,
            "candidate": evaluation.candidate,
            "candidate_measured": evaluation.measured,
            "candidate_source": "override" if evaluation.overridden else "measured",
            "current": evaluation.current,
            "current_version": ctx.parent,
            "examples": [{"user": u, "current": c, "candidate": d} for u, c, d in
                         list(zip(selection.heldout_users, evaluation.current_texts, evaluation.candidate_texts))[:2]],
        },
        "gate": decision.model_dump(mode="json"),
        "datasets": lineage,
        "retrain": {
            "dataset_version": data.version,
            "train_path": registry_relative(candidate.train_path, registry.root),
            "new_records": len(data.records),
            "replay_records": len(candidate.replay),
            "replay_from": sorted(set(candidate.replay_versions)),
            "train_users": selection.train_users,
            "held_out_users": selection.heldout_users,
            "eligible_users": selection.eligible,
            "drift_scores": {u: round(s, 6) for u, s in selection.ranked},
            "reference": selection.reference,
            "dry_run": dry_run,
            "teacher": data.teacher_id,
        },
        "created_at": utc_now(),
    })
    return manifest


def write_drift_reference(ctx: CycleContext, version: str, candidate_vecs: np.ndarray) -> None:
    # The genre reference is the stream this cycle read, i.e. the regime the new student was distilled for: its
    # last drift.window_events events in arrival order (all users), the same span the workers' live mix covers.
    # Training windows (and the replayed ones) end before the users' latest events, so after a shift they are
    # still mostly pre-shift, and a reference built from them kept the genre signal firing after a promotion.
    cat = ctx.catalogue
    recent_items = [e.item_id for e in latest_in_stream_order(ctx.events, ctx.settings.drift.window_events)]
    written = candidate_vecs[np.linalg.norm(candidate_vecs, axis=1) > 0]
    mean = written.mean(axis=0) if len(written) else None
    has_centroid = mean is not None and float(np.linalg.norm(mean)) > 0
    DriftReference(
        model_version=ctx.registry.model_version(version, ctx.settings),
        genres=GenreDistribution.from_items(recent_items, cat) if genre_mix(recent_items, cat) else None,
        rationale_centroid=mean.tolist() if has_centroid else None,
        # a worker takes the centroid only if it rests on drift.min_events rationales
        rationale_samples=len(written) if has_centroid else None,
    ).save(drift_reference_path(ctx.registry, version))


def conclude(ctx: CycleContext, version: str, decision: GateDecision, common: dict[str, Any], *, dry_run: bool,
             publish: Publish | None, progress: Progress | None) -> CycleResult:
    """Promote a passing candidate (unless ``dry_run``) and announce it; the cycle's result either way."""
    if dry_run:
        ctx.say(f"{version}: dry run, not promoted ({decision.reason})")
        return ctx.done("dry_run", f"dry run: {decision.reason}", **common)
    if not decision.promoted:
        ctx.say(f"{version}: rejected ({decision.reason})")
        return ctx.done("rejected", decision.reason, **common)
    why = f"retrain: {decision.reason}"
    ctx.registry.promote(version, reason=why)
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
    ctx.say(f"{version}: promoted ({decision.reason})")
    return ctx.done("promoted", decision.reason, promoted=True, published=published, publish_error=error, **common)


__all__ = ["candidate_manifest", "conclude", "gate_candidate", "write_drift_reference"]
