"""The CLI's retrain cycle: load the events since the last cycle, run it, store the offsets. One cycle per
registry at a time (a file lock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from retrain.context import CycleResult, Progress, Publish, drift_reason_json
from retrain.cycle import run_cycle
from retrain.forget import ForgetLedger, scrub_files
from retrain.recent import RetrainState, load_recent_from_dataset, load_recent_from_kafka
from streams.datasets import load_items
from streams.registry import ModelRegistry
from streams.settings import Settings

if TYPE_CHECKING:
    from retrain.distill import DistillConfig

RETRAIN_LOCK = ".retrain.lock"
log = logging.getLogger(__name__)


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
    ranker_publish: Publish | None = None,
) -> CycleResult:
    """Read the events since the last cycle (``data``: a dataset, else the interactions topic), run one cycle
    on them, and store the new offsets once a candidate was built from them (not on a dry run, not when the
    cycle was skipped: those events are read again, with the newer ones, next time). The catalogue is
    ``data``'s, else ``settings.data.dataset``'s. With ``retrain.ranker`` the same events also train a ranker
    candidate (:func:`retrain.ranker_cycle.retrain_ranker`; ``ranker_publish`` announces its promotion)."""
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
                               candidate_metrics=candidate_metrics, progress=progress,
                               ranker_publish=ranker_publish)
    finally:
        lock.release()


def _retrain_locked(settings: Settings, registry: ModelRegistry, *, data: str | None, teacher: Any, encoder: Any,
                    drift_reason: Any, publish: Publish | None, dry_run: bool, max_users: int | None,
                    max_events: int | None, distill_config: DistillConfig | None,
                    candidate_metrics: Mapping[str, float] | None, progress: Progress | None,
                    ranker_publish: Publish | None) -> CycleResult:
    state = RetrainState.for_registry(registry)
    cap = max_events or settings.retrain.max_events
    if data is not None:
        recent = load_recent_from_dataset(data, state, cap, ForgetLedger.for_settings(settings))
    else:
        recent = asyncio.run(load_recent_from_kafka(settings, state, cap))
        _forget_on_disk(settings, recent.forgotten)
    catalogue = load_items(data if data is not None else settings.data.dataset)
    result = run_cycle(settings, events=recent.events, catalogue=catalogue, teacher=teacher, encoder=encoder,
                       registry=registry, drift_reason=drift_reason, publish=publish, data_window=recent.window,
                       dry_run=dry_run, max_users=max_users, distill_config=distill_config,
                       candidate_metrics=candidate_metrics, progress=progress)
    if result.status in ("promoted", "rejected"):
        state.commit(recent, version=result.version, status=result.status)
    if settings.retrain.ranker:
        from retrain.ranker_cycle import retrain_ranker

        try:
            ranker = retrain_ranker(settings, recent.events, {it.item_id: it for it in catalogue},
                                    registry=registry.rankers(), publish=ranker_publish, dry_run=dry_run,
                                    progress=progress)
        except Exception as exc:  # the student's cycle stands whatever happens to the ranker's
            ranker = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        result = result.model_copy(update={"ranker": ranker})
    return result


def _forget_on_disk(settings: Settings, users: list[str]) -> None:
    """The files' part of forgetting for users whose forget record this cycle read (the worker did the
    stream's part when it applied the record): the ledger, then their dataset records and cached answers."""
    if not users:
        return
    ledger = ForgetLedger.for_settings(settings)
    for user in users:
        if user in ledger:
            continue  # slimstream forget did it already
        ledger.add(user)
        report = scrub_files(settings, user)
        log.info("forgot a user on disk (forget record read by the cycle): %d record(s) in %d file(s), %d cached "
                 "answer(s)", report.records, len(report.files), report.cache_rows)


__all__ = ["RETRAIN_LOCK", "default_publisher", "retrain_once"]
