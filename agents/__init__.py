"""Faust agents. Importing this package registers them (and the worker's web views) on ``streams.app.app``."""

from agents import rationale, state, web, window  # noqa: F401  (registration side effects)
