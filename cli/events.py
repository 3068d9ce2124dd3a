"""Event commands: ``produce`` (a file), ``replay`` (a dataset sample), ``tail`` (the recommendations)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from aiokafka.errors import KafkaConnectionError
from rich.console import Console
from rich.panel import Panel

from cli.base import cli, console, fail, load_settings
from streams.kafka_auth import client_options
from streams.settings import Settings


# --- produce ---------------------------------------------------------------------------------------------
@cli.command()
def produce(
    file: Annotated[Path, typer.Argument(help="InteractionEvents as .jsonl or .csv")],
    rate: Annotated[Optional[float], typer.Option(min=0.01, help="events per second (default: unthrottled)")] = None,
) -> None:
    """Publish interaction events from a file to the interactions topic, keyed by user_id."""
    from streams.replay import publish_events, read_event_file

    if not file.is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    if file.suffix.lower() not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise typer.BadParameter(f"unsupported extension {file.suffix!r} (use .jsonl or .csv)", param_hint="FILE")
    settings = load_settings()
    good, bad = [], 0
    for line, ev in read_event_file(file):
        if isinstance(ev, str):
            bad += 1
            print(f"{file}:{line}: skipped: {ev}", file=sys.stderr)
        else:
            good.append(ev)

    sent = publish_events(settings, good, rate)
    console.print(f"sent {sent} events to {settings.kafka.topic_interactions!r}; {bad} invalid lines skipped")
    if bad:
        raise typer.Exit(1)


# --- replay ----------------------------------------------------------------------------------------------
@cli.command()
def replay(
    users: Annotated[int, typer.Option(min=1, help="dataset users whose history is replayed")] = 8,
    rate: Annotated[float, typer.Option(min=0.01, help="events per second")] = 5.0,
    max_events: Annotated[int, typer.Option(min=1, help="events in all (max_events / users per user)")] = 400,
    seed: Annotated[int, typer.Option(help="user sample seed")] = 7,
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default SLIMSTREAM_DATASET)")] = None,
) -> None:
    """Publish a seeded sample of a dataset's users' interactions, in time order, to the interactions topic."""
    from streams.replay import publish_events, sample_replay

    settings = load_settings()
    try:
        events = sample_replay(data or settings.data.dataset, users, max_events, seed)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"--data: {exc}", 2)

    sent = publish_events(settings, events, rate)
    console.print(f"sent {sent} events of {len({e.user_id for e in events})} users to {settings.kafka.topic_interactions!r}")



# --- tail ------------------------------------------------------------------------------------------------
@cli.command()
def tail(
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest message")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON lines")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="stop after this many messages")] = None,
) -> None:
    """Print the recommendations topic as it arrives."""
    settings = load_settings()
    asyncio.run(_tail(settings, from_beginning, as_json, limit))


async def _tail(settings: Settings, from_beginning: bool, as_json: bool, limit: int | None) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.events import Recommendation

    consumer = AIOKafkaConsumer(settings.kafka.topic_recommendations, **client_options(settings.kafka),
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                enable_auto_commit=False, group_id=None)
    try:
        await consumer.start()
    except KafkaConnectionError:
        await consumer.stop()
        raise
    n = 0
    try:
        async for msg in consumer:
            if msg.value is None:  # tombstone: the user was forgotten (slimstream forget)
                key = msg.key.decode("utf-8", "replace") if msg.key else ""
                print(json.dumps({"user_id": key, "forgotten": True}) if as_json else f"{key}: forgotten", flush=True)
            elif as_json:
                print(msg.value.decode(), flush=True)
            else:
                show_recommendation(Recommendation.model_validate_json(msg.value))
            n += 1
            if limit and n >= limit:
                break
    finally:
        await consumer.stop()


def show_recommendation(rec, out: Console | None = None) -> None:  # type: ignore[no-untyped-def]
    out = out or console
    top = ", ".join(f"{i.title} ({i.score:.2f})" for i in rec.items[:5])
    head = (f"[bold]{rec.user_id}[/] v{rec.window_version} [{'green' if rec.path == 'slow' else 'cyan'}]"
            f"{rec.path.value}[/] {'current' if rec.rationale_current else 'previous'} rationale, {rec.ranker_version}")
    if rec.path.value == "slow" and rec.rationale:
        out.print(Panel(f"[bold]Top:[/] {top}\n\n{rec.rationale}", title=head, title_align="left",
                        subtitle=rec.rationale_model_version or "", subtitle_align="right"))
    else:
        out.print(f"{head}: {top}")


