"""A Faust worker with the project's app (its windows table, so a recovery runs at every start) and one agent
that writes each interactions record it receives to ``$OUT``: for tests/test_faust_resume.py.

``SEEK_DELAY_S`` sleeps before every seek to the committed offsets, the window in which Faust's own
``on_recovery_completed`` lets its fetcher deliver records it then clears (streams/faust_resume.py);
``AGENT_DELAY_S``: the agent starts iterating only that long after recovery completed (as the window agent
waits for its vector store, or a loop busy with 100,000 recovered users gets to it late), so what was delivered
before is still queued when the queues are cleared; ``RESUME_FIX=0`` puts Faust's method back, to show that window."""

from __future__ import annotations

import asyncio
import os

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer

UPSTREAM = Recovery.on_recovery_completed  # before streams.app installs the reordered one

from streams.app import app, interactions_topic  # noqa: E402

if os.environ.get("RESUME_FIX", "1") == "0":
    Recovery.on_recovery_completed = UPSTREAM  # type: ignore[method-assign]

_perform_seek = Consumer.perform_seek
_delay = float(os.environ.get("SEEK_DELAY_S", "0"))


async def _slow_seek(self: Consumer) -> None:
    await asyncio.sleep(_delay)  # the fetcher runs meanwhile
    await _perform_seek(self)


Consumer.perform_seek = _slow_seek  # type: ignore[method-assign]
_out = open(os.environ["OUT"], "a", buffering=1)


@app.agent(interactions_topic)
async def record(stream):  # type: ignore[no-untyped-def]
    await app.tables.recovery.completed.wait()  # set just before the queues are cleared
    await asyncio.sleep(float(os.environ.get("AGENT_DELAY_S", "0")))
    async for event in stream.events():
        _out.write(f"{event.message.partition} {event.message.offset}\n")


if __name__ == "__main__":
    from faust.worker import Worker

    Worker(app, loglevel="info", quiet=True).execute_from_commandline()
