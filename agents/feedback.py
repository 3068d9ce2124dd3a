"""What the worker remembers of the recommendations it sent: the newest ones per user (the pull API answers
with the newest; an event's ``recommendation_id`` is attributed to the one it names) and the impressions and
responses per ranker version and path (feedback attribution: ``/stats/``, ``/metrics``).

Per worker and in memory, like the drift judge: a user's recommendations are produced by the owner of the
user's partition, which is also the worker that reads the user's events, so both sides of an attribution meet
in one process. After a restart or a rebalance the new owner knows nothing sent before it: an event naming an
older recommendation is counted as ``unattributed`` rather than guessed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from streams.events import Recommendation

OUTCOMES = ("hit", "miss", "unattributed")


@dataclass(frozen=True)
class Sent:
    """One recommendation as attribution needs it."""

    recommendation_id: str
    items: frozenset[str]
    ranker_version: str
    path: str
    student_version: str | None
    judged_version: str | None  # the version the drift judge files it under (the rationale's student)


class RecentRecommendations:
    """The newest ``per_user`` recommendations of the ``max_users`` most recently served users."""

    def __init__(self, max_users: int, per_user: int) -> None:
        if max_users < 1 or per_user < 1:
            raise ValueError("max_users and per_user must be at least 1")
        self.max_users = max_users
        self.per_user = per_user
        self._latest: OrderedDict[str, Recommendation] = OrderedDict()
        self._sent: dict[str, OrderedDict[str, Sent]] = {}

    def add(self, rec: Recommendation) -> None:
        user = rec.user_id
        self._latest[user] = rec
        self._latest.move_to_end(user)
        sent = self._sent.setdefault(user, OrderedDict())
        sent[rec.recommendation_id] = Sent(rec.recommendation_id, frozenset(i.item_id for i in rec.items),
                                           rec.ranker_version, rec.path.value, rec.student_version,
                                           rec.rationale_model_version)
        sent.move_to_end(rec.recommendation_id)
        while len(sent) > self.per_user:
            sent.popitem(last=False)
        while len(self._latest) > self.max_users:
            old, _ = self._latest.popitem(last=False)
            self._sent.pop(old, None)

    def latest(self, user_id: str) -> Recommendation | None:
        return self._latest.get(user_id)

    def find(self, user_id: str, recommendation_id: str) -> Sent | None:
        return self._sent.get(user_id, {}).get(recommendation_id)

    def forget(self, user_id: str) -> None:
        self._latest.pop(user_id, None)
        self._sent.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._latest)


class Attribution:
    """Impressions (recommendations sent) and the events that named one, per (ranker version, path): a hit
    when the event's item was among the named recommendation's items."""

    def __init__(self) -> None:
        self.impressions: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.responses: defaultdict[tuple[str, str, str], int] = defaultdict(int)  # (ranker, path, outcome)

    def impression(self, rec: Recommendation) -> None:
        self.impressions[(rec.ranker_version, rec.path.value)] += 1

    def response(self, sent: Sent | None, item_id: str) -> bool | None:
        """Count one event that named a recommendation (``sent``: the one found, None: not known here);
        True/False: whether the item was among its items, None: unattributed."""
        if sent is None:
            self.responses[("unknown", "unknown", "unattributed")] += 1
            return None
        hit = item_id in sent.items
        self.responses[(sent.ranker_version, sent.path, "hit" if hit else "miss")] += 1
        return hit

    def snapshot(self) -> dict[str, Any]:
        """``{"<ranker>/<path>": {"impressions", "hits", "misses", "hit_rate"}, "unattributed": n}``."""
        out: dict[str, Any] = {}
        keys = set(self.impressions) | {(r, p) for r, p, o in self.responses if o != "unattributed"}
        for ranker, path in sorted(keys):
            hits = self.responses.get((ranker, path, "hit"), 0)
            misses = self.responses.get((ranker, path, "miss"), 0)
            out[f"{ranker}/{path}"] = {"impressions": self.impressions.get((ranker, path), 0), "hits": hits,
                                       "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None}
        out["unattributed"] = self.responses.get(("unknown", "unknown", "unattributed"), 0)
        return out


class ArmCounts:
    """Per A/B arm: impressions, judged events and hits (the online hit rate), attributed events and hits."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def add(self, arm: str, key: str, n: int = 1) -> None:
        arm_counts = self.counts.setdefault(arm, {})
        arm_counts[key] = arm_counts.get(key, 0) + n


class Trending:
    """Items of this worker's recent events, each event's weight halving every ``half_life`` events after it:
    what a user nobody knows yet is shown (the popularity fallback of a stream, not of a training set).

    O(1) per event: instead of decaying every count, each new event weighs 2**(n / half_life) more, and the
    counts are rescaled once that weight grows large. At most ``max_items`` items are kept (the lightest are
    dropped when twice as many accumulated)."""

    def __init__(self, half_life: int = 5_000, max_items: int = 50_000) -> None:
        self.half_life = half_life
        self.max_items = max_items
        self._counts: dict[str, float] = {}
        self._events = 0
        self._weight = 1.0

    def add(self, item_id: str) -> None:
        self._events += 1
        self._weight = 2.0 ** (self._events / self.half_life)
        self._counts[item_id] = self._counts.get(item_id, 0.0) + self._weight
        if self._weight > 1e12:
            self._counts = {i: c / self._weight for i, c in self._counts.items()}
            self._events, self._weight = 0, 1.0
        if len(self._counts) > 2 * self.max_items:
            keep = sorted(self._counts.items(), key=lambda kv: kv[1], reverse=True)[:self.max_items]
            self._counts = dict(keep)

    def top(self, k: int, exclude: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, float]]:
        """The ``k`` most trending items not in ``exclude``, with their decayed event counts."""
        ranked = heapq.nlargest(k + len(exclude), self._counts.items(), key=lambda kv: kv[1])
        return [(i, c / self._weight) for i, c in ranked if i not in exclude][:k]

    def __len__(self) -> int:
        return len(self._counts)


__all__ = ["OUTCOMES", "ArmCounts", "Attribution", "RecentRecommendations", "Sent", "Trending"]
