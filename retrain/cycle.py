"""One retrain cycle: recent interactions -> drifted users -> teacher rationales -> continue-trained student ->
held-out evaluation -> gate -> registry version (promoted or not).

:func:`run_cycle` reads like RecBole's ``run_recbole``: a short list of stages over the recent events it is
given, each stage a function in a module named for it:

===================  ==========================================  ===============================
stage                function                                    module
===================  ==========================================  ===============================
read events          ``load_recent_from_kafka`` / ``_dataset``   :mod:`retrain.recent` (job.py)
select users         :func:`~retrain.selection.select_users`     :mod:`retrain.selection`
write data           :func:`~retrain.teaching.write_dataset`     :mod:`retrain.teaching`
continue-train       :func:`~retrain.training.continue_train`    :mod:`retrain.training`
evaluate             :func:`~retrain.heldout.evaluate_heldout`   :mod:`retrain.heldout`
gate                 :func:`~retrain.register.gate_candidate`    :mod:`retrain.register`
register             ``candidate_manifest`` + ``conclude``       :mod:`retrain.register`
===================  ==========================================  ===============================

:func:`retrain.job.retrain_once` wraps it for the CLI: it reads the events that arrived since the last cycle,
runs the cycle, and stores the new offsets and the data window (atomically) once a candidate was built from
them. :mod:`retrain.triggers` runs it on a timer and on drift decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from retrain.context import CycleContext, CycleResult, Progress, Publish
from retrain.heldout import evaluate_heldout
from retrain.recent import DataWindow
from retrain.register import candidate_manifest, conclude, gate_candidate, write_drift_reference
from retrain.selection import select_users
from retrain.teaching import write_dataset
from retrain.training import continue_train, scratch_registry
from streams.datasets import Item
from streams.registry import ModelRegistry
from streams.settings import ChatEndpoint, Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.openai_client import ChatClient
    from retrain.distill import DistillConfig


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
    the candidate but never promote it. ``distill_config``: overrides the ``retrain`` training settings.
    ``candidate_metrics``: use these instead of measuring the candidate (an operator's or a test's override;
    the manifest says so).
    """
    registry = registry or ModelRegistry.for_settings(settings)
    ctx = CycleContext.create(settings, registry=registry, events=events, catalogue=catalogue,
                              drift_reason=drift_reason, data_window=data_window, progress=progress)
    if not ctx.events:
        return ctx.done("skipped", "no new events since the last cycle")

    selection = select_users(ctx, max_users or settings.retrain.max_users)
    if not selection.heldout_users:
        return ctx.done("skipped", f"{selection.eligible} user(s) with at least {ctx.need} recent events (window "
                                   f"{ctx.window} + targets {ctx.n_targets} + held out {ctx.holdout}); a cycle needs 2",
                        eligible_users=selection.eligible, reference=selection.reference)
    ctx.say(f"{len(ctx.events)} events ({selection.unknown_items} outside the catalogue), {selection.eligible} "
            f"eligible users; {len(selection.train_users)} to train on, {len(selection.heldout_users)} held out "
            f"(drift vs {selection.reference})")

    enc = _resolve_encoder(encoder, settings)
    data = write_dataset(ctx, selection, teacher, enc)
    if not data.records:
        return ctx.done("skipped", "the teacher returned no usable rationale", **selection.summary(), **data.summary())

    with scratch_registry(registry) as scratch:
        candidate = continue_train(ctx, selection, data, scratch, distill_config)
        evaluation = evaluate_heldout(ctx, selection, data, candidate, enc, candidate_metrics)
        decision = gate_candidate(ctx, evaluation)
        manifest = candidate_manifest(ctx, selection, data, candidate, evaluation, decision, dry_run=dry_run)
        version = registry.publish(candidate.version_dir, None, manifest)
    write_drift_reference(ctx, version, evaluation.candidate_vecs)

    common = {"version": version, "gate": decision, "candidate_metrics": evaluation.candidate,
              "current_metrics": evaluation.current, "new_records": len(data.records),
              "replay_records": len(candidate.replay), **selection.summary(), **data.summary()}
    return conclude(ctx, version, decision, common, dry_run=dry_run, publish=publish, progress=progress)


def _resolve_encoder(encoder: Any, settings: Settings) -> TextEncoder:
    """``encoder`` itself, or what its factory makes, or the configured encoder: loaded only when needed."""
    if encoder is None:
        from models.encoder import load_encoder

        return load_encoder(settings)
    return encoder if hasattr(encoder, "encode") else encoder()


__all__ = ["CycleResult", "run_cycle"]
