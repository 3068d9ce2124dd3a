"""The ``/v1`` HTTP API's request and response bodies (docs/api.md, docs/openapi.json is generated from these
and kept in sync by a test). The interaction event itself is the Kafka contract
(:class:`streams.events.InteractionEvent`): one contract, whichever way an event comes in."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streams.events import RecommendationPath, WindowItem

API_VERSION = "v1"


class Problem(BaseModel):
    """Every 4xx/5xx answer: what went wrong, in words a client can log."""

    error: str = Field(description="Why the request was refused.")
    details: list[dict[str, Any]] | None = Field(None, description="Per-item reasons (POST /v1/events: per event).")


class ApiItem(BaseModel):
    model_config = ConfigDict(frozen=True)

    item_id: str
    score: float
    title: str
    genres: list[str] = Field(default_factory=list, description="Catalogue genres ([] if the item is not indexed).")


class RecommendationsResponse(BaseModel):
    """``GET /v1/recommendations/{user_id}``."""

    user_id: str
    recommendation_id: str = Field(description="Name it in an event's recommendation_id to attribute the response.")
    items: list[ApiItem]
    rationale: str = Field(description="The student's rationale the items were ranked with ('' if none).")
    rationale_current: bool = Field(description="The rationale was written for the user's current window.")
    rationale_model_version: str | None = None
    ranker_version: str = Field(description="ranker+<version>, popular+<version>, text-cosine, trending or none.")
    student_version: str | None = None
    path: RecommendationPath | None = Field(description="fast/slow: the published answer; pull: computed for "
                                                        "this request; null for a fallback.")
    source: Literal["published", "computed", "fallback"] = Field(description=(
        "published: the user's newest message on the recommendations topic (same items); computed: ranked for "
        "this request (filters given, or nothing published by this worker yet); fallback: the user is unknown."))
    fallback: Literal["trending", "popular"] | None = Field(None, description=(
        "For an unknown user: trending (this worker's recent events) or popular (the ranker's training "
        "popularity); null otherwise."))
    window_version: int | None = Field(description="The window version the items reflect (null: fallback).")
    current_window_version: int | None = Field(description="The user's window version now (null: unknown user).")
    produced_at: float = Field(description="Epoch seconds the items were ranked.")
    age_s: float = Field(description="Seconds since then (freshness).")
    filters: dict[str, Any] = Field(default_factory=dict, description="The filters applied (k, exclude, genres).")


class AcceptedEvent(BaseModel):
    event_id: str = Field(description="The event's id (given, or derived from its content: a retry repeats it).")
    partition: int
    offset: int


class EventsAccepted(BaseModel):
    """``POST /v1/events``: every event is on the interactions topic."""

    accepted: int
    events: list[AcceptedEvent]


class UserResponse(BaseModel):
    """``GET /v1/users/{user_id}``: what the stream keeps about the user."""

    user_id: str
    window: list[WindowItem] = Field(description="The behaviour window, oldest first.")
    window_titles: dict[str, str] = Field(default_factory=dict, description="item_id -> title of the window items.")
    window_version: int | None
    last_event_timestamp: float | None
    rationale: str | None = Field(description="The stored rationale (null: none yet).")
    rationale_model_version: str | None = None
    rationale_window_version: int | None = None
    latest_recommendation_id: str | None = Field(None, description="The newest recommendation this worker sent.")
    preference: str | None = Field(None, description="The user's own preference text (null: none set).")


PREFERENCE_MAX_CHARS = 500


class PreferenceRequest(BaseModel):
    """``PUT /v1/users/{user_id}/preference``: what the user says they want, in their words. It is embedded
    and used as a ranker input like the rationale; it is data, never sent to a model as instructions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field(min_length=1, max_length=PREFERENCE_MAX_CHARS,
                      description="e.g. 'more documentaries, no horror' (whitespace is collapsed).")


class PreferenceResponse(BaseModel):
    user_id: str
    preference: str | None = Field(description="The stored text (null after a DELETE).")
    mode: Literal["blend", "replace"] = Field(description="How the ranker uses it (SLIMSTREAM_PREFERENCE_MODE).")
    recommendation_id: str | None = Field(description=(
        "The fresh recommendation published with the change (null: the user has no window yet)."))


class ForgetAccepted(BaseModel):
    """``DELETE /v1/users/{user_id}``: the forget control record is on the user's partition; the owner applies
    it after every event sent before it (window, rationale, recommendation tombstone), and the retrain job's
    next cycle takes the user off the disk."""

    user_id: str
    forget_requested: bool = True
    partition: int
    offset: int


RESPONSES: dict[str, type[BaseModel]] = {
    "Problem": Problem, "RecommendationsResponse": RecommendationsResponse, "EventsAccepted": EventsAccepted,
    "UserResponse": UserResponse, "ForgetAccepted": ForgetAccepted, "PreferenceRequest": PreferenceRequest,
    "PreferenceResponse": PreferenceResponse,
}

__all__ = ["API_VERSION", "AcceptedEvent", "ApiItem", "EventsAccepted", "ForgetAccepted", "PREFERENCE_MAX_CHARS",
           "PreferenceRequest", "PreferenceResponse", "Problem", "RESPONSES", "RecommendationsResponse", "UserResponse"]
