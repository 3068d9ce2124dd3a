"""After a recovery, Faust resumes the input partitions before it clears its queues: records delivered in between
are dropped. Here they are not.

faust-streaming 0.15.3's ``Recovery.on_recovery_completed`` (unchanged on its master branch) does, in order:
resume the stream (non-changelog) partitions for its fetcher, ``await consumer.perform_seek()`` (seek each to its
committed offset), then ``app.flow_control.resume()``, which *clears every stream queue*. While the seek is
awaited the fetcher runs, and aiokafka has already prefetched those partitions during the recovery, so records
reach an agent's queue and are then cleared. Where the partition has a committed offset the seek has already
put the position back there and, to Faust, the clear looks harmless; where it has none (a group's first
start, a partition never committed) nothing is sought, the position stays past the dropped records, and they
are never read again in this process. Worse than a stall: once a later record of that partition is acked,
Faust commits past the hole and the dropped records are lost for good. faust-streaming issue #596 describes the
same race ("unrecoverable gaps in acked offsets"), open with no fix.

Found with ``benchmarks/recovery.py`` at 100,000 users with the memory store: the probe event published before
the start never reached the agent (the committed offset stayed unset; ``/consumer/`` showed the partition not
paused, its position past the probe, nothing buffered). A 30 s changelog read leaves plenty prefetched and makes
the window wide; shorter recoveries hit it less often.

:func:`clear_queues_before_resuming_streams` installs the same method in the safe order: seek while the stream
partitions are still paused, then clear the queues, then resume the partitions (records fetched from then on
stay); a stream partition with no committed offset is sought to its beginning (the group's ``earliest`` reset:
what was read before is read again, and the window agent recognises every redelivered event). Installed only
where the installed Faust has the body it replaces.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

log = logging.getLogger(__name__)
# The order this fixes, as the installed method spells it (whitespace-insensitive).
_RACY = ("consumer.resume_partitions(", "consumer.perform_seek()", "self.completed.set()",
         "self.app.flow_control.resume()")


def clear_queues_before_resuming_streams() -> bool:
    """Install the reordered ``Recovery.on_recovery_completed``. Idempotent; True if installed."""
    from faust.tables.recovery import Recovery

    current = Recovery.on_recovery_completed
    if getattr(current, "_slimstream_fixed", False):
        return True
    source = inspect.getsource(current)
    positions = [source.find(part) for part in _RACY]
    if -1 in positions or positions != sorted(positions):
        return False  # another body (a Faust with its own fix): leave it alone
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
    return True


async def _on_recovery_completed(self: Any, generation_id: int = 0) -> None:
    """faust-streaming 0.15.3's ``Recovery.on_recovery_completed``: seek, clear, then resume the streams."""
    from typing import cast

    consumer = self.app.consumer
    self.log.info("Restore complete!")
    await self.app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callback_coros = [
        asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table],
                                                          self.standbys_for_table[table]))
        for table in self.tables.values()
    ]
    if callback_coros:
        await asyncio.wait(callback_coros)
    assignment = consumer.assignment()
    if self.app.consumer_generation_id != generation_id:
        self.log.warning(f"Recovery rebalancing again app id {self.app.consumer_generation_id} "
                         f"param {generation_id}")
        return
    streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
    if assignment:
        # The stream partitions are still paused (Faust paused them at the rebalance): nothing of theirs is
        # delivered while the seek is awaited.
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
        never_committed = sorted(tp for tp in streams if consumer._committed_offset.get(tp) is None)
        if never_committed:
            # No committed offset: whatever was delivered before is cleared below, so read it again.
            self.log.info("Seek stream partitions without a committed offset to their beginning: %r",
                          never_committed)
            from aiokafka.structs import TopicPartition  # aiokafka checks the type; Faust's TP is its own

            await self._wait(consumer._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition)
                                                                 for tp in never_committed)),
                             timeout=self.app.conf.broker_request_timeout)
    self.completed.set()
    self.log.dev("Resume stream partitions")
    self.app.flow_control.resume()  # clears the stream queues: only records from before the seek are in them
    consumer.resume_partitions(streams)  # and only now may the fetcher deliver these partitions' records
    consumer.resume_flow()
    await cast(Any, self.app)._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if not self.app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    self.app.on_rebalance_end()
    self.log.info("Worker ready")


_on_recovery_completed._slimstream_fixed = True  # type: ignore[attr-defined]
