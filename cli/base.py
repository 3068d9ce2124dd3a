"""The ``slimstream`` Typer app and what every command module shares: the console, one-line failures, progress.

Each command group lives in a module of its own (after faust's ``faust/cli/``); importing :mod:`cli.main`
registers them all. Commands stay thin: they wire settings to the modules that do the work.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from streams.settings import Settings, SettingsError

NO_PUBLISH_HELP = "change the registry only (offline); running workers switch at their next start"

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimstream: SLIM rationales as a streaming recommender.")
console = Console(stderr=False)


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, ``slimstream: error: ...``, and exit ``code`` (2: a bad argument)."""
    print(f"slimstream: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


@contextmanager
def quiet_kafka_log() -> Iterator[None]:
    """Silence aiokafka's per-attempt connection errors while a command talks to Kafka: the command says what
    failed in one line of its own."""
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        kafka_log.setLevel(level)


@functools.lru_cache(maxsize=1)
def load_settings() -> Settings:
    """This process's settings, read from the environment once (the CLI is an entry point: it passes them
    down). A variable with a bad value is one line and exit code 2."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        fail(f"bad setting in the environment: {exc}", 2)
        raise  # unreachable: fail raises
