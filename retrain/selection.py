"""Stage 2 of a retrain cycle, *select users*: the recent events as per-user sequences, the users whose genre
mix drifted most from the serving version's reference, and a seeded held-out share of them.

The events become per-user, time-ordered sequences (items outside the catalogue dropped, a repeated item kept
at its first occurrence). Users with at least ``window + targets + holdout`` recent events are ranked by the
Jensen-Shannon divergence between their recent genre mix and the serving version's reference
(``<registry>/<CURRENT>/drift_reference.json``; else the genre mix of the windows the serving version was
trained on; for the base model, the mix of all recent events) and capped at ``retrain.max_users``. A seeded
``retrain.holdout_users`` share of them is held out for evaluation only.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from retrain.context import CycleContext, registry_absolute, version_datasets
from retrain.dataset import read_records
from retrain.recent import RecentEvent
from streams.datasets import Item
from streams.drift import GenreDistribution, js_divergence
from streams.drift_reference import DRIFT_REFERENCE_FILE, read_drift_reference
from streams.registry import ModelRegistry


@dataclass(frozen=True)
class UserSequence:
    user_id: str
    events: tuple[RecentEvent, ...]  # time order, catalogue items only, an item at its first occurrence


def user_sequences(events: Iterable[Any], catalogue: Mapping[str, Item]) -> tuple[dict[str, UserSequence], int]:
    """Per-user time-ordered sequences (ties: partition, offset, input order) of catalogue items, each item
    kept at its first occurrence; and how many events named an item outside the catalogue."""
    by_user: dict[str, list[tuple[tuple[float, int, int, int], RecentEvent]]] = defaultdict(list)
    unknown = 0
    for n, e in enumerate(events):
        if e.item_id not in catalogue:
            unknown += 1
            continue
        ev = e if isinstance(e, RecentEvent) else RecentEvent(
            str(e.user_id), str(e.item_id), float(e.timestamp), getattr(e, "value", getattr(e, "rating", None)),
            getattr(e, "event_type", None), int(getattr(e, "partition", 0)), int(getattr(e, "offset", -1)))
        by_user[ev.user_id].append(((ev.timestamp, ev.partition, ev.offset, n), ev))
    out = {}
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r[0])
        seen: set[str] = set()
        seq = []
        for _, ev in rows:
            if ev.item_id not in seen:
                seen.add(ev.item_id)
                seq.append(ev)
        out[user] = UserSequence(user, tuple(seq))
    return out, unknown


def latest_in_stream_order(events: Sequence[RecentEvent], n: int) -> list[RecentEvent]:
    """The ``n`` events that arrived last: each partition's tail by offset, partitions in proportion to their
    share of ``events``. Arrival order, not event time: a replay of old data, or users whose clocks differ,
    publishes events whose timestamps say nothing about which came last."""
    if len(events) <= n:
        return list(events)
    by_partition: dict[int, list[RecentEvent]] = defaultdict(list)
    for e in events:
        by_partition[e.partition].append(e)
    out: list[RecentEvent] = []
    for part in by_partition.values():
        part.sort(key=lambda e: e.offset)
        take = max(1, round(n * len(part) / len(events)))
        out.extend(part[-take:])
    return out


def genre_mix(item_ids: Iterable[str], catalogue: Mapping[str, Item]) -> dict[str, float]:
    dist = GenreDistribution(window=None)
    for i in item_ids:
        item = catalogue.get(i)
        if item is not None:
            dist.add(item.genres)
    return dist.counts()


def rank_drifted_users(sequences: Mapping[str, UserSequence], reference: Mapping[str, float], min_events: int,
                       catalogue: Mapping[str, Item], max_users: int) -> tuple[list[tuple[str, float]], int]:
    """``[(user, JS divergence)]`` of the users with at least ``min_events`` events, most drifted first
    (ties: user id), at most ``max_users``; and how many were eligible. Users without any genre rank last."""
    scored = []
    for user, seq in sequences.items():
        if len(seq.events) < min_events:
            continue
        counts = genre_mix((e.item_id for e in seq.events), catalogue)
        score = js_divergence(counts, reference) if counts and reference else -1.0
        scored.append((user, score))
    scored.sort(key=lambda us: (-us[1], us[0]))
    return scored[:max_users], len(scored)


def split_heldout(users: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded ``(train, held_out)``: ``round(fraction * n)`` users held out, at least one on each side."""
    if len(users) < 2:
        raise ValueError("need at least two users to hold some out")
    order = sorted(users)
    random.Random(seed).shuffle(order)
    n_hold = min(len(order) - 1, max(1, round(fraction * len(order))))
    held = set(order[:n_hold])
    return [u for u in users if u not in held], [u for u in users if u in held]


def current_reference(registry: ModelRegistry, catalogue: Mapping[str, Item],
                      recent_items: Iterable[str]) -> tuple[dict[str, float], str]:
    """The genre mix users' drift is measured against, and where it came from."""
    current = registry.current()
    if current is not None:
        ref = read_drift_reference(registry, current)
        if ref is not None and ref.genres is not None and ref.genres.proportions:
            return dict(ref.genres.proportions), f"{current}/{DRIFT_REFERENCE_FILE}"
        windows: list[str] = []
        for ds in version_datasets(registry, current):
            p = registry_absolute(ds["path"], registry.root)
            if p.is_file():
                windows.extend(i for r in read_records(p) for i in r.window)
        mix = genre_mix(windows, catalogue)
        if mix:
            return mix, f"{current}: training windows"
    return genre_mix(recent_items, catalogue), "recent events (no reference for the served model)"



@dataclass(frozen=True)
class Selection:
    """The users one cycle trains on and holds out, and why they were chosen."""

    sequences: dict[str, UserSequence]
    unknown_items: int  # events naming an item outside the catalogue
    ranked: list[tuple[str, float]]  # (user, JS divergence), most drifted first
    eligible: int  # users with enough recent events
    reference: str  # what the drift was measured against
    train_users: list[str]
    heldout_users: list[str]

    def summary(self) -> dict[str, Any]:
        """The :class:`~retrain.context.CycleResult` fields this stage fills."""
        return {"eligible_users": self.eligible, "train_users": self.train_users,
                "heldout_users": self.heldout_users, "reference": self.reference}


def select_users(ctx: CycleContext, max_users: int) -> Selection:
    """The drifted users of ``ctx.events`` split into training and held-out users (both empty when fewer than
    two users have ``ctx.need`` events)."""
    sequences, unknown = user_sequences(ctx.events, ctx.catalogue)
    reference, source = current_reference(ctx.registry, ctx.catalogue, (e.item_id for e in ctx.events))
    ranked, eligible = rank_drifted_users(sequences, reference, ctx.need, ctx.catalogue, max_users)
    train: list[str] = []
    held: list[str] = []
    if len(ranked) >= 2:
        train, held = split_heldout([u for u, _ in ranked], ctx.settings.retrain.holdout_users,
                                    ctx.settings.retrain.seed)
    return Selection(sequences, unknown, ranked, eligible, source, train, held)


__all__ = ["Selection", "UserSequence", "current_reference", "genre_mix", "latest_in_stream_order",
           "rank_drifted_users", "select_users", "split_heldout", "user_sequences"]
