"""The worker's versioned HTTP API (``/v1``): pull recommendations, publish events, read and forget users.
docs/api.md documents it; docs/openapi.json is its OpenAPI description (agents/api/openapi.py). Importing
agents.api.routes registers the views (the ``agents`` package does)."""
