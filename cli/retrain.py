"""``slimstream retrain``: one retrain cycle, or one per period and on drift decisions."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.base import cli, console, fail, load_settings, quiet_kafka_log
from cli.models import open_registry


# --- retrain ---------------------------------------------------------------------------------------------
@cli.command()
def retrain(
    every: Annotated[Optional[str], typer.Option(help="run a cycle now and then every DURATION (90s, 30m, 1h, 1h30m); "
                                                     "a drift decision on the drift topic wakes it early")] = None,
    data: Annotated[Optional[str], typer.Option(help="offline source instead of the interactions topic: ml-100k, "
                                                    "ml-1m or a directory of interactions + items files")] = None,
    max_events: Annotated[Optional[int], typer.Option(min=1, help="most recent events per cycle (with --data: the "
                                                                  "dataset's last N); default SLIMSTREAM_RETRAIN_MAX_EVENTS")] = None,
    max_users: Annotated[Optional[int], typer.Option(min=2, help="drifted users per cycle (default SLIMSTREAM_RETRAIN_MAX_USERS)")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="training steps (default SLIMSTREAM_RETRAIN_MAX_STEPS)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="build and evaluate the candidate, never promote it")] = False,
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory (default <data_dir>/registry)")] = None,
) -> None:
    """Retrain: drifted users' recent events -> teacher rationales -> continue-trained student -> gate -> registry.

    One cycle, or with --every one cycle per period. A candidate that passes the gate is promoted and announced
    to the workers (model-updates topic); a rejected one stays in the registry, unpromoted.
    """
    from models.openai_client import ChatError
    from retrain.job import default_publisher, retrain_once
    from retrain.triggers import parse_duration, retrain_every

    interval = None
    if every is not None:
        try:
            interval = parse_duration(every)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--every") from None
    if data is not None:
        from streams.datasets import load_items

        try:
            load_items(data)
        except (ValueError, FileNotFoundError) as exc:
            fail(f"--data: {exc}", 2)
    settings = load_settings()
    if max_steps is not None:
        settings = settings.updated(retrain={"max_steps": max_steps})
    reg = open_registry(registry)
    announce = default_publisher(settings, reg)
    announce_ranker = default_publisher(settings, reg.rankers())

    def publish(**update: object) -> None:
        with quiet_kafka_log():
            announce(**update)

    def publish_ranker(**update: object) -> None:
        with quiet_kafka_log():
            announce_ranker(**update)

    def say(message: str, style: str = "") -> None:
        import time

        from rich.markup import escape

        text = escape(message) if not style else f"[{style}]{escape(message)}[/]"
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}", soft_wrap=True)

    def cycle(reason: object) -> object:
        return retrain_once(settings, data=data, registry=reg, drift_reason=reason,
                            publish=None if dry_run else publish, dry_run=dry_run,
                            max_users=max_users, max_events=max_events, progress=say,
                            ranker_publish=None if dry_run else publish_ranker)

    def show(result) -> None:  # type: ignore[no-untyped-def]
        if result.ranker is not None:
            r = result.ranker
            m = r.get("metrics") or {}
            figures = (f" NDCG@10 {m['served']['NDCG@10']:.4f} vs serving "
                       f"{(m.get('current') or {}).get('NDCG@10', float('nan')):.4f} on {m['users']} users;"
                       if m.get("served") else "")
            say(f"ranker {r.get('version') or ''} ({r['status']}):{figures} {r['reason']}")
        if result.status == "skipped":
            say(f"skipped: {result.reason}")
            return
        cand, cur = result.candidate_metrics or {}, result.current_metrics or {}
        say(f"{result.version} ({result.status}): NDCG@10 {cand.get('ndcg@10', float('nan')):.4f} vs "
            f"{cur.get('ndcg@10', float('nan')):.4f}, HR@10 {cand.get('hr@10', float('nan')):.4f} vs "
            f"{cur.get('hr@10', float('nan')):.4f} (candidate vs {result.parent_version or 'base'}) on "
            f"{len(result.heldout_users)} held-out users; {result.new_records} new + {result.replay_records} "
            f"replayed records; {result.reason}")
        if result.status == "promoted" and result.publish_error:
            say(f"CURRENT is {result.version}, but the model update was not published ({result.publish_error}); "
                "`slimstream models publish` re-announces it", "yellow")

    if interval is None:
        try:
            show(cycle(None))
        except ChatError as exc:
            fail(f"teacher at {settings.teacher.url} (SLIMSTREAM_TEACHER_URL) failed: {exc}")
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
        return

    def failed(exc: BaseException) -> None:
        say(f"cycle failed: {' '.join(str(exc).split()) or type(exc).__name__}; next one on schedule", "red")

    say(f"retraining every {every} (and at once on a drift decision, if the drift topic exists); Ctrl-C stops")
    try:
        asyncio.run(retrain_every(interval, cycle, settings, on_result=show, on_error=failed))
    except KeyboardInterrupt:
        # A cycle may be running in a thread (training cannot be interrupted); every registry change is atomic,
        # so leave now instead of waiting for it.
        console.print("stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


