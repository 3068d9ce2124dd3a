"""Drift signals of the retrain loop (streams/drift.py): hand-computed distances, the online hit rate, and
genre drift on time-ordered MovieLens-1M replays."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from streams.drift import (
    DriftDecision,
    DriftMonitor,
    GenreDistribution,
    OnlineHitRate,
    RationaleCentroid,
    StaleShare,
    js_divergence,
    psi,
)
from streams.datasets import Item, load_interactions, load_items, sample_users
from streams.events import Recommendation, RecommendationPath, RecommendedItem
from streams.drift_reference import DriftReference, GenreSnapshot
from streams.settings import DriftSettings, Settings

# Small windows for the synthetic tests, so they need few events.
SMALL = DriftSettings(min_events=50, window_events=100)


# --- distances -------------------------------------------------------------------------------------------
def test_identical_distributions_have_zero_psi_and_js() -> None:
    p = {"Drama": 3.0, "Comedy": 1.0}
    assert psi(p, p) == 0.0
    assert js_divergence(p, p) == 0.0
    # Counts and proportions of the same mix are the same distribution.
    assert psi(p, {"Drama": 0.75, "Comedy": 0.25}) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(p, {"Comedy": 0.25, "Drama": 0.75}) == pytest.approx(0.0, abs=1e-12)


def test_psi_hand_example() -> None:
    # (0.5-0.9)·ln(0.5/0.9) + (0.5-0.1)·ln(0.5/0.1) = 0.4·ln(1.8) + 0.4·ln(5)
    expected = 0.4 * math.log(1.8) + 0.4 * math.log(5)
    assert expected == pytest.approx(0.87889, abs=1e-5)
    p, q = {"A": 0.5, "B": 0.5}, {"A": 0.9, "B": 0.1}
    assert psi(p, q, eps=0) == pytest.approx(expected, rel=1e-12)
    assert psi(q, p, eps=0) == pytest.approx(expected, rel=1e-12)  # symmetric
    assert psi(p, q) == pytest.approx(expected, rel=1e-3)  # default smoothing barely moves it


def test_psi_aligns_keys_and_smooths_missing_categories() -> None:
    p, q = {"A": 1.0, "B": 1.0}, {"A": 1.0}
    assert psi(p, q, eps=0) == math.inf  # B is absent from q
    eps = 1e-3
    # By hand: smoothed p = (0.5+eps)/(1+2eps) twice, q = ((1+eps)/(1+2eps), eps/(1+2eps)).
    pa = pb = (0.5 + eps) / (1 + 2 * eps)
    qa, qb = (1 + eps) / (1 + 2 * eps), eps / (1 + 2 * eps)
    expected = (pa - qa) * math.log(pa / qa) + (pb - qb) * math.log(pb / qb)
    assert psi(p, q, eps=eps) == pytest.approx(expected, rel=1e-12)
    assert 2.0 < expected < 3.5  # a disappearing half of the mass is a large shift, but finite
    with pytest.raises(ValueError, match="empty"):
        psi({}, q)
    with pytest.raises(ValueError, match="negative"):
        psi({"A": -1.0}, q)


def test_js_divergence_hand_examples() -> None:
    assert js_divergence({"A": 1.0}, {"B": 1.0}) == 1.0  # disjoint: the maximum, in bits
    # p = (1/2, 1/2), q = (1, 0), m = (3/4, 1/4):
    # KL(p||m) = 1/2·log2(2/3) + 1/2·log2(2), KL(q||m) = log2(4/3)
    expected = 0.5 * (0.5 * math.log2(2 / 3) + 0.5) + 0.5 * math.log2(4 / 3)
    assert expected == pytest.approx(0.31128, abs=1e-5)
    assert js_divergence({"A": 1, "B": 1}, {"A": 3}) == pytest.approx(expected, rel=1e-12)
    assert js_divergence({"A": 3}, {"A": 1, "B": 1}) == pytest.approx(expected, rel=1e-12)


# --- genre distribution ----------------------------------------------------------------------------------
def test_genre_distribution_splits_multi_genre_items_and_rolls(tmp_path) -> None:
    d = GenreDistribution(window=3)
    d.add(("Comedy", "Romance"))
    d.add(("Drama",))
    d.add(())  # no genre: not an event of the mix
    d.add(("Comedy", "Drama", "Horror", "Comedy"))  # duplicate genre counted once: 1/3 each
    assert len(d) == 3
    assert d.counts() == pytest.approx({"Comedy": 0.5 + 1 / 3, "Romance": 0.5, "Drama": 1 + 1 / 3, "Horror": 1 / 3})
    assert sum(d.counts().values()) == pytest.approx(3.0)
    d.add(("Western",))  # the Comedy|Romance event falls out
    assert len(d) == 3
    assert d.counts() == pytest.approx({"Comedy": 1 / 3, "Drama": 1 + 1 / 3, "Horror": 1 / 3, "Western": 1.0})
    assert "Romance" not in d.counts()
    assert sum(d.proportions().values()) == pytest.approx(1.0)

    catalogue = [Item(item_id="a", title="A", genres=("Comedy",)),
                 Item(item_id="b", title="B", genres=("Drama", "War")), Item(item_id="c", title="C")]
    snap = GenreDistribution.from_items(["a", "a", "b", "c", "missing"], catalogue)
    assert snap.events == 3  # "c" has no genre, "missing" is not in the catalogue
    assert snap.proportions == pytest.approx({"Comedy": 2 / 3, "Drama": 1 / 6, "War": 1 / 6})
    snap.save(tmp_path / "genres.json")
    assert GenreSnapshot.load(tmp_path / "genres.json") == snap
    with pytest.raises(ValueError, match="genre"):
        GenreDistribution.from_items(["c"], catalogue)


def test_long_rolling_window_stays_exact() -> None:
    # Many evictions (past the periodic rebuild) must leave the counts equal to a fresh count of the window.
    rng = np.random.default_rng(0)
    genres = ["Action", "Comedy", "Drama", "Horror", "Romance", "War", "Western"]
    d = GenreDistribution(window=50)
    events = [tuple(rng.choice(genres, size=rng.integers(1, 4), replace=False)) for _ in range(10_000)]
    for e in events:
        d.add(e)
    fresh = GenreDistribution(window=None)
    for e in events[-50:]:
        fresh.add(e)
    assert d.counts() == pytest.approx(fresh.counts(), abs=1e-9)


# --- online hit rate -------------------------------------------------------------------------------------
def test_online_hit_rate_attributes_hits_to_the_recommending_version() -> None:
    h = OnlineHitRate(window=4)
    assert h.observe("u1", "x") is None  # no recommendation yet: not judged
    assert h.counts() == (0, 0) and h.rate() is None
    h.record_recommendation("u1", ["a", "b"], "v1")
    h.record_recommendation("u2", [RecommendedItem(item_id="c", score=1.0, title="C")], "v1")
    assert h.observe("u1", "a") is True
    assert h.observe("u1", "z") is False
    assert h.observe("u2", "c") is True
    # v2 starts serving u1; u2's next event is still judged against v1's recommendation.
    h.record_recommendation("u1", [{"item_id": "d"}], "v2")
    assert h.observe("u1", "a") is False  # "a" was v1's, no longer u1's top-K
    assert h.observe("u2", "c") is True
    assert h.counts("v1") == (3, 4) and h.rate("v1") == 0.75
    assert h.counts("v2") == (0, 1) and h.rate("v2") == 0.0
    # The overall window holds the last 4 of 5 judgements: the first hit (u1, a) has fallen out.
    assert h.counts() == (2, 4) and h.rate() == 0.5
    assert h.observe("u1", "d") is True
    assert h.counts() == (3, 4)  # (u1, z) miss out, (u1, d) hit in
    assert h.counts("v2") == (1, 2)
    assert h.rate("v0") is None and h.counts("v0") == (0, 0)
    snap = h.snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["by_version"]["v1"] == {"hits": 3, "judged": 4, "rate": 0.75}


def test_online_hit_rate_per_version_window_rolls() -> None:
    h = OnlineHitRate(window=3)
    h.record_recommendation("u", ["a"], "v1")
    for item in ["a", "a", "b", "b", "b"]:
        h.observe("u", item)
    assert h.counts("v1") == (0, 3)  # both hits have rolled out


def test_online_hit_rate_evicts_least_recently_seen_users() -> None:
    h = OnlineHitRate(window=100, max_users=2)
    h.record_recommendation("u1", ["a"], "v1")
    h.record_recommendation("u2", ["a"], "v1")
    assert h.observe("u1", "a") is True  # touches u1: u2 is now the least recent
    h.record_recommendation("u3", ["a"], "v1")
    assert h.evicted_users == 1
    assert h.observe("u2", "a") is None  # forgotten
    assert h.observe("u1", "a") is True
    assert h.observe("u3", "a") is True
    assert h.snapshot()["tracked_users"] == 2


# --- rationale centroid, stale share ---------------------------------------------------------------------
def _around(centre: np.ndarray, n: int, rng: np.random.Generator, spread: float = 1.0) -> np.ndarray:
    """n unit vectors scattered around a unit ``centre``; ``spread`` 1 = noise as large as the centre."""
    noise = rng.normal(size=(n, centre.size)) / math.sqrt(centre.size)
    v = centre + spread * noise
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_rationale_centroid_distance() -> None:
    rng = np.random.default_rng(7)
    dim = 64
    c1, c2 = (c / np.linalg.norm(c) for c in rng.normal(size=(2, dim)))
    ref = _around(c1, 500, rng).mean(axis=0)

    rc = RationaleCentroid(window=200, reference=ref)
    assert rc.distance() is None  # empty window
    for v in _around(c1, 400, rng):
        rc.add(v * 3.0)  # length does not matter: every embedding is made unit first
    assert len(rc) == 200
    stay = rc.distance()
    assert stay is not None and stay < 0.05
    for v in _around(c2, 200, rng):
        rc.add(v)
    moved = rc.distance()
    assert moved is not None and moved > 0.5  # two random 64-d centres are near orthogonal
    with pytest.raises(ValueError, match="dimension"):
        rc.add(np.ones(dim + 1))
    with pytest.raises(ValueError, match="norm"):
        rc.add(np.zeros(dim))


def test_stale_share() -> None:
    s = StaleShare(window=4)
    assert s.share() is None
    for current in [True, False, False, True, False]:
        s.add(current)
    assert len(s) == 4 and s.share() == 0.75  # the first (current) one has rolled out


# --- monitor ---------------------------------------------------------------------------------------------
def _rec(user: str, items: list[str], version: str | None, current: bool) -> Recommendation:
    return Recommendation(
        user_id=user, items=[RecommendedItem(item_id=i, score=1.0, title=i) for i in items], rationale="",
        rationale_model_version=version, rationale_current=current, window_version=1, last_event_timestamp=0.0,
        path=RecommendationPath.slow if current else RecommendationPath.fast,
    )


def test_monitor_rationale_signal_fires_only_when_embeddings_move() -> None:
    rng = np.random.default_rng(11)
    dim = 32
    c1, c2 = (c / np.linalg.norm(c) for c in rng.normal(size=(2, dim)))
    ref = DriftReference(model_version="v1", rationale_centroid=_around(c1, 300, rng).mean(axis=0).tolist())
    m = DriftMonitor(SMALL, ref)
    for i, v in enumerate(_around(c1, 300, rng)):
        m.on_event(f"u{i % 7}", "x", None)
        m.on_rationale(v)
        assert m.decide() is None  # below min_events at first, then under the threshold
    assert m.signals()["rationale_distance"] < SMALL.rationale_distance
    for i, v in enumerate(_around(c2, 300, rng)):
        m.on_event(f"u{i % 7}", "x", None)
        m.on_rationale(v)
    d = m.decide()
    assert d is not None and d.signals == ["rationale_distance"]
    assert d.fired[0].value > SMALL.rationale_distance and d.fired[0].threshold == SMALL.rationale_distance
    assert d.model_version == "v1" and d.events_seen == 600


def test_monitor_hit_rate_drop_and_min_events_and_stale_answers_are_not_drift(tmp_path) -> None:
    m = DriftMonitor(SMALL, DriftReference(model_version="v1", hit_rate=0.5))
    for i in range(SMALL.min_events - 1):
        # dict-shaped recommendations (as read back from Kafka JSON) are accepted too
        m.on_recommendation({"user_id": "u", "items": [{"item_id": "a"}], "rationale_model_version": "v1",
                             "rationale_current": False})
        m.on_event("u", "b", ["Drama"])  # always a miss, every recommendation stale
    sig = m.signals()
    # Every answer was stale (no current rationale): that is load (a student behind), never a drift signal.
    assert sig["hit_rate_drop"] == 1.0 and "stale_share" not in sig
    assert sig["genre_psi"] is None and sig["rationale_distance"] is None  # no reference: not evaluated
    assert m.decide() is None  # one event short of min_events
    m.on_recommendation(_rec("u", ["a"], "v1", current=False))
    m.on_event("u", "a", ["Drama"])  # a hit: rate 1/50, drop (0.5 - 0.02) / 0.5
    d = m.decide()
    assert d is not None and d.signals == ["hit_rate_drop"]
    assert d.fired[0].value == pytest.approx(0.96) and d.fired[0].samples == SMALL.min_events
    assert DriftDecision.model_validate_json(d.model_dump_json()) == d
    assert json.loads(json.dumps(m.snapshot()))["events_seen"] == SMALL.min_events

    # After a retrain: new reference, windows cleared, no decision until min_events again.
    ref = DriftReference(model_version="v2", hit_rate=0.5)
    ref.save(tmp_path / "ref.json")
    m.reset_reference(DriftReference.load(tmp_path / "ref.json"))
    assert m.reference == ref and m.events_seen == 0
    assert m.decide() is None and m.signals()["hit_rate_drop"] is None
    for _ in range(SMALL.min_events):
        m.on_recommendation(_rec("u", ["a"], "v2", current=True))
        m.on_event("u", "a", ["Drama"])
    assert m.hit_rate.rate("v2") == 1.0 and m.signals()["hit_rate_drop"] == -1.0  # better than the reference
    assert m.decide() is None


def test_thresholds_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLIMSTREAM_DRIFT_GENRE_PSI", "0.25")
    t = Settings.from_env(drift={"min_events": 10}).drift
    assert t.genre_psi == 0.25 and t.min_events == 10
    assert t.window_events == Settings.from_env().drift.window_events
    assert Settings().drift == DriftSettings()  # the shipped defaults, the environment aside


# --- MovieLens-1M replays --------------------------------------------------------------------------------
RARE = frozenset({"Horror", "Documentary", "Film-Noir", "Western"})
CHECK_EVERY = 50


@pytest.fixture(scope="module")
def ml1m() -> tuple[list, dict[str, Item]]:
    return load_interactions("ml-1m"), {it.item_id: it for it in load_items("ml-1m")}


def _replay(monitor: DriftMonitor, events: list, items: dict[str, Item]) -> tuple[DriftDecision | None, int]:
    """Feed events in order, asking for a decision every CHECK_EVERY; the first decision and where it came."""
    for k, it in enumerate(events, start=1):
        monitor.on_event(it.user_id, it.item_id, items[it.item_id].genres)
        if k % CHECK_EVERY == 0:
            d = monitor.decide()
            if d is not None:
                return d, k
    return None, len(events)


@pytest.mark.parametrize("seed", [1, 3])
def test_genre_drift_on_movielens_replay(ml1m, seed: int) -> None:
    interactions, items = ml1m
    thresholds = Settings.from_env().drift  # the shipped defaults
    # 600 users' events in time order; the student was "distilled" on the first half.
    replay = sample_users(interactions, 600, seed=seed)
    half = len(replay) // 2
    reference = DriftReference(
        model_version="v1", genres=GenreDistribution.from_items((it.item_id for it in replay[:half]), items)
    )
    rare_share = sum(p for g, p in reference.genres.proportions.items() if g in RARE)
    assert rare_share < 0.12  # the premise: these genres are rare in the reference
    later = replay[half:]
    assert len(later) > 4 * thresholds.window_events

    # (a) Stable: the same users' later events, bursts of binge-rating included, never fire.
    stable = DriftMonitor(thresholds, reference)
    decision, _ = _replay(stable, later, items)
    assert decision is None, decision
    assert stable.signals()["genre_psi"] is not None  # evaluated, not skipped
    assert len(stable.genres) == thresholds.window_events

    # (b) Shifted: half-way through the later events tastes turn to the rare genres only.
    mid = len(later) // 2
    shifted = later[:mid] + [it for it in later[mid:] if RARE & set(items[it.item_id].genres)]
    monitor = DriftMonitor(thresholds, reference)
    decision, at = _replay(monitor, shifted, items)
    assert decision is not None
    assert at > mid  # nothing before the change
    assert at - mid <= thresholds.window_events // 2  # and caught well within one window of it
    fired = {f.signal: f for f in decision.fired}
    assert "genre_psi" in fired
    assert fired["genre_psi"].value > fired["genre_psi"].threshold == thresholds.genre_psi
    assert fired["genre_psi"].samples == thresholds.window_events
    assert decision.model_version == "v1" and decision.events_seen == at
    assert DriftDecision.model_validate_json(decision.model_dump_json()) == decision


# --- the worker's rationale reference ------------------------------------------------------------------------
def _runtime(tmp_path, min_events: int):  # type: ignore[no-untyped-def]
    from agents.runtime import Runtime

    return Runtime(Settings.from_env(data={"data_dir": tmp_path}, drift={"min_events": min_events, "window_events": 4 * min_events}))


@pytest.mark.parametrize("samples", [3, None])
def test_worker_takes_the_rationale_reference_from_its_first_rationales_unless_the_file_has_enough(
        tmp_path, samples) -> None:
    rng = np.random.default_rng(5)
    c1, c2 = (c / np.linalg.norm(c) for c in rng.normal(size=(2, 32)))
    # A reference centroid from a few users that are not the stream's: c2, while the stream is around c1.
    far = _around(c2, 3, rng, spread=0.3).mean(axis=0).tolist()
    rt = _runtime(tmp_path, 40)
    try:
        rt._set_drift_reference(DriftReference(model_version="v1", rationale_centroid=far, rationale_samples=samples),
                                clear=True)
        stream = _around(c1, 120, rng)
        if samples is None:  # no count (a file written before counts were): trusted as before
            assert rt.rationale_reference_source == "file"
            for v in stream:
                rt.observe_rationale(v)
            assert rt.drift.signals()["rationale_distance"] > 0.5
            return
        # 3 < drift_min_events: not a reference; the first 40 rationales of the stream become it
        assert rt.rationale_reference_source == "pending" and rt.drift.reference.rationale_centroid is None
        for v in stream[:39]:
            rt.observe_rationale(v)
            assert rt.drift.signals()["rationale_distance"] is None
        rt.observe_rationale(stream[39])
        assert rt.rationale_reference_source == "lazy" and rt.drift.reference.rationale_samples == 40
        assert rt.drift.reference.model_version == "v1"
        assert np.allclose(rt.drift.reference.rationale_centroid, stream[:40].mean(axis=0))
        for v in stream[40:]:
            rt.observe_rationale(v)
        assert rt.drift.signals()["rationale_distance"] < 0.05  # same regime: quiet
        for v in _around(c2, 160, rng):  # then the rationales move: the lazy reference still sees it
            rt.observe_rationale(v)
        assert rt.drift.signals()["rationale_distance"] > 0.5
        assert rt.drift_snapshot()["rationale_reference_source"] == "lazy"
        # A swap to a version whose file has enough rationales uses the file, and the window starts afresh.
        rt._set_drift_reference(DriftReference(model_version="v2", rationale_centroid=c2.tolist(),
                                               rationale_samples=40), clear=True)
        assert rt.rationale_reference_source == "file" and len(rt.drift.rationales) == 0
    finally:
        rt.close()
