"""aiokafka against a broker that numbers group generations from 0 (Tansu 0.6.0).

aiokafka's consumer leaves its group on close only when ``generation > 0``: Apache Kafka's first generation is
1, so 0 never names a joined member there. Tansu's first generation is 0, so the first member of a fresh group
never sent LeaveGroup: on a graceful stop it stayed in the group until its session expired, and the worker
started after it was handed a JoinGroup answer naming the departed member as leader, waited for an assignment
that never came and joined again: ~13 s more to recover (``benchmarks/recovery.py``, the restart after the
first start). The membership test here is the one Kafka's Java client makes: a member id and a generation that
is not the "no generation" sentinel (-1).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)
_INSTALLED = False


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
