"""``slimstream forget USER_ID``: the user's right to be forgotten, in the stream and on disk."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from pydantic import ValidationError

from cli.base import cli, console, fail, load_settings
from streams.events import ForgetUser, describe_validation_error


@cli.command()
def forget(
    user_id: Annotated[str, typer.Argument(help="the user id, as in their events")],
    publish: Annotated[bool, typer.Option(help="send the forget control record to the interactions topic "
                                                "(the workers delete the window, rationale and recommendation)")] = True,
) -> None:
    """Forget a user: the workers' state (through a control record on the user's partition), the datasets and
    cached teacher answers under the data directory, and later teacher datasets and retrain cycles."""
    try:
        record = ForgetUser(control="forget", user_id=user_id, requested_at=time.time())
    except ValidationError as exc:
        raise typer.BadParameter(describe_validation_error(exc), param_hint="USER_ID") from None
    from retrain.forget import ForgetLedger, scrub_files
    from streams.replay import start_producer

    settings = load_settings()
    if publish:
        async def send() -> None:
            producer = await start_producer(settings)
            try:
                await producer.send_and_wait(settings.kafka.topic_interactions, key=user_id.encode(),
                                             value=record.model_dump_json().encode())
            finally:
                await producer.stop()

        asyncio.run(send())  # first: if Kafka is unreachable nothing below has run and a retry does it all
        console.print(f"forget record for {user_id!r} sent to {settings.kafka.topic_interactions!r}")
    ForgetLedger.for_settings(settings).add(user_id, record.requested_at)
    try:
        report = scrub_files(settings, user_id)
    except OSError as exc:
        fail(f"forget {user_id!r}: {exc}")
    for path, n in report.files.items():
        console.print(f"  {path}: {n} record(s) removed")
    console.print(f"forgot {user_id!r} on disk: {report.records} dataset record(s) in {len(report.files)} file(s), "
                  f"{report.cache_rows} cached answer(s); later datasets and retrain cycles skip the user")
