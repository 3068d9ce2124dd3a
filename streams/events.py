"""Event contracts: what goes over Kafka, as pydantic v2 models.

These are the public API of the service. JSON Schema files generated from them live in
``streams/schemas/`` (regenerate with ``slimstream schemas``); a test keeps them in sync.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NonEmptyId = Annotated[str, Field(min_length=1, max_length=512)]


class InteractionEvent(BaseModel):
    """One user-item interaction. Kafka key: ``user_id`` (UTF-8)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: NonEmptyId = Field(description="The dataset's own user id, e.g. '1m_1'.")
    item_id: NonEmptyId = Field(description="The dataset's own item id, e.g. 'Toy Story (1995)'.")
    event_type: Annotated[str, Field(min_length=1, max_length=32)] = Field(
        description="view, click, purchase, rating, ... (free-form, lower-case)."
    )
    value: float | None = Field(None, description="Optional strength, e.g. the rating.")
    timestamp: float = Field(ge=0, description="Epoch seconds of the interaction.")
    event_id: Annotated[str, Field(max_length=256)] | None = Field(
        None, description="Optional; duplicates of the same event_id are applied once."
    )

    @field_validator("event_type")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.strip().lower()


class RecommendedItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    score: float
    title: str


class RecommendationPath(str, Enum):
    fast = "fast"  # right after an event, from what is already known (no LLM wait)
    slow = "slow"  # after the student produced a rationale for this window version


class Recommendation(BaseModel):
    """Refreshed recommendations for one user. Kafka key: ``user_id``."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    items: list[RecommendedItem]
    rationale: str = Field(description="The student's step-by-step rationale ('' if none yet).")
    rationale_model_version: str | None = Field(None, description="Student version that wrote the rationale.")
    rationale_window_version: int | None = Field(None, description="Window version the rationale was written for.")
    rationale_current: bool = Field(description="True when the rationale reflects this window version.")
    window_version: int = Field(description="Version of the user's behaviour window these items reflect.")
    last_event_timestamp: float = Field(description="Timestamp of the newest event reflected.")
    produced_at: float = Field(default_factory=time.time)
    path: RecommendationPath


class DeadLetter(BaseModel):
    """An input record the worker could not accept, with why. Kafka key: the original key."""

    model_config = ConfigDict(frozen=True)

    raw: str = Field(description="The original value, base64-encoded.")
    raw_preview: str = Field(description="First 200 characters of the value decoded as UTF-8 (lossy).")
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: float = Field(default_factory=time.time)

    @classmethod
    def for_record(cls, value: bytes, error: str, topic: str, partition: int, offset: int) -> "DeadLetter":
        return cls(
            raw=base64.b64encode(value).decode("ascii"),
            raw_preview=value[:200].decode("utf-8", errors="replace"),
            error=error,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
        )


class WindowItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    event_type: str
    value: float | None = None
    timestamp: float


class RationaleRequest(BaseModel):
    """Internal: the window agent asks for a rationale of one window version. Kafka key: ``user_id``."""

    model_config = ConfigDict(frozen=True)

    user_id: str
    window_version: int
    requested_at: float = Field(default_factory=time.time)


class ModelUpdate(BaseModel):
    """The registry's CURRENT student changed (``slimstream models promote`` / ``rollback``, or a retrain job).

    Topic ``model-updates`` (one partition, key ``model``): every worker reads all of it without a consumer
    group and swaps its student to ``version`` without a restart. Delivery is at least once; an update for
    the version a worker already serves is a no-op.
    """

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), description="uuid4 of this update.")
    action: Literal["promote", "rollback"]
    version: str | None = Field(description="Registry version now CURRENT; null: the base student.")
    previous: str | None = Field(description="Version served before this change; null: the base student.")
    model_version: str = Field(
        description="What recommendations report from now on, e.g. 'smollm2-135m-instruct-base+v0002'."
    )
    registry_dir: str = Field(description="The registry the change was made in (as the publisher saw it).")
    reason: str = ""
    published_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


def describe_validation_error(exc: ValidationError) -> str:
    """``field: message; ...``: short enough for a dead letter or a CLI line."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())


class InvalidEvent(ValueError):
    """Raised by :func:`parse_event` with a reason fit for the dead-letter topic."""


def parse_event(value: bytes | None, max_bytes: int) -> InteractionEvent:
    """Decode and validate one Kafka value; raise :class:`InvalidEvent` saying why not."""
    if value is None:
        raise InvalidEvent("empty value (tombstone)")
    if len(value) > max_bytes:
        raise InvalidEvent(f"payload too large: {len(value)} bytes > {max_bytes}")
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(data).__name__}")
    try:
        return InteractionEvent.model_validate(data, strict=False)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid event: {describe_validation_error(exc)}") from None


def _drift_decision() -> type[BaseModel]:
    from retrain.drift import DriftDecision  # the drift topic's contract lives with the drift monitor

    return DriftDecision


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "InteractionEvent": InteractionEvent,
    "Recommendation": Recommendation,
    "DeadLetter": DeadLetter,
    "ModelUpdate": ModelUpdate,
    "DriftDecision": _drift_decision(),
}

__all__ = [
    "DeadLetter",
    "InteractionEvent",
    "InvalidEvent",
    "ModelUpdate",
    "RationaleRequest",
    "Recommendation",
    "RecommendationPath",
    "RecommendedItem",
    "SCHEMA_MODELS",
    "WindowItem",
    "parse_event",
]
