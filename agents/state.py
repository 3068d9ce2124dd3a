"""The worker's single :class:`Runtime`, started and stopped with the app as a Faust service."""

from __future__ import annotations

import logging

from mode import Service

from agents.runtime import Runtime
from streams.app import app, settings

log = logging.getLogger(__name__)
runtime = Runtime(settings)


class RuntimeService(Service):
    async def on_start(self) -> None:
        # Load in the background: the consumer joins its group meanwhile and the agents wait on
        # runtime.store_ready / models_ready before touching an event.
        self.add_future(self._start())

    async def _start(self) -> None:
        try:
            await runtime.start()
        except Exception:
            log.exception("worker runtime failed to start; stopping")
            await app.crash(RuntimeError("runtime failed to start"))

    async def on_stop(self) -> None:
        runtime.close()


# The app's first dependency, not an @app.service: Faust starts those only once table recovery is complete,
# so the encoder, the store and the ranker loaded after the group join (5 s on Tansu) instead of during it.
# First in, it starts before the consumer and, stopped in reverse order, closes the store after the agents.
app.add_dependency(RuntimeService())


def owned_partitions() -> set[int]:
    """The interactions partitions (= window table partitions: co-partitioned) this worker owns now."""
    topic = runtime.settings.kafka.topic_interactions
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
