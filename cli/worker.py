"""``slimstream worker``: the Faust worker."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
from typing import Annotated

import typer

from cli.base import cli, load_settings


# --- worker ----------------------------------------------------------------------------------------------
@cli.command()
def worker(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the stream worker (Faust agents) against KAFKA_BOOTSTRAP_SERVERS."""
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    from streams.topics import ensure_topics

    settings = load_settings()
    if settings.api.token is None and settings.worker.web_host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("slimstream.api").warning(
            "the HTTP API (/v1) binds %s without SLIMSTREAM_API_TOKEN: anyone who reaches the port can publish "
            "events and forget users", settings.worker.web_host)
    asyncio.run(ensure_topics(settings))
    from faust.worker import Worker

    import agents  # noqa: F401  (registers the agents)
    from streams.app import app

    # `kill -QUIT <pid>` prints every thread's Python stack to stderr and the worker goes on: it answers even
    # when the event loop is blocked (SIGUSR1, Faust's own, lists the asyncio tasks, but only from the loop).
    faulthandler.register(signal.SIGQUIT, file=sys.stderr, all_threads=True)
    code = 0
    try:
        Worker(app, loglevel=log_level.lower(), quiet=True).execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Faust has stopped every service and flushed the producer. A model call may still be running in a
    # pool thread (threads cannot be interrupted); its request was not acknowledged and will be redelivered,
    # so exit now instead of letting the interpreter join that thread.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


