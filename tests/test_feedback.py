"""What the worker remembers of what it sent (agents/feedback.py), the preference folded into the ranker's
input (agents/recommend.py), and which ranker an A/B arm gets (agents/ranker_slot.py)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from agents.feedback import Attribution, RecentRecommendations, Trending
from agents.ranker_slot import RankerSlot
from agents.recommend import with_preference
from streams.events import Recommendation, RecommendationPath, RecommendedItem, make_recommendation_id
from streams.settings import Settings


def rec(user: str, rec_id: str, items: list[str], path: str = "fast") -> Recommendation:
    return Recommendation(user_id=user, items=[RecommendedItem(item_id=i, score=1.0, title=i) for i in items],
                          rationale="", rationale_current=False, window_version=1, last_event_timestamp=1.0,
                          path=RecommendationPath(path), recommendation_id=rec_id)


def test_recent_recommendations_keep_the_newest_per_user_and_evict_the_least_recent_user() -> None:
    recent = RecentRecommendations(max_users=2, per_user=2)
    recent.add(rec("u1", "r1", ["a"]))
    recent.add(rec("u1", "r2", ["b"]))
    recent.add(rec("u1", "r3", ["c"]))
    assert recent.latest("u1").recommendation_id == "r3"
    assert recent.find("u1", "r1") is None and recent.find("u1", "r2").items == frozenset({"b"})
    recent.add(rec("u2", "r4", ["d"]))
    recent.add(rec("u3", "r5", ["e"]))  # u1 is the least recently served: dropped with its records
    assert recent.latest("u1") is None and recent.find("u1", "r3") is None and len(recent) == 2
    recent.forget("u2")
    assert recent.latest("u2") is None and recent.find("u2", "r4") is None
    assert recent.find("u3", "r4") is None  # another user's id is never attributed


def test_attribution_counts_hits_misses_and_unknown_ids() -> None:
    recent, att = RecentRecommendations(10, 4), Attribution()
    r = rec("u1", "r1", ["a", "b"], path="slow")
    recent.add(r)
    att.impression(r)
    assert att.response(recent.find("u1", "r1"), "a") is True
    assert att.response(recent.find("u1", "r1"), "z") is False
    assert att.response(recent.find("u1", "nope"), "a") is None
    snap = att.snapshot()
    assert snap["text-cosine/slow"] == {"impressions": 1, "hits": 1, "misses": 1, "hit_rate": 0.5}
    assert snap["unattributed"] == 1


def test_trending_weighs_recent_events_more() -> None:
    t = Trending(half_life=5)
    for _ in range(20):
        t.add("old")
    for _ in range(8):
        t.add("new")
    assert [i for i, _ in t.top(2)] == ["new", "old"]  # 8 recent events outweigh 20 older ones
    assert [i for i, _ in t.top(5, exclude={"new"})] == ["old"]
    small = Trending(half_life=1000, max_items=3)
    for n in range(10):
        small.add(f"i{n}")
    assert len(small) <= 6


def test_the_recommendation_id_repeats_for_the_same_answer_and_differs_otherwise() -> None:
    a = make_recommendation_id("u1", 3, "fast", "text-cosine", "s", 2)
    assert a == make_recommendation_id("u1", 3, "fast", "text-cosine", "s", 2) and len(a) == 24
    assert len({a, make_recommendation_id("u1", 4, "fast", "text-cosine", "s", 2),
                make_recommendation_id("u1", 3, "slow", "text-cosine", "s", 2),
                make_recommendation_id("u1", 3, "fast", "text-cosine", "s", None),
                make_recommendation_id("u2", 3, "fast", "text-cosine", "s", 2)}) == 5


def test_a_preference_is_blended_with_or_replaces_the_rationale_vector() -> None:
    r = (np.array([1.0, 0.0], dtype=np.float32), {"rationale": "Step 1", "window_version": 2})
    p = (np.array([0.0, 2.0], dtype=np.float32), {"text": "more documentaries"})
    vec, payload = with_preference(r, p, "blend")
    assert np.allclose(vec, [2 ** -0.5, 2 ** -0.5]) and payload is r[1]  # the explanation stays the rationale
    vec, payload = with_preference(r, p, "replace")
    assert np.allclose(vec, [0.0, 1.0]) and payload is r[1]
    vec, payload = with_preference(None, p, "blend")
    assert np.allclose(vec, [0.0, 1.0]) and payload == {}
    assert with_preference(r, None, "blend") is r
    vec, _ = with_preference((np.array([1.0, 0.0], dtype=np.float32), {}), (np.array([-1.0, 0.0], dtype=np.float32), {}), "blend")
    assert np.allclose(vec, [-1.0, 0.0])  # opposite vectors cancel: the user's words win


@pytest.mark.parametrize("ranker_b, expect_b", [(None, "current"), ("text", None)])
def test_arm_b_gets_its_pinned_ranker_and_arm_a_the_current_one(ranker_b: str | None, expect_b: str | None) -> None:
    ab = {"enabled": True, "student_b": "base"} if ranker_b is None else {"enabled": True, "ranker_b": ranker_b}
    slot = RankerSlot(Settings.from_env({}, ab=ab), Counter(), None)  # type: ignore[arg-type]
    current = object()
    slot.served = current  # type: ignore[assignment]
    assert slot.served_for("a") is current and slot.served_for(None) is current
    assert slot.served_for("b") is (current if expect_b == "current" else None)
