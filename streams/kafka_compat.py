"""aiokafka and Faust against Tansu 0.6.0: group generations from 0, and a ListOffsets answer short of the end.

aiokafka's consumer leaves its group on close only when ``generation > 0``: Apache Kafka's first generation is
1, so 0 never names a joined member there. Tansu's first generation is 0, so the first member of a fresh group
never sent LeaveGroup: on a graceful stop it stayed in the group until its session expired, and the worker
started after it was handed a JoinGroup answer naming the departed member as leader, waited for an assignment
that never came and joined again: ~13 s more to recover (``benchmarks/recovery.py``, the restart after the
first start). The membership test here is the one Kafka's Java client makes: a member id and a generation that
is not the "no generation" sentinel (-1).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from faust.types import TP

    from streams.settings import KafkaSettings

log = logging.getLogger(__name__)
_INSTALLED = False
_KAFKA: KafkaSettings | None = None  # the settings probe_changelog_ends installed the probe with


def leave_group_from_generation_zero() -> None:
    """Make aiokafka's consumers leave their group on close from generation 0 too. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return
    import aiokafka.errors as errors
    from aiokafka.consumer.group_coordinator import GroupCoordinator
    from aiokafka.protocol.group import LeaveGroupRequest

    original = GroupCoordinator._maybe_leave_group

    async def _maybe_leave_group(self: Any) -> None:
        if self.generation == 0 and self.member_id and self._group_instance_id is None:
            try:
                await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
            except errors.KafkaError as err:  # a best effort, as aiokafka's own: the session expires anyway
                log.error("LeaveGroup request failed: %s", err)
            else:
                log.info("LeaveGroup request succeeded (generation 0)")
            self.reset_generation()
            return
        await original(self)

    GroupCoordinator._maybe_leave_group = _maybe_leave_group
    _INSTALLED = True


# --- Tansu's ListOffsets(latest) answer -----------------------------------------------------------------------
#
# Tansu 0.6.0 answers ListOffsets(latest) with the base offset of a partition's last record batch + 1, not the
# offset after its last record. Faust's changelog recovery takes that answer for the end of the log: with
# several records in the last batch it stops early and drops the rest (tests/test_recovery.py's control case).
# Sending every record as its own batch made the answer exact, but it made each produce request carry one record
# per partition: the window path's largest cost on the spread mix (benchmarks/window_path.py). Instead, recovery
# now asks where the log really ends: a fetch from the reported end - 1 returns the whole last batch, whose last
# record says it. One short-lived consumer per recovery (a few fetches of a few KB); on Apache Kafka, where the
# answer is exact, the probe finds the same end (KafkaSettings.probe_log_end turns it off there).


async def log_ends(kafka: KafkaSettings, reported: Mapping[TP, int], timeout_s: float = 5.0) -> dict[TP, int]:
    """The offset after the last record of each partition whose ListOffsets answer was ``reported`` (> 0):
    read from ``reported - 1`` until a fetch brings nothing newer. Where the broker says nothing in time, the
    reported answer stands."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from streams.kafka_auth import client_options

    ends = dict(reported)
    wanted = {TopicPartition(tp.topic, tp.partition): tp for tp, end in reported.items() if end > 0}
    if not wanted:
        return ends
    consumer = AIOKafkaConsumer(enable_auto_commit=False, group_id=None, fetch_max_wait_ms=10,
                                **client_options(kafka))
    await consumer.start()
    try:
        consumer.assign(list(wanted))
        for part, tp in wanted.items():
            consumer.seek(part, reported[tp] - 1)
        pending = set(wanted)  # partitions whose last fetch still brought records
        seen: set[TopicPartition] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while pending and loop.time() < deadline:
            got = await consumer.getmany(*pending, timeout_ms=100)
            for part in list(pending):
                records = got.get(part)
                if records:
                    seen.add(part)
                    tp = wanted[part]
                    ends[tp] = max(ends[tp], records[-1].offset + 1)
                elif part in seen:
                    pending.discard(part)  # read to the end: a fetch after the last batch came back empty
        for part in pending - seen:
            log.warning("no record at %s[%d] from offset %d within %.0fs: its reported end %d stands",
                        part.topic, part.partition, reported[wanted[part]] - 1, timeout_s, reported[wanted[part]])
    finally:
        await consumer.stop()
    return ends


def probe_changelog_ends(kafka: KafkaSettings) -> None:
    """Make Faust's recovery read each changelog partition to its last record (see :func:`log_ends`).
    Idempotent; the settings of the latest call are used."""
    from faust.tables.recovery import Recovery

    global _KAFKA
    _KAFKA = kafka
    if getattr(Recovery._build_highwaters, "_slimstream_probed", False):
        return
    original = Recovery._build_highwaters

    async def _build_highwaters(self: Any, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        await original(self, consumer, tps, destination, title)
        assert _KAFKA is not None
        # Faust keeps the end - 1 (the last offset it must have read); -1 for an empty partition.
        reported = {tp: destination[tp] + 1 for tp in tps if destination.get(tp) is not None and destination[tp] >= 0}
        ends = await log_ends(_KAFKA, reported)
        moved = {tp: end for tp, end in ends.items() if end > reported[tp]}
        for tp, end in moved.items():
            destination[tp] = end - 1
        if moved:
            self.log.info("Highwater for %s changelog partitions past the broker's answer (last batch read): %s",
                          title, {f"{tp.topic}[{tp.partition}]": end - 1 for tp, end in moved.items()})

    _build_highwaters._slimstream_probed = True  # type: ignore[attr-defined]
    Recovery._build_highwaters = _build_highwaters  # type: ignore[method-assign]
