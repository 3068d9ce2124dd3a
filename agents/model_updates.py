"""Hot swap: every worker follows the ``model-updates`` topic and swaps its student without a restart.

The updates are a broadcast, not work to share out, so this is not a Faust agent (an agent's topic is split
among the app's consumer group, and only one worker would see each update). Each worker runs its own
groupless aiokafka consumer that is assigned every partition of the topic and commits nothing.

Start-up without a gap: the consumer's position is fixed at the topic's end first; then, once the runtime has
loaded the registry's CURRENT, the worker reads CURRENT again and swaps if a promotion landed in between. A
promotion published before the position was fixed changed the registry before that, so the re-read sees it;
one published after is read from the topic. Updates already in the topic when the worker starts are not
replayed: the registry it loaded from is newer than them.

Per update (:meth:`agents.runtime.Runtime.swap_student`): idempotent (the version already served: no-op),
serialised, loaded in a thread while the old student keeps serving and the interaction agents keep consuming,
a failed load keeps the old student. Of several updates read in one fetch only the last counts (each names
the version CURRENT at its time).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from mode import Service
from pydantic import ValidationError

from agents.state import runtime
from streams.app import app, settings
from streams.events import ModelUpdate
from streams.kafka_auth import client_options

log = logging.getLogger(__name__)


@app.service
class ModelUpdateListener(Service):
    async def on_start(self) -> None:
        self.add_future(self._run())

    async def _run(self) -> None:
        offsets: dict[TopicPartition, int] | None = None  # next offset per partition once positioned
        while not self.should_stop:
            consumer = AIOKafkaConsumer(
                **client_options(settings.kafka), group_id=None, enable_auto_commit=False,
                auto_offset_reset="latest", client_id=f"{settings.kafka.app_id}-model-updates",
            )
            try:
                await consumer.start()
                tps = await _assign_all(consumer, settings.kafka.topic_model_updates)
                if offsets is None:  # first start: from the end, then catch up with the registry
                    await consumer.seek_to_end(*tps)
                    offsets = {tp: await consumer.position(tp) for tp in tps}
                    log.info("following %r from offsets %s", settings.kafka.topic_model_updates,
                             {tp.partition: o for tp, o in offsets.items()})
                    await self._reconcile()
                else:  # reconnected: resume where we were
                    for tp in tps:
                        consumer.seek(tp, offsets.get(tp, 0))
                await self._consume(consumer, tps, offsets)
            except asyncio.CancelledError:
                raise
            except Exception:  # the broker went away, metadata trouble: retry; never take the worker down
                runtime.metrics["model_update_listener_errors"] += 1
                log.exception("model-updates listener failed; retrying in 2 s")
                await self.sleep(2.0)
            finally:
                await consumer.stop()

    async def _reconcile(self) -> None:
        await runtime.models_ready.wait()
        current = await asyncio.to_thread(runtime.registry.current)
        if current != runtime.student_version:
            log.info("registry CURRENT changed to %s while the worker was starting", current)
            await runtime.swap_student(current, reason="start-up: registry CURRENT changed while loading")
        if runtime.rankers.enabled:
            ranker = await asyncio.to_thread(runtime.rankers.registry.current)
            if ranker != runtime.rankers.version:
                log.info("ranker CURRENT changed to %s while the worker was starting", ranker)
                await runtime.swap_ranker(ranker, reason="start-up: ranker CURRENT changed while loading")

    async def _consume(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition],
                       offsets: dict[TopicPartition, int]) -> None:
        while not self.should_stop:
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            updates: list[ModelUpdate] = []
            for tp, records in batch.items():
                for record in records:
                    offsets[tp] = record.offset + 1
                    runtime.metrics["model_updates_received"] += 1
                    try:
                        updates.append(ModelUpdate.model_validate_json(record.value or b""))
                    except ValidationError as exc:
                        runtime.metrics["model_updates_invalid"] += 1
                        log.error("ignoring invalid model update at offset %d: %s", record.offset, exc)
            # Topic order is the order of the registry changes: per component only the last one counts.
            for component in ("student", "ranker"):
                mine = [u for u in updates if u.component == component]
                if mine:
                    runtime.metrics["model_updates_superseded"] += len(mine) - 1
                    await self._apply(mine[-1])

    async def _apply(self, update: ModelUpdate) -> None:
        registry = runtime.rankers.registry if update.component == "ranker" else runtime.registry
        if update.registry_dir != str(registry.root.resolve()):
            # Paths may differ between hosts sharing one registry volume; the version is looked up here.
            log.warning("model update %s names registry %s; this worker serves from %s",
                        update.event_id, update.registry_dir, registry.root.resolve())
        log.info("model update %s: %s %s %s (%s)", update.event_id, update.component, update.action,
                 update.model_version, update.reason or "no reason given")
        reason = f"{update.action} {update.event_id}: {update.reason}"
        if update.component == "ranker":
            if runtime.rankers.enabled:
                await runtime.swap_ranker(update.version, reason=reason)
            return
        await runtime.swap_student(update.version, reason=reason)


async def _assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Assign every partition of ``topic`` (waiting for it to exist: the worker command creates it)."""
    for _ in range(60):
        await consumer.topics()  # refreshes the cluster metadata
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            return tps
        await asyncio.sleep(1.0)
    raise KafkaError(f"topic {topic!r} does not exist")
