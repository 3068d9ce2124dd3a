"""Event contracts: what goes over Kafka, as pydantic v2 models.

These are the public API of the service. JSON Schema files generated from them live in
``streams/schemas/`` (regenerate with ``slimstream schemas``); a test keeps them in sync.
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from streams.drift import DriftDecision  # the drift topic's contract lives with the drift signals
from streams.registry import TEXT_RANKER

if TYPE_CHECKING:
    from streams.settings import Settings

# 9999-12-31T23:59:59Z: no datetime exists beyond it, so no later code can fail converting a timestamp.
MAX_TIMESTAMP = 253_402_300_799.0


def _printable_text(value: str) -> str:
    """Ids are data that ends up in logs, prompts, URLs and JSON: non-blank, no control or format characters
    (NUL, newlines, bidi overrides, zero-width joiners), nothing that reads differently from what it is."""
    if not value.strip():
        raise ValueError("must not be blank")
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        raise ValueError(f"must be printable text (found U+{ord(bad):04X})")
    return value


NonEmptyId = Annotated[str, Field(min_length=1, max_length=512), AfterValidator(_printable_text)]


class InteractionEvent(BaseModel):
    """One user-item interaction. Kafka key: ``user_id`` (UTF-8)."""

    # allow_inf_nan=False: NaN and infinities serialise to JSON null, so they would publish invalid messages.
    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    user_id: NonEmptyId = Field(description="The dataset's own user id, e.g. '1m_1'.")
    item_id: NonEmptyId = Field(description="The dataset's own item id, e.g. 'Toy Story (1995)'.")
    event_type: Annotated[str, Field(min_length=1, max_length=32)] = Field(
        description="view, click, purchase, rating, ... (free-form, lower-case)."
    )
    value: float | None = Field(None, description="Optional strength, e.g. the rating (finite).")
    timestamp: float = Field(ge=0, le=MAX_TIMESTAMP, description="Epoch seconds of the interaction (finite).")
    event_id: Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable_text)] | None = Field(
        None, description="Optional; duplicates of the same event_id are applied once."
    )
    recommendation_id: Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable_text)] | None = (
        Field(None, description="Optional: the recommendation_id of the recommendation this interaction responds "
                                "to (a click on a shown item): the worker attributes it to that recommendation's "
                                "ranker, path and arm."))

    @field_validator("event_type")
    @classmethod
    def _lower(cls, v: str) -> str:
        return _printable_text(v.strip().lower())


class RecommendedItem(BaseModel):
    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

    item_id: str
    score: float
    title: str


class RecommendationPath(str, Enum):
    fast = "fast"  # right after an event, from what is already known (no LLM wait)
    slow = "slow"  # after the student produced a rationale for this window version
    pull = "pull"  # computed for an HTTP request (GET /v1/recommendations with filters, or none published yet)


def make_recommendation_id(user_id: str, window_version: int, path: str, ranker_version: str,
                           student_version: str | None, rationale_window_version: int | None,
                           extra: str = "") -> str:
    """A recommendation's id: a digest of what determines its items, so the answer a redelivered event produces
    again has the id the first one had (an at-least-once stream; consumers de-duplicate on it)."""
    basis = "\x1f".join((user_id, str(window_version), path, ranker_version, student_version or "",
                          "" if rationale_window_version is None else str(rationale_window_version), extra))
    return hashlib.sha256(basis.encode()).hexdigest()[:24]


class Recommendation(BaseModel):
    """Refreshed recommendations for one user. Kafka key: ``user_id``."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)

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
    ranker_version: str = Field(TEXT_RANKER, description=(
        "What ranked the items: 'ranker+<version>' (a trained ranker of the ranker registry), "
        "'popular+<version>' (its popularity fallback: no window item it knows) or 'text-cosine'."))
    student_version: str | None = Field(None, description="The student serving when this was produced.")
    recommendation_id: str = Field("", description=(
        "Identifies this answer (a digest of user, window version, path and versions: a redelivered event's "
        "answer repeats it). An interaction event may name it in its recommendation_id (feedback attribution)."))
    arm: str | None = Field(None, description="The A/B arm that served it (SLIMSTREAM_AB_*); null: no experiment.")


DEAD_LETTER_MAX_RAW_BYTES = 65_536  # a dead letter carries values up to this size whole (base64: 87 KiB)
DEAD_LETTER_MAX_KEY_BYTES = 1_024
PREVIEW_BYTES = 200
MAX_ERROR_CHARS = 1_000


class DeadLetter(BaseModel):
    """An input record the worker could not accept, with why. Kafka key: the original key (a digest of it
    when it is longer than 1 KiB).

    A value too large to repeat (over ``max_raw_bytes``; a dead letter must itself fit the broker's message
    size) comes without ``raw``: its preview, size and SHA-256 identify it, and ``source_topic``,
    ``source_partition`` and ``source_offset`` say where the whole original still is.
    """

    model_config = ConfigDict(frozen=True)

    raw: str | None = Field(description="The original value, base64-encoded; null when raw_truncated.")
    raw_preview: str = Field(description="First 200 bytes of the value decoded as UTF-8 (lossy).")
    raw_size: int = Field(0, ge=0, description="Size of the original value in bytes.")
    raw_sha256: str = Field("", description="SHA-256 (hex) of the original value.")
    raw_truncated: bool = Field(False, description="True when the value was too large to carry in raw.")
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at: float = Field(default_factory=time.time)

    @classmethod
    def for_record(cls, value: bytes, error: str, topic: str, partition: int, offset: int,
                   max_raw_bytes: int = DEAD_LETTER_MAX_RAW_BYTES) -> "DeadLetter":
        truncated = len(value) > max_raw_bytes
        return cls(
            raw=None if truncated else base64.b64encode(value).decode("ascii"),
            raw_preview=value[:PREVIEW_BYTES].decode("utf-8", errors="replace"),
            raw_size=len(value),
            raw_sha256=hashlib.sha256(value).hexdigest(),
            raw_truncated=truncated,
            error=error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS] + "...",
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
        )


def dead_letter_key(key: bytes | None) -> bytes | None:
    """The original key, or ``sha256:<hex>`` of it when it is too long to repeat."""
    if key is None or len(key) <= DEAD_LETTER_MAX_KEY_BYTES:
        return key
    return b"sha256:" + hashlib.sha256(key).hexdigest().encode()


class WindowItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    event_type: str
    value: float | None = None
    timestamp: float


class ModelUpdate(BaseModel):
    """The registry's CURRENT student changed (``slimstream models promote`` / ``rollback``, or a retrain job).

    Topic ``model-updates`` (one partition, key ``model``): every worker reads all of it without a consumer
    group and swaps its student to ``version`` without a restart. Delivery is at least once; an update for
    the version a worker already serves is a no-op.
    """

    model_config = ConfigDict(frozen=True)

    event_id: str = Field(default_factory=lambda: str(uuid.uuid4()), description="uuid4 of this update.")
    component: Literal["student", "ranker"] = Field(
        "student", description="Which registry changed: the student's or the ranker's (<registry>/rankers).")
    action: Literal["promote", "rollback"]
    version: str | None = Field(description="Registry version now CURRENT; null: the base student.")
    previous: str | None = Field(description="Version served before this change; null: the base student.")
    model_version: str = Field(
        description="What recommendations report from now on, e.g. 'smollm2-135m-instruct-base+v0002'."
    )
    registry_dir: str = Field(description="The registry the change was made in (as the publisher saw it).")
    reason: str = ""
    published_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))


class ForgetUser(BaseModel):
    """A control record on the interactions topic, keyed by ``user_id`` like the user's events: delete what the
    stream keeps about the user. Keyed so that it lands on the user's partition after every event sent
    before it: the worker applies it in order (the window gets a changelog tombstone, the rationale point is
    deleted), and a retrain cycle that reads it drops the user's earlier events. ``slimstream forget`` sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    control: Literal["forget"] = Field(description="The control verb; only 'forget' exists.")
    user_id: NonEmptyId
    requested_at: float | None = Field(None, ge=0, le=MAX_TIMESTAMP, description="Epoch seconds of the request.")


def describe_validation_error(exc: ValidationError) -> str:
    """``field: message; ...``: short enough for a dead letter or a CLI line."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors())


class InvalidEvent(ValueError):
    """Raised by :func:`parse_event` with a reason fit for the dead-letter topic."""


TimeMode = Literal["live", "replay"]


@dataclass(frozen=True)
class EventLimits:
    """What :func:`parse_event` admits besides the contract itself (``SLIMSTREAM_MAX_EVENT_BYTES`` and the
    ``SLIMSTREAM_EVENT_*`` settings).

    ``live``: a timestamp must lie within ``max_age_s`` before and ``max_future_s`` after the worker's clock (a
    producer with a broken clock or unit, e.g. milliseconds, is caught at the door instead of skewing every
    window's "newest event" for good). ``replay``: historical data (MovieLens' 2000-2003, a backfill): any
    time from ``min_timestamp`` up to ``max_future_s`` after now.
    """

    max_bytes: int = 16_384
    time_mode: TimeMode = "live"
    max_age_s: float = 30 * 86_400.0
    max_future_s: float = 300.0
    min_timestamp: float = 0.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "EventLimits":
        return cls(max_bytes=settings.events.max_bytes, time_mode=settings.events.time_mode,
                   max_age_s=settings.events.max_age_s, max_future_s=settings.events.max_future_s,
                   min_timestamp=settings.events.min_timestamp)

    def time_error(self, timestamp: float, now: float) -> str | None:
        """Why ``timestamp`` is not admitted at ``now``, or None."""
        latest = now + self.max_future_s
        if timestamp > latest:
            return (f"timestamp {timestamp:.17g} is {timestamp - now:.0f} s in the future (more than "
                    f"SLIMSTREAM_EVENT_MAX_FUTURE_S={self.max_future_s:g}; seconds since the epoch expected)")
        if self.time_mode == "live" and timestamp < now - self.max_age_s:
            return (f"timestamp {timestamp:.17g} is {now - timestamp:.0f} s old (more than "
                    f"SLIMSTREAM_EVENT_MAX_AGE_S={self.max_age_s:g} in live mode; set "
                    f"SLIMSTREAM_EVENT_TIME_MODE=replay for historical data)")
        if self.time_mode == "replay" and timestamp < self.min_timestamp:
            return f"timestamp {timestamp:.17g} is before SLIMSTREAM_EVENT_MIN_TIMESTAMP={self.min_timestamp:g}"
        return None


def parse_event(value: bytes | None, limits: EventLimits, now: float | None = None) -> InteractionEvent:
    """Decode and validate one Kafka value; raise :class:`InvalidEvent` saying why not. Total: whatever the
    bytes, the answer is an event or an :class:`InvalidEvent`.

    The size is checked before anything is parsed. pydantic-core's JSON parser then reads the bytes as strict
    UTF-8 (no UTF-16, no BOM), with a bounded nesting depth (deep nesting is an error, not a RecursionError),
    and without NaN or Infinity; validation is strict (a string is not a number, ``true`` is not a
    timestamp). ``limits`` as an int is the size limit with the default time window.
    """
    if isinstance(limits, int):
        limits = EventLimits(max_bytes=limits)
    if value is None:
        raise InvalidEvent("empty value (tombstone)")
    if len(value) > limits.max_bytes:
        raise InvalidEvent(f"payload too large: {len(value)} bytes > {limits.max_bytes}")
    try:
        event = InteractionEvent.model_validate_json(value, strict=True)
    except ValidationError as exc:
        raise InvalidEvent(_event_error(exc)) from None
    problem = limits.time_error(event.timestamp, time.time() if now is None else now)
    if problem is not None:
        raise InvalidEvent(f"invalid event: {problem}")
    return event


def control_record(value: bytes | None) -> ForgetUser | None:
    """The control record ``value`` holds, None when it holds none (no top-level "control" field: an
    interaction event, or something else to validate as one); :class:`InvalidEvent` for a malformed one.
    One decision for every reader of the interactions topic (the worker and the retrain job)."""
    if value is None or b'"control"' not in value:  # cheap: most records are events
        return None
    try:
        return ForgetUser.model_validate_json(value, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] in ("json_invalid", "model_type") or (e["type"] == "missing" and e["loc"] == ("control",))
               for e in errors):
            # Not JSON, not an object, or no top-level "control" (the bytes were inside a value, e.g. an item
            # called "control"): not a control record.
            return None
        raise InvalidEvent(f"invalid control record: {describe_validation_error(exc)}") from None


def parse_record(value: bytes | None, limits: EventLimits, now: float | None = None) -> InteractionEvent | ForgetUser:
    """An interaction event or a control record (:class:`ForgetUser`); :class:`InvalidEvent` saying why not.
    The size limit applies to both."""
    if isinstance(limits, int):
        limits = EventLimits(max_bytes=limits)
    if value is not None and len(value) > limits.max_bytes:
        raise InvalidEvent(f"payload too large: {len(value)} bytes > {limits.max_bytes}")
    return control_record(value) or parse_event(value, limits, now)


def _event_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('msg', exc)}"
    if first.get("type") == "model_type" and not first.get("loc"):
        return f"expected a JSON object, got {_json_type(first.get('input'))}"
    return f"invalid event: {describe_validation_error(exc)}"


def _json_type(value: Any) -> str:
    for python, name in ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"),
                         (list, "array"), (type(None), "null")):
        if isinstance(value, python):
            return name
    return type(value).__name__


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "InteractionEvent": InteractionEvent,
    "Recommendation": Recommendation,
    "DeadLetter": DeadLetter,
    "ModelUpdate": ModelUpdate,
    "DriftDecision": DriftDecision,
    "ForgetUser": ForgetUser,
}

__all__ = [
    "DeadLetter",
    "EventLimits",
    "ForgetUser",
    "InteractionEvent",
    "InvalidEvent",
    "ModelUpdate",
    "Recommendation",
    "RecommendationPath",
    "RecommendedItem",
    "SCHEMA_MODELS",
    "WindowItem",
    "dead_letter_key",
    "control_record",
    "make_recommendation_id",
    "parse_event",
    "parse_record",
]
