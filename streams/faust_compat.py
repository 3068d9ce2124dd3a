"""Faust's consumer keeps its committed-offset bookkeeping only for commits that happened.

faust-streaming 0.15.3's ``Consumer._commit_offsets`` records the offsets it tried to commit as committed even
when the commit failed (``_commit`` returns False on "the group has already rebalanced"). If the rebalance has
already re-seeded that bookkeeping from the broker (the partitions kept, sought to the group's committed
offset), the failed attempt's higher offset overwrites it: the redelivered events below it are no longer
acknowledged (``ack`` ignores offsets under the recorded commit) and, once the partition has no newer events,
nothing is ever committed again. The group's committed offset then stays short of the end for good while every
event has been applied: a drain that never finishes. That is what ``tests/test_reliability.py``'s failover once
showed in CI (the survivor owned every partition, the drain never came), and this race fits it: the survivor's
last commit of a finished partition meeting the rebalance after the kill. It was not reproduced here (ten runs,
under load too), so the fit is an inference; the race itself is reproduced in tests/test_faust_compat.py.
At-least-once still held (a restart would reprocess), but lag never reaches zero.

faust-streaming fixed it upstream (PR #692, for issue #316: the update moves inside ``if did_commit``); no
release on PyPI carries it yet. :func:`commit_bookkeeping_only_on_success` installs the same method with that one
change where the installed Faust still has the old one, and does nothing where it does not.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)
_UNCONDITIONAL = "\n        self._committed_offset.update(committable_offsets)\n"  # at the method's own indentation


def commit_bookkeeping_only_on_success() -> bool:
    """Install the fixed ``Consumer._commit_offsets``. Idempotent; True if the installed Faust needed it."""
    from faust.transport.consumer import Consumer

    current = Consumer._commit_offsets
    if getattr(current, "_slimstream_fixed", False):
        return True
    if _UNCONDITIONAL not in inspect.getsource(current):
        return False  # a Faust with the upstream fix (or another body): leave it alone
    Consumer._commit_offsets = _commit_offsets  # type: ignore[method-assign]
    return True


async def _commit_offsets(self: Any, offsets: Mapping[Any, int], start_new_transaction: bool = True) -> bool:
    """faust-streaming 0.15.3's ``Consumer._commit_offsets``, the bookkeeping inside ``if did_commit``."""
    from mode import flight_recorder

    assignment = self.assignment()
    committable_offsets: dict[Any, int] = {}
    revoked: dict[Any, int] = {}
    for tp, offset in offsets.items():
        if tp in assignment:
            committable_offsets[tp] = offset
        else:
            revoked[tp] = offset
    if revoked:
        self.log.info("Discarded commit for revoked partitions that will be eventually processed again: %r",
                      revoked)
    if not committable_offsets:
        return False
    with flight_recorder(self.log, timeout=300.0) as on_timeout:
        did_commit = False
        on_timeout.info("+consumer.commit()")
        if self.in_transaction:
            did_commit = await self.transactions.commit(committable_offsets,
                                                        start_new_transaction=start_new_transaction)
        else:
            await self.app.producer.flush()
            did_commit = await self._commit(committable_offsets)
        on_timeout.info("-consumer.commit()")
        if did_commit:
            on_timeout.info("+tables.on_commit")
            self.app.tables.on_commit(committable_offsets)
            on_timeout.info("-tables.on_commit")
            # The one change: only a commit that happened moves the bookkeeping (and the monitor).
            self._committed_offset.update(committable_offsets)
            self.app.monitor.on_tp_commit(committable_offsets)
        else:
            _acked_again(self, committable_offsets)
            log.warning("offset commit did not happen (%r); offsets stay to be committed again", committable_offsets)
    return did_commit


def _acked_again(self: Any, offsets: Mapping[Any, int]) -> None:
    """Put the offsets a failed commit took from the acked list back (``_new_offset`` removes them before the
    commit is tried). After the rebalance such a failure means, the partitions were revoked and their lists
    cleared anyway, and the events come again; but where a partition was kept without a revocation, the next
    commit would otherwise find a hole at the head of the list and never commit that partition again. Those
    events' effects are done: they are acknowledged."""
    assignment = self.assignment()
    for tp, end in offsets.items():
        start = self._committed_offset.get(tp)
        if tp not in assignment or start is None:
            continue  # not ours any more, or sought afresh: its events come again and are acked then
        index = self._acked_index[tp]
        again = [o for o in range(start, end) if o not in index]
        index.update(again)
        self._acked[tp].extend(again)


_commit_offsets._slimstream_fixed = True  # type: ignore[attr-defined]
