"""The OpenAPI 3.1 description of ``/v1`` (docs/openapi.json), built from the same pydantic models the worker
validates and answers with, so the file cannot drift from the code (``slimstream schemas`` rewrites it; a test
compares)."""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from agents.api.protocol import API_VERSION, RESPONSES, PreferenceRequest
from streams.events import InteractionEvent

REF = "#/components/schemas/{model}"


def _json(ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": REF.format(model=ref)}}}}


def _problems(*codes: int) -> dict[str, Any]:
    words = {400: "Bad request (the reason names the parameter)", 401: "Missing or wrong bearer token",
             404: "Unknown user", 413: "Too large", 422: "Invalid events (per-event reasons; none published)",
             502: "The owning worker did not answer", 503: "Not ready, rebalancing, or the broker did not ack"}
    return {str(c): _json("Problem", words[c]) for c in codes}


_USER = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "The user id, as in the user's events."}


def openapi_document() -> dict[str, Any]:
    requests = (PreferenceRequest, InteractionEvent)  # what clients send: their validation schema
    _, defs = models_json_schema([(m, "validation" if m in requests else "serialization")
                                  for m in (*RESPONSES.values(), InteractionEvent)],
                                 ref_template=REF)
    batch = {"oneOf": [{"$ref": REF.format(model="InteractionEvent")},
                       {"type": "array", "items": {"$ref": REF.format(model="InteractionEvent")}},
                       {"type": "object", "required": ["events"], "additionalProperties": False,
                        "properties": {"events": {"type": "array",
                                                  "items": {"$ref": REF.format(model="InteractionEvent")}}}}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "slimstream worker API", "version": API_VERSION,
                 "description": "Pull recommendations, publish events, read and forget users (docs/api.md)."},
        "servers": [{"url": "http://127.0.0.1:6066"}],
        "components": {"schemas": defs["$defs"],
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "Only when SLIMSTREAM_API_TOKEN is set."}}},
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/recommendations/{user_id}": {"get": {
                "summary": "The user's current recommendation (any worker answers: the owner serves it)",
                "parameters": [
                    _USER,
                    {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1},
                     "description": "Items (default SLIMSTREAM_TOP_K, at most SLIMSTREAM_API_MAX_K)."},
                    {"name": "exclude", "in": "query", "schema": {"type": "string"},
                     "description": "Comma-separated item ids never to return."},
                    {"name": "genres", "in": "query", "schema": {"type": "string"},
                     "description": "Comma-separated genres: keep items with any of them."}],
                "responses": {"200": _json("RecommendationsResponse", "The recommendation (or the marked fallback)"),
                              **_problems(400, 401, 502, 503)}}},
            "/v1/events": {"post": {
                "summary": "Publish one event, an array, or {\"events\": [...]}: all or none",
                "requestBody": {"required": True, "content": {"application/json": {"schema": batch}}},
                "responses": {"202": _json("EventsAccepted", "Every event is on the interactions topic"),
                              **_problems(400, 401, 413, 422, 503)}}},
            "/v1/users/{user_id}": {
                "get": {"summary": "The user's window and rationale", "parameters": [_USER],
                        "responses": {"200": _json("UserResponse", "What the stream keeps about the user"),
                                      **_problems(401, 404, 502, 503)}},
                "delete": {"summary": "Forget the user (the forget control record)", "parameters": [_USER],
                           "responses": {"202": _json("ForgetAccepted", "The forget record is on the user's partition"),
                                         **_problems(400, 401, 503)}}},
            "/v1/users/{user_id}/preference": {
                "put": {"summary": "Set the user's own preference text (a ranker input; never a prompt)",
                        "parameters": [_USER],
                        "requestBody": {"required": True, "content": {"application/json": {
                            "schema": {"$ref": REF.format(model="PreferenceRequest")}}}},
                        "responses": {"200": _json("PreferenceResponse", "Stored; the user was answered again"),
                                      **_problems(400, 401, 413, 422, 502, 503)}},
                "delete": {"summary": "Remove the user's preference", "parameters": [_USER],
                           "responses": {"200": _json("PreferenceResponse", "Removed; the user was answered again"),
                                         **_problems(401, 502, 503)}}},
        },
    }


__all__ = ["openapi_document"]
