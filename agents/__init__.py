"""Faust agents. Importing this package registers them (and the worker's web views, the model-update listener
and the drift timer) on ``streams.app.app``."""

from agents import drift, model_updates, rationale, state, web, window  # noqa: F401  (registration side effects)
from agents import consumer_view, pages  # noqa: F401  (the consumer diagnostic, the HTML pages)
from agents.api import routes  # noqa: F401  (the /v1 views)
