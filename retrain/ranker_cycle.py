"""The ranker's part of a retrain cycle: a candidate trained on the stream's own recent events, gated against
the serving ranker on the same held-out events, registered with a manifest and announced.

The recent events (the cycle's, see :mod:`retrain.job`) are split leave-one-out per user: each user's last
event is the held-out target, the one before it validation (early stopping), the rest training. The candidate
is trained from scratch within ``retrain.ranker_minutes`` (a sequential model on the newest behaviour is what
a shifted taste needs; warm-starting would carry the old vocabulary). Both it and the serving version are
scored on the held-out events through the serving code, their input the worker's window; the candidate is
promoted when it beats popularity and is not worse than the serving version by more than
``retrain.gate_margin``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any

from retrain.context import Progress, Publish
from retrain.ranker import RankerResult, RankerSpec, fit, publish_ranker
from streams.datasets import Interaction, Item
from streams.registry import ModelRegistry
from streams.settings import Settings
from streams.splits import leave_one_out

log = logging.getLogger("retrain.ranker")


def retrain_ranker(settings: Settings, events: Iterable[Any], catalogue: Mapping[str, Item], *,
                   registry: ModelRegistry | None = None, publish: Publish | None = None, dry_run: bool = False,
                   progress: Progress | None = None) -> dict[str, Any]:
    """One ranker candidate from ``events`` (anything with ``user_id``, ``item_id``, ``timestamp``); returns a
    summary (status, version, metrics, gate). ``publish``: announces a promotion (``component=ranker``)."""
    say = progress or (lambda msg: log.info("retrain ranker: %s", msg))
    cfg = settings.retrain
    registry = registry or ModelRegistry.rankers_for_settings(settings)
    interactions = [Interaction(str(e.user_id), str(e.item_id), getattr(e, "value", None), float(e.timestamp))
                    for e in events]
    split = leave_one_out(interactions)
    if split.n_users < cfg.ranker_min_users:
        return {"status": "skipped", "reason": f"{split.n_users} users with >= {split.stats.min_interactions} recent "
                                               f"events; a ranker cycle needs {cfg.ranker_min_users}"}
    spec = RankerSpec(items=cfg.ranker_items, minutes=cfg.ranker_minutes, seed=cfg.seed)
    say(f"ranker candidate: {split.n_users} users, {split.n_items} items, {split.stats.train_interactions} "
        f"training events (budget {cfg.ranker_minutes:g} min)")
    ranker = fit(settings, catalogue, split, spec, progress=say)
    result: RankerResult = publish_ranker(
        settings, registry, ranker, split, dataset="stream", say=say, promote=not dry_run, margin=cfg.gate_margin,
        extra={"spec": asdict(spec), "data": {"events": len(interactions), "users": split.n_users,
                                              "first_ts": min(i.timestamp for i in interactions),
                                              "last_ts": max(i.timestamp for i in interactions)}})
    status = "promoted" if result.promoted else ("dry_run" if dry_run and result.manifest["gate"]["passed"]
                                                 else "rejected")
    out = {"status": status, "reason": result.reason, "version": result.version,
           "metrics": result.manifest["metrics"], "published": False}
    if result.promoted and publish is not None:
        try:
            publish(action="promote", version=result.version, reason=f"retrain ranker: {result.reason}")
            out["published"] = True
        except Exception as exc:  # the promotion stands; workers pick it up at their next start
            log.exception("ranker %s promoted but not announced", result.version)
            out["publish_error"] = f"{type(exc).__name__}: {exc}"
    say(f"ranker {result.version}: {status} ({result.reason})")
    return out


__all__ = ["retrain_ranker"]
