"""After a recovery, Faust resumes the input partitions before it clears its queues: records delivered in between
are dropped. Here they are read again.

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

:func:`reread_uncommitted_after_recovery` wraps that method: once it has run, every input partition without a
committed offset is sought to its beginning (the group's ``earliest`` reset) and Faust's read offset for it
forgotten, so what the clear dropped is read again (and what was delivered since comes twice: the window agent
recognises every redelivered event). Partitions with a committed offset keep Faust's own handling. A first
version reordered the method instead (seek while paused, clear, resume); with it a failover survivor stopped
reading a partition it had kept (its fetch position at the end, Faust's read offset at the committed one, nothing
delivered), in CI and here, so Faust's order stays. Installed only where the installed Faust has the body this
was written against.
"""

from __future__ import annotations

import inspect
from typing import Any

# The racy order, as the method this was written against spells it: each piece must appear, in this order.
_RACY = ("consumer.resume_partitions(", "consumer.perform_seek()", "self.completed.set()",
         "self.app.flow_control.resume()")


def reread_uncommitted_after_recovery() -> bool:
    """Wrap ``Recovery.on_recovery_completed`` (see above). Idempotent; True if installed."""
    from faust.tables.recovery import Recovery

    current = Recovery.on_recovery_completed
    if getattr(current, "_slimstream_fixed", False):
        return True
    source = inspect.getsource(current)
    positions = [source.find(part) for part in _RACY]
    if -1 in positions or positions != sorted(positions):
        return False  # another body (a Faust with its own fix): leave it alone
    global _UPSTREAM
    _UPSTREAM = current
    Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
    return True


_UPSTREAM: Any = None  # Faust's own method, wrapped


async def _on_recovery_completed(self: Any, generation_id: int = 0) -> None:
    """Faust's ``on_recovery_completed``, then every input partition without a committed offset read again from
    its beginning: whatever the fetcher delivered for it before the queues were cleared is delivered again (the
    window agent recognises every redelivered event). Partitions with a committed offset were sought back there
    by Faust itself."""
    await _UPSTREAM(self, generation_id)
    consumer = self.app.consumer
    if self.app.consumer_generation_id != generation_id or not self.completed.is_set():
        return  # another rebalance came first: its own recovery does this again
    never_committed = sorted(tp for tp in consumer.assignment()
                             if not self._is_changelog_tp(tp) and consumer._committed_offset.get(tp) is None)
    if not never_committed:
        return
    from aiokafka.structs import TopicPartition  # aiokafka checks the type; Faust's TP is its own

    self.log.info("Read again from their beginning, as no offset was committed: %r", never_committed)
    for tp in never_committed:
        consumer._read_offset[tp] = None  # Faust drops offsets at or below its read offset
    await self._wait(consumer._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition)
                                                         for tp in never_committed)),
                     timeout=self.app.conf.broker_request_timeout)


_on_recovery_completed._slimstream_fixed = True  # type: ignore[attr-defined]
