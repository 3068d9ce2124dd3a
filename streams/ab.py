"""A/B between registry versions: the stable split of users into arms, and the per-arm online figures.

A user's arm is a pure function of the user id and the experiment's salt (``SLIMSTREAM_AB_SALT``): every
worker, every restart and the offline report agree on it without sharing any state, and a user never moves
between arms while the experiment runs. Arm ``a`` is the registries' CURRENT versions (and follows their
promotions); arm ``b`` is pinned to ``SLIMSTREAM_AB_STUDENT_B`` / ``SLIMSTREAM_AB_RANKER_B``.

The figures (:func:`arm_report`): per arm, the online hit rate (an event whose item was in the user's last
recommendation, the drift judge's definition) and the attributed hit rate (events naming a recommendation_id),
each with a 95% Wilson interval, and B - A with a normal-approximation interval.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

ARMS = ("a", "b")
Z95 = 1.959963984540054


def arm_of(user_id: str, salt: str, share_b: float) -> str:
    """``"b"`` for a stable ``share_b`` of users, ``"a"`` for the rest."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return "b" if int.from_bytes(digest[:8], "big") / 2**64 < share_b else "a"


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (sound at small n and near 0 or 1); None for n = 0."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(hits: int, n: int) -> dict[str, Any]:
    ci = wilson(hits, n)
    return {"n": n, "hits": hits, "rate": hits / n if n else None, "ci95": list(ci) if ci else None}


def _difference(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any] | None:
    if not a["n"] or not b["n"]:
        return None
    pa, pb = a["rate"], b["rate"]
    se = math.sqrt(pa * (1 - pa) / a["n"] + pb * (1 - pb) / b["n"])
    return {"b_minus_a": pb - pa, "ci95": [pb - pa - Z95 * se, pb - pa + Z95 * se]}


def arm_report(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """``counts``: per arm ``{"users", "impressions", "judged", "hits", "attributed", "attributed_hits"}``
    (missing keys count 0); the per-arm rates with intervals and the B - A differences."""
    arms: dict[str, Any] = {}
    for arm in ARMS:
        c = counts.get(arm, {})
        arms[arm] = {"users": c.get("users"), "impressions": c.get("impressions", 0),
                     "online_hit_rate": _rate(c.get("hits", 0), c.get("judged", 0)),
                     "attributed_hit_rate": _rate(c.get("attributed_hits", 0), c.get("attributed", 0))}
    return {"arms": arms,
            "online_hit_rate_difference": _difference(arms["a"]["online_hit_rate"], arms["b"]["online_hit_rate"]),
            "attributed_hit_rate_difference": _difference(arms["a"]["attributed_hit_rate"],
                                                          arms["b"]["attributed_hit_rate"])}


def join_streams(recommendations: list[dict[str, Any]], events: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per-arm counts from the two topics, as the workers count them: each event judged against the user's
    newest recommendation sent before it (by time), and, when it names a recommendation_id, against that one.
    ``recommendations``: messages with ``at`` (produced_at); ``events``: with ``at`` (the record's time)."""
    counts: dict[str, dict[str, int]] = {arm: {} for arm in ARMS}
    users: dict[str, set[str]] = {arm: set() for arm in ARMS}
    timeline = sorted([(r["at"], 0, r) for r in recommendations] + [(e["at"], 1, e) for e in events],
                      key=lambda t: (t[0], t[1]))
    last: dict[str, dict[str, Any]] = {}
    by_id: dict[str, dict[str, Any]] = {}

    def add(arm: str, key: str, n: int = 1) -> None:
        counts[arm][key] = counts[arm].get(key, 0) + n

    for _, kind, record in timeline:
        if kind == 0:
            arm = record.get("arm")
            if arm not in counts:
                continue
            last[record["user_id"]] = record
            if record.get("recommendation_id"):
                by_id[record["recommendation_id"]] = record
            users[arm].add(record["user_id"])
            add(arm, "impressions")
            continue
        rec = last.get(record["user_id"])
        if rec is not None:
            add(rec["arm"], "judged")
            add(rec["arm"], "hits", int(record["item_id"] in {i["item_id"] for i in rec["items"]}))
        named = by_id.get(record.get("recommendation_id") or "")
        if named is not None and named["user_id"] == record["user_id"]:
            add(named["arm"], "attributed")
            add(named["arm"], "attributed_hits", int(record["item_id"] in {i["item_id"] for i in named["items"]}))
    for arm in ARMS:
        counts[arm]["users"] = len(users[arm])
    return counts


__all__ = ["ARMS", "arm_of", "arm_report", "join_streams", "wilson"]
