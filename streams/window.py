"""A user's behaviour window: the pure state transition the window agent applies per event.

Kept free of Faust so the tests (and anyone auditing a replay) can recompute a window from the
interactions topic with exactly the worker's rules.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from streams.events import InteractionEvent, WindowItem


class WindowState(BaseModel):
    model_config = ConfigDict(frozen=True)

    user_id: str
    version: int = 0  # +1 per applied event; rationales and recommendations refer to it
    # When this window lineage began (ms since the epoch; 0: before epochs existed). Versions count from 1 again
    # if the windows changelog is lost while Qdrant keeps the rationales (a new Kafka cluster, a wiped topic);
    # a rationale is then newer by (epoch, version), so the fresh windows are not refused as stale.
    epoch: int = 0
    items: tuple[WindowItem, ...] = ()
    last_event_timestamp: float = 0.0
    # Where the newest applied event came from: a replay of an offset at or below it is a duplicate
    # (at-least-once redelivery after a crash), which must not append twice.
    partition: int = -1
    offset: int = -1
    recent_event_ids: tuple[str, ...] = Field(default=())

    @property
    def item_ids(self) -> list[str]:
        return [i.item_id for i in self.items]

    @property
    def key(self) -> tuple[int, int]:
        """How new this window is, comparable with a stored rationale's ``vectorstore.store.rationale_key``."""
        return self.epoch, self.version


def is_duplicate(state: WindowState | None, event: InteractionEvent, partition: int, offset: int) -> bool:
    if state is None:
        return False
    if partition == state.partition and offset <= state.offset:
        return True
    return event.event_id is not None and event.event_id in state.recent_event_ids


def apply_event(
    state: WindowState | None,
    event: InteractionEvent,
    partition: int,
    offset: int,
    window_size: int,
    keep_event_ids: int,
    epoch: int = 0,
) -> WindowState:
    """Append ``event`` (caller checked :func:`is_duplicate`) and keep the last ``worker.window_size`` items.
    ``epoch``: the new lineage's epoch when ``state`` is None (the worker passes the time; kept afterwards)."""
    state = state or WindowState(user_id=event.user_id, epoch=epoch)
    item = WindowItem(item_id=event.item_id, event_type=event.event_type, value=event.value,
                      timestamp=event.timestamp)
    # Re-interacting with an item moves it to the newest position instead of listing it twice.
    items = [i for i in state.items if i.item_id != event.item_id] + [item]
    ids = state.recent_event_ids
    if event.event_id is not None and keep_event_ids:
        ids = (ids + (event.event_id,))[-keep_event_ids:]
    return WindowState(
        user_id=state.user_id,
        version=state.version + 1,
        epoch=state.epoch,
        items=tuple(items[-window_size:]),
        last_event_timestamp=max(state.last_event_timestamp, event.timestamp),
        partition=partition,
        offset=offset,
        recent_event_ids=ids,
    )
