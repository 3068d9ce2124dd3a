"""The promotion gate of the retrain loop: a retrained candidate replaces the served student only if it is
not worse on held-out users.

``gate(candidate, current, margin)`` promotes when ``candidate >= current - margin`` on one metric (default
NDCG@10). ``margin`` (``SLIMSTREAM_RETRAIN_GATE_MARGIN``, default 0) is the loss the operator accepts; 0 means
"not worse", a negative margin demands an improvement of at least ``-margin``. A metric missing on either
side (or not a finite number) never promotes: the decision says which one was missing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_METRIC = "ndcg@10"
_EPS = 1e-12  # equal values computed along different float paths still count as equal


class GateDecision(BaseModel):
    """Whether the candidate is promoted, on what numbers, and why (recorded in the candidate's manifest)."""

    model_config = ConfigDict(frozen=True)

    promoted: bool
    metric: str
    candidate: float | None = Field(description="The candidate's value of the metric (None: missing).")
    current: float | None = Field(description="The serving model's value of the metric (None: missing).")
    margin: float = Field(description="Promote when candidate >= current - margin.")
    reason: str


def _value(metrics: Mapping[str, Any] | None, metric: str) -> float | None:
    """``metrics[metric]`` (keys compared case-insensitively) as a finite float, else None."""
    if not metrics:
        return None
    wanted = metric.lower()
    for key, value in metrics.items():
        if str(key).lower() == wanted:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return None
            return float(value) if math.isfinite(value) else None
    return None


def gate(candidate_metrics: Mapping[str, Any] | None, current_metrics: Mapping[str, Any] | None,
         margin: float = 0.0, metric: str = DEFAULT_METRIC) -> GateDecision:
    """Promote only if ``candidate_metrics[metric] >= current_metrics[metric] - margin``."""
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {margin}")
    cand, cur = _value(candidate_metrics, metric), _value(current_metrics, metric)
    missing = [side for side, v in (("candidate", cand), ("current", cur)) if v is None]
    if missing:
        return GateDecision(promoted=False, metric=metric, candidate=cand, current=cur, margin=margin,
                            reason=f"{metric} missing for the {' and the '.join(missing)} model: not promoted")
    assert cand is not None and cur is not None
    floor = cur - margin
    if cand + _EPS >= floor:
        how = "better than" if cand > cur + _EPS else ("equal to" if abs(cand - cur) <= _EPS else "within the margin of")
        return GateDecision(promoted=True, metric=metric, candidate=cand, current=cur, margin=margin,
                            reason=f"candidate {metric} {cand:.4f} is {how} current {cur:.4f} "
                                   f"(margin {margin:g}): promoted")
    return GateDecision(promoted=False, metric=metric, candidate=cand, current=cur, margin=margin,
                        reason=f"candidate {metric} {cand:.4f} < current {cur:.4f} - margin {margin:g}: "
                               "not promoted")


__all__ = ["DEFAULT_METRIC", "GateDecision", "gate"]
