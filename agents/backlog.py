"""The rationale backlog: which users wait for the student, coalesced per user, bounded, never blocking.

The window agent must never wait for the student (a 135M model writes a few rationales per second on a CPU,
a backlog delivers thousands of events per second). So a rationale request is not a message in a queue that
can fill up and push back on the fetcher: it is a mark on the user, ``O(1)`` to set, and setting it again
while the user still waits changes nothing (the request always means "the user's newest window", read from
the table when the student gets to it). The backlog therefore holds at most one entry per user, oldest first
(a user who keeps sending events does not jump the queue or starve the others), and at most ``max_users``:
past that the oldest request is shed (that user keeps the fast path, and their next event asks again).

Single event loop, no locks. Losing the backlog in a crash loses nothing durable: a restarted worker sweeps
its users' windows against the stored rationales and asks again for every window without a current one.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterable


class RationaleBacklog:
    def __init__(self, max_users: int = 100_000) -> None:
        if max_users < 1:
            raise ValueError(f"max_users must be at least 1, got {max_users}")
        self.max_users = max_users
        self._waiting: OrderedDict[str, float] = OrderedDict()  # user -> monotonic time of the first request
        self._nonempty = asyncio.Event()
        self.requested = 0  # every request, coalesced or not
        self.coalesced = 0  # requests for a user already waiting
        self.shed = 0  # requests dropped because the backlog was full
        self.high_water = 0  # the most users ever waiting at once

    def request(self, user_id: str, now: float | None = None) -> None:
        self.requested += 1
        if user_id in self._waiting:
            self.coalesced += 1
            return
        self._waiting[user_id] = time.monotonic() if now is None else now
        if len(self._waiting) > self.max_users:
            self._waiting.popitem(last=False)
            self.shed += 1
        self.high_water = max(self.high_water, len(self._waiting))
        self._nonempty.set()

    def take(self, n: int) -> list[str]:
        """Up to ``n`` users, the longest waiting first; they leave the backlog."""
        out = []
        while self._waiting and len(out) < n:
            out.append(self._waiting.popitem(last=False)[0])
        if not self._waiting:
            self._nonempty.clear()
        return out

    async def take_batch(self, n: int, within: float) -> list[str]:
        """Wait for a first user, then up to ``within`` seconds for the batch to fill to ``n``."""
        while not self._waiting:
            await self._nonempty.wait()
        if len(self._waiting) < n and within > 0:
            deadline = time.monotonic() + within
            while len(self._waiting) < n and time.monotonic() < deadline:
                await asyncio.sleep(min(0.05, within))
        return self.take(n)

    def discard(self, user_ids: Iterable[str]) -> None:
        for user_id in user_ids:
            self._waiting.pop(user_id, None)
        if not self._waiting:
            self._nonempty.clear()

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._waiting

    def oldest_age(self, now: float | None = None) -> float | None:
        if not self._waiting:
            return None
        first = next(iter(self._waiting.values()))
        return (time.monotonic() if now is None else now) - first

    def snapshot(self) -> dict[str, float | int | None]:
        age = self.oldest_age()
        return {"waiting_users": len(self), "high_water": self.high_water, "max_users": self.max_users,
                "oldest_wait_s": None if age is None else round(age, 3), "requested": self.requested,
                "coalesced": self.coalesced, "shed": self.shed}
