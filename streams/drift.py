"""Drift signals of the retrain loop: when has the stream moved far enough from what the student learned?

Three kinds of signal, each fed one event at a time by the stream (O(1) or O(K) per update, single event loop, so
no locking) and each compared with a :class:`DriftReference` taken when the serving student was distilled:

``hit_rate_drop``
    :class:`OnlineHitRate`: was an interaction's item in that user's last emitted top-K? The relative drop of
    the serving version's rolling hit rate below its value at the reference.
``genre_psi`` / ``genre_js``
    :class:`GenreDistribution`: the genre mix of the last N events against the reference mix, as population
    stability index and Jensen-Shannon divergence.
``rationale_distance``
    :class:`RationaleCentroid`: 1 - cosine between the mean of recent unit rationale embeddings and the
    reference centroid. The rationales are what the recommendations are retrieved with, so a move here is a
    move of what the service believes users want.

:class:`StaleShare` (the share of recommendations served without a current rationale) is *not* one of them:
a backlog of rationale requests makes every user look stale at once, which says the student is behind
(load), not that users moved; the worker reports it with its load figures and it never triggers a retrain.

:class:`DriftMonitor` owns the drift signals; :meth:`DriftMonitor.decide` returns a :class:`DriftDecision` naming
every signal over its threshold, or None. Deciding what to do about it (retrain, alert) is the caller's job.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from streams.drift_reference import DriftReference, GenreSnapshot
from streams.registry import utc_now
from streams.settings import DriftSettings

if TYPE_CHECKING:
    from streams.datasets import Item
    from streams.settings import Settings

DEFAULT_PSI_EPS = 1e-4
# Float sums updated by add/subtract gather rounding error; rebuilding them from the window every this many
# evictions (amortised O(1) per event) keeps them exact enough forever.
_REBUILD_EVERY = 4096


# --- distribution distances ------------------------------------------------------------------------------
def _aligned(p: Mapping[str, float], q: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """Both distributions over the union of their keys, each normalised to sum 1."""
    keys = sorted(set(p) | set(q))
    a = np.array([float(p.get(k, 0.0)) for k in keys], dtype=np.float64)
    b = np.array([float(q.get(k, 0.0)) for k in keys], dtype=np.float64)
    for name, v in (("p", a), ("q", b)):
        if (v < 0).any() or not np.isfinite(v).all():
            raise ValueError(f"{name} has negative or non-finite weights")
        if v.sum() <= 0:
            raise ValueError(f"{name} is empty (total weight 0)")
    return a / a.sum(), b / b.sum()


def psi(p: Mapping[str, float], q: Mapping[str, float], eps: float = DEFAULT_PSI_EPS) -> float:
    """Population stability index ``sum (p_i - q_i) ln(p_i / q_i)`` over the union of keys.

    ``p`` and ``q`` are counts or proportions (each is normalised). A category absent on one side would make
    the index infinite, so both are smoothed additively with ``eps`` per category and renormalised; with
    ``eps=0`` a missing category gives ``inf``. Symmetric; 0.1-0.2 is usually read as a moderate shift,
    above 0.2 as a significant one.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    a, b = _aligned(p, q)
    a = (a + eps) / (1.0 + eps * a.size)
    b = (b + eps) / (1.0 + eps * b.size)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (a - b) * np.log(a / b)
    terms = np.where(a == b, 0.0, terms)  # 0 * log(0/0) is "no difference", not NaN
    return float(terms.sum())


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence in bits (0 = identical, 1 = disjoint supports); no smoothing needed."""
    a, b = _aligned(p, q)
    m = 0.5 * (a + b)

    def kl(x: np.ndarray) -> float:
        nz = x > 0  # m > 0 wherever x > 0
        return float((x[nz] * np.log2(x[nz] / m[nz])).sum())

    # Clip: rounding can leave a hair below 0 or above 1.
    return min(1.0, max(0.0, 0.5 * kl(a) + 0.5 * kl(b)))


# --- online hit rate -------------------------------------------------------------------------------------
class _HitWindow:
    """The last ``size`` judgements (True = hit) with a running hit count."""

    __slots__ = ("events", "hits")

    def __init__(self, size: int) -> None:
        self.events: deque[bool] = deque(maxlen=size)
        self.hits = 0

    def add(self, hit: bool) -> None:
        if len(self.events) == self.events.maxlen and self.events[0]:
            self.hits -= 1  # the oldest is about to fall out
        self.events.append(hit)
        self.hits += hit

    def rate(self) -> float | None:
        return self.hits / len(self.events) if self.events else None


def _item_id(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return str(item["item_id"])
    return str(item.item_id)  # RecommendedItem or anything shaped like it


class OnlineHitRate:
    """Was each interaction's item in the top-K last recommended to that user?

    Only the last recommendation per user is kept, for at most ``max_users`` users (least recently touched
    ones are forgotten: their next event is not judged). Judgements are kept in rolling windows of the last
    ``window`` judged events, overall and per model version (at most ``max_versions`` versions, the least
    recently judged dropped first), the version being the one of the recommendation the event was judged
    against: a hit on a recommendation made by v1 counts for v1 even after v2 is serving.
    """

    def __init__(self, window: int = 2000, max_users: int = 100_000, max_versions: int = 16) -> None:
        if window < 1 or max_users < 1 or max_versions < 1:
            raise ValueError("window, max_users and max_versions must be at least 1")
        self.window = window
        self.max_users = max_users
        self.max_versions = max_versions
        self._last: OrderedDict[str, tuple[frozenset[str], str | None]] = OrderedDict()
        self._overall = _HitWindow(window)
        self._by_version: OrderedDict[str, _HitWindow] = OrderedDict()
        self.evicted_users = 0

    def record_recommendation(self, user_id: str, items: Iterable[Any], model_version: str | None) -> None:
        """Remember ``items`` (ids, ``RecommendedItem``s or dicts with ``item_id``) as the user's current top-K."""
        self._last[user_id] = (frozenset(_item_id(i) for i in items), model_version)
        self._last.move_to_end(user_id)
        if len(self._last) > self.max_users:
            self._last.popitem(last=False)
            self.evicted_users += 1

    def forget(self, user_id: str) -> None:
        """Drop the user's recommendation on record (the user asked to be forgotten)."""
        self._last.pop(user_id, None)

    def observe(self, user_id: str, item_id: str,
                against: tuple[frozenset[str], str | None] | None = None) -> bool | None:
        """Judge one interaction: True/False, or None when the user has no recommendation on record.
        ``against``: (items, version) of the recommendation the event itself names (its recommendation_id),
        judged instead of the user's last one."""
        last = against or self._last.get(user_id)
        if last is None:
            return None
        if user_id in self._last:
            self._last.move_to_end(user_id)
        items, version = last
        hit = item_id in items
        self._overall.add(hit)
        if version is not None:
            w = self._by_version.get(version)
            if w is None:
                w = self._by_version[version] = _HitWindow(self.window)
                if len(self._by_version) > self.max_versions:
                    self._by_version.popitem(last=False)
            self._by_version.move_to_end(version)
            w.add(hit)
        return hit

    def _window(self, model_version: str | None) -> _HitWindow | None:
        return self._overall if model_version is None else self._by_version.get(model_version)

    def rate(self, model_version: str | None = None) -> float | None:
        """Rolling hit rate overall, or of one version; None before any judged event."""
        w = self._window(model_version)
        return w.rate() if w is not None else None

    def counts(self, model_version: str | None = None) -> tuple[int, int]:
        """``(hits, judged)`` in the rolling window, overall or of one version."""
        w = self._window(model_version)
        return (w.hits, len(w.events)) if w is not None else (0, 0)

    def versions(self) -> list[str]:
        return list(self._by_version)

    def reset(self) -> None:
        """Forget the judgements (not the users' last recommendations)."""
        self._overall = _HitWindow(self.window)
        self._by_version.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "tracked_users": len(self._last),
            "evicted_users": self.evicted_users,
            "overall": {"hits": self._overall.hits, "judged": len(self._overall.events), "rate": self.rate()},
            "by_version": {
                v: {"hits": w.hits, "judged": len(w.events), "rate": w.rate()} for v, w in self._by_version.items()
            },
        }


# --- category shift --------------------------------------------------------------------------------------
class GenreDistribution:
    """Genre weights of the last ``window`` events (``None``: unbounded).

    An item with several genres adds ``1/len(genres)`` to each, so every event weighs 1 and a many-genre
    item does not outvote a single-genre one. Events without genres (unknown item, no genre) are not
    counted: they say nothing about the mix and would only dilute it.
    """

    def __init__(self, window: int | None = 2000) -> None:
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1 or None, got {window}")
        self.window = window
        self._events: deque[tuple[str, ...]] = deque()
        self._counts: dict[str, float] = {}
        self._evictions = 0

    def add(self, genres: Sequence[str]) -> None:
        genres = tuple(dict.fromkeys(g for g in genres if g))  # de-duplicated, order kept
        if not genres:
            return
        self._events.append(genres)
        self._bump(genres, 1.0)
        if self.window is not None and len(self._events) > self.window:
            self._bump(self._events.popleft(), -1.0)
            self._evictions += 1
            if self._evictions % _REBUILD_EVERY == 0:
                self._rebuild()

    def _bump(self, genres: tuple[str, ...], sign: float) -> None:
        w = sign / len(genres)
        for g in genres:
            c = self._counts.get(g, 0.0) + w
            if c > 1e-9:
                self._counts[g] = c
            else:
                self._counts.pop(g, None)  # gone from the window (up to rounding)

    def _rebuild(self) -> None:
        self._counts = {}
        for genres in self._events:
            self._bump(genres, 1.0)

    def __len__(self) -> int:
        return len(self._events)

    def counts(self) -> dict[str, float]:
        return dict(self._counts)

    def proportions(self) -> dict[str, float]:
        total = sum(self._counts.values())
        return {g: c / total for g, c in sorted(self._counts.items())} if total > 0 else {}

    def snapshot(self) -> GenreSnapshot:
        return GenreSnapshot(proportions=self.proportions(), events=len(self))

    @classmethod
    def from_items(
        cls, item_ids: Iterable[str], catalogue: Mapping[str, Item] | Iterable[Item]
    ) -> GenreSnapshot:
        """The genre mix of a list of interacted items (e.g. the student's distillation data), as a reference."""
        by_id = catalogue if isinstance(catalogue, Mapping) else {it.item_id: it for it in catalogue}
        dist = cls(window=None)
        for item_id in item_ids:
            item = by_id.get(item_id)
            if item is not None:
                dist.add(item.genres)
        if not len(dist):
            raise ValueError("none of the items has a genre in the catalogue")
        return dist.snapshot()


# --- rationale shift -------------------------------------------------------------------------------------
def _unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(a))
    if not n > 0 or not math.isfinite(n):
        raise ValueError("embedding has zero or non-finite norm")
    return a / n


def cosine_distance(a: Any, b: Any) -> float:
    """1 - cosine similarity, in [0, 2]."""
    return float(1.0 - np.dot(_unit(a), _unit(b)))


class RationaleCentroid:
    """Mean of the last ``window`` rationale embeddings (each made unit length first) vs a reference centroid."""

    def __init__(self, window: int = 2000, reference: Any | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = window
        self._vectors: deque[np.ndarray] = deque()
        self._sum: np.ndarray | None = None
        self._evictions = 0
        self.reference: np.ndarray | None = None
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, centroid: Any | None) -> None:
        self.reference = None if centroid is None else _unit(centroid)

    def add(self, embedding: Any) -> None:
        v = _unit(embedding)
        if self._sum is None:
            self._sum = np.zeros_like(v)
        elif v.shape != self._sum.shape:
            raise ValueError(f"embedding has dimension {v.size}, the window holds {self._sum.size}")
        self._vectors.append(v)
        self._sum += v
        if len(self._vectors) > self.window:
            self._sum -= self._vectors.popleft()
            self._evictions += 1
            if self._evictions % _REBUILD_EVERY == 0:
                self._sum = np.sum(self._vectors, axis=0)

    def __len__(self) -> int:
        return len(self._vectors)

    def centroid(self) -> np.ndarray | None:
        """Mean of the window's unit vectors (not itself unit length), or None when empty."""
        return self._sum / len(self._vectors) if self._vectors else None

    def distance(self) -> float | None:
        """1 - cosine(current centroid, reference); None without both (or when the mean cancels out)."""
        c = self.centroid()
        if c is None or self.reference is None or not float(np.linalg.norm(c)) > 0:
            return None
        return cosine_distance(c, self.reference)

    def clear(self) -> None:
        self._vectors.clear()
        self._sum = None


class StaleShare:
    """Share of the last ``window`` recommendations served without a current rationale."""

    def __init__(self, window: int = 2000) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._w = _HitWindow(window)  # a "hit" here is a stale recommendation

    def add(self, rationale_current: bool) -> None:
        self._w.add(not rationale_current)

    def __len__(self) -> int:
        return len(self._w.events)

    def share(self) -> float | None:
        return self._w.rate()

    def clear(self) -> None:
        self._w = _HitWindow(self._w.events.maxlen or 1)


# --- decision ---------------------------------------------------------------------
class FiredSignal(BaseModel):
    model_config = ConfigDict(frozen=True)

    signal: str
    value: float
    threshold: float
    samples: int = Field(description="Events (or recommendations, rationales) in the signal's window.")


class DriftDecision(BaseModel):
    """Drift detected: which signals are over their thresholds, at which point of the stream."""

    model_config = ConfigDict(frozen=True)

    fired: list[FiredSignal]
    model_version: str | None
    events_seen: int
    decided_at: str = Field(default_factory=utc_now)

    @property
    def signals(self) -> list[str]:
        return [f.signal for f in self.fired]


SIGNALS = ("hit_rate_drop", "genre_psi", "genre_js", "rationale_distance")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


class DriftMonitor:
    """All drift signals of the serving student against one :class:`DriftReference`.

    Feed it every interaction (:meth:`on_event`), every emitted recommendation (:meth:`on_recommendation`)
    and every new rationale embedding (:meth:`on_rationale`); ask :meth:`decide` whenever convenient.
    """

    def __init__(
        self, thresholds: DriftSettings | None = None, reference: DriftReference | None = None,
        *, max_users: int = 100_000,
    ) -> None:
        self.thresholds = thresholds or DriftSettings()
        n = self.thresholds.window_events
        self.hit_rate = OnlineHitRate(window=n, max_users=max_users)
        self.genres = GenreDistribution(window=n)
        self.rationales = RationaleCentroid(window=n)
        self.events_seen = 0
        self.reference = DriftReference()
        self.reset_reference(reference or DriftReference(), clear=False)

    @classmethod
    def from_settings(cls, settings: Settings, reference: DriftReference | None = None) -> DriftMonitor:
        return cls(settings.drift, reference)

    # -- feeding -----------------------------------------------------------------------------------------

    def on_event(self, user_id: str, item_id: str, genres: Sequence[str] | None,
                 against: tuple[frozenset[str], str | None] | None = None) -> bool | None:
        """One interaction; ``genres`` of its item (None or empty if unknown); ``against``: the recommendation
        the event names (see :meth:`OnlineHitRate.observe`). Returns the hit judgement."""
        self.events_seen += 1
        if genres:
            self.genres.add(genres)
        return self.hit_rate.observe(user_id, item_id, against)

    def on_recommendation(self, rec: Any) -> None:
        """One emitted ``Recommendation`` (or a dict with its fields). Its version is ``model_version`` if
        given, else ``rationale_model_version``: the student whose rationale the items were retrieved with."""
        version = _get(rec, "model_version") or _get(rec, "rationale_model_version")
        self.hit_rate.record_recommendation(str(_get(rec, "user_id")), _get(rec, "items") or (), version)

    def forget_user(self, user_id: str) -> None:
        """Nothing per user stays behind: only the hit-rate judge keeps anything keyed by user."""
        self.hit_rate.forget(user_id)

    def on_rationale(self, embedding: Any) -> None:
        """The embedding of one newly written rationale."""
        self.rationales.add(embedding)

    # -- reading -----------------------------------------------------------------------------------------

    def _hit_rate_drop(self) -> tuple[float | None, int]:
        ref = self.reference.hit_rate
        hits, judged = self.hit_rate.counts(self.reference.model_version)
        if ref is None or ref <= 0 or not judged:
            return None, judged  # no reference, or nothing to drop from
        return (ref - hits / judged) / ref, judged

    def _measure(self) -> dict[str, tuple[float | None, int]]:
        """Each signal's value (None: not computable) and the samples it rests on."""
        ref = self.reference.genres.proportions if self.reference.genres else {}
        current = self.genres.counts()
        have_genres = bool(ref and current)
        return {
            "hit_rate_drop": self._hit_rate_drop(),
            "genre_psi": (psi(current, ref) if have_genres else None, len(self.genres)),
            "genre_js": (js_divergence(current, ref) if have_genres else None, len(self.genres)),
            "rationale_distance": (self.rationales.distance(), len(self.rationales)),
        }

    def signals(self) -> dict[str, float | None]:
        """Current value of every signal, None where it cannot be computed yet (no reference, no data)."""
        return {name: value for name, (value, _) in self._measure().items()}

    def decide(self) -> DriftDecision | None:
        """The signals over their thresholds, or None: below ``min_events`` events since the reference, or
        nothing fired. A signal whose own window holds fewer than ``min_events`` samples is not evaluated."""
        t = self.thresholds
        if self.events_seen < t.min_events:
            return None
        fired = []
        for name, (value, samples) in self._measure().items():
            threshold = getattr(t, name)
            if value is not None and samples >= t.min_events and value > threshold:
                fired.append(FiredSignal(signal=name, value=value, threshold=threshold, samples=samples))
        if not fired:
            return None
        return DriftDecision(fired=fired, model_version=self.reference.model_version, events_seen=self.events_seen)

    def current_reference(self, model_version: str | None = None, hit_rate: float | None = None) -> DriftReference:
        """A reference from the live windows (genre mix, rationale centroid), e.g. right after a retrain on
        recent data when no distillation-set reference is at hand."""
        c = self.rationales.centroid()
        return DriftReference(
            model_version=model_version,
            genres=self.genres.snapshot() if len(self.genres) else None,
            rationale_centroid=c.tolist() if c is not None and float(np.linalg.norm(c)) > 0 else None,
            rationale_samples=len(self.rationales) if c is not None else None,
            hit_rate=hit_rate,
        )

    def reset_reference(self, reference: DriftReference, *, clear: bool = True) -> None:
        """Measure against ``reference`` from now on (after a retrain). ``clear`` empties the windows and the
        event count, so the new student is judged only on what it served and no decision comes before
        ``min_events`` new events; the users' last recommendations are kept either way."""
        self.reference = reference
        self.rationales.set_reference(reference.rationale_centroid)
        if clear:
            self.events_seen = 0
            self.hit_rate.reset()
            self.genres = GenreDistribution(window=self.thresholds.window_events)
            self.rationales.clear()

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state for /metrics/."""
        measured = self._measure()
        return {
            "events_seen": self.events_seen,
            "model_version": self.reference.model_version,
            "reference_created_at": self.reference.created_at,
            "signals": {name: value for name, (value, _) in measured.items()},
            "samples": {name: n for name, (_, n) in measured.items()},
            "thresholds": self.thresholds.model_dump(),
            "hit_rate": self.hit_rate.snapshot(),
        }


__all__ = [
    "DEFAULT_PSI_EPS",
    "SIGNALS",
    "DriftDecision",
    "DriftMonitor",
    "FiredSignal",
    "GenreDistribution",
    "OnlineHitRate",
    "RationaleCentroid",
    "StaleShare",
    "cosine_distance",
    "js_divergence",
    "psi",
]
