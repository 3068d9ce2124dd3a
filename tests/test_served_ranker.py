"""The served ranker is the evaluated ranker: a saved version, loaded through the serving class, ranks a window
exactly as the trained model does in the harness; new catalogue items become servable from their text; the
ranker registry promotes only versions that have weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from evaluation.served import ServedRankerMethod
from models.ranker_artifact import ArtifactError, load_ranker, save_ranker
from models.served_ranker import ServedRanker
from models.slim_rec import SLIMRecConfig, SLIMRecRanker, rationale_inputs
from streams.datasets import load_interactions
from streams.registry import ModelRegistry
from streams.splits import TrainingData, leave_one_out, restrict_users

CFG = SLIMRecConfig(max_len=20, dim=32, batch_size=32, lr=3e-3, epochs=2, threads=1, bf16=False, rationale_tail=5)


@pytest.fixture(scope="module")
def data() -> TrainingData:
    return leave_one_out(restrict_users(load_interactions("ml-100k"), 120, 0)).training_data()


@pytest.fixture(scope="module")
def text(data: TrainingData) -> np.ndarray:
    vecs = np.random.default_rng(1).normal(size=(data.n_items + 1, 16)).astype(np.float32)
    vecs[0] = 0
    return vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None)


def _rationales(text: np.ndarray):  # type: ignore[no-untyped-def]
    def fn(users: np.ndarray, prefixes) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.stack([text[np.asarray(p)[-3:]].mean(axis=0) for p in prefixes])
    return fn


@pytest.mark.parametrize("items", ["id", "id+text"])
def test_saved_ranker_serves_the_harness_ranking(tmp_path: Path, data: TrainingData, text: np.ndarray,
                                                 items: str) -> None:
    r = rationale_inputs(data, _rationales(text), np.arange(0, data.n_users, 2), tail=5, source="mean")
    cfg = replace(CFG, items=items)
    trained = SLIMRecRanker(cfg, item_text=text, rationales=r)
    trained.fit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(save_ranker(trained, data, tmp_path, dataset="ml-100k-slice")))
    served = ServedRanker(load_ranker(tmp_path), version="t1")
    users = np.arange(data.n_users)
    histories = [np.asarray(s) for s in data.train]
    expected = trained.score(users, histories)  # the harness's scores, each user's own rationale
    rationales = [r.vectors[u] if r.cuts[u] >= 0 else None for u in users]
    got = served.scores(histories, rationales)
    np.testing.assert_allclose(got[:, 1:], expected[:, 1:], rtol=1e-4, atol=1e-4)
    # Item for item, as the worker publishes it: ids, window items excluded, the same top 10.
    windows = [[data.item_ids[i] for i in h] for h in histories]
    recs = served.recommend(windows, 10, rationales)
    for u in range(0, data.n_users, 7):
        s = expected[u].copy()
        s[histories[u]] = -np.inf
        s[0] = -np.inf
        top = np.argsort(-s, kind="stable")[:10]
        assert [x.item_id for x in recs[u]] == [data.item_ids[i] for i in top]
        assert not set(windows[u]) & {x.item_id for x in recs[u]}
    # A user without a rationale is the null vector's ranking, not an error.
    assert served.recommend([windows[1]], 5, [None])[0]


def test_new_items_are_servable_from_text_and_unknown_windows_fall_back(tmp_path: Path, data: TrainingData,
                                                                         text: np.ndarray) -> None:
    trained = SLIMRecRanker(replace(CFG, items="text"), item_text=text)
    trained.fit(data)
    manifest = save_ranker(trained, data, tmp_path, dataset="ml-100k-slice")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    served = ServedRanker(load_ranker(tmp_path))
    window = [data.item_ids[i] for i in data.train[0]]
    before = served.recommend([window], 5)[0]
    # A brand-new item whose text vector is the one of the top recommendation scores like it.
    top = served.index[before[0].item_id]
    assert served.add_items(["brand-new"], text[top][None]) == ["brand-new"]
    after = served.recommend([window], served.n_items)[0]
    scores = {x.item_id: x.score for x in after}
    assert scores["brand-new"] == pytest.approx(scores[before[0].item_id], rel=1e-5)
    # ...and can be read in a window.
    assert served.recommend([["brand-new"]], 3)[0]
    # A window of items the model has never heard of: no state, the caller's popular fallback.
    assert served.recommend([["nobody-knows-this"]], 3) == [None]
    assert served.popular[0] == data.item_ids[int(np.argmax(data.item_counts()))]


def test_id_only_ranker_ignores_unknown_items_and_registry_needs_weights(tmp_path: Path, data: TrainingData) -> None:
    trained = SLIMRecRanker(CFG)
    trained.fit(data)
    registry = ModelRegistry(tmp_path / "rankers", artifact="weights.pt", kind="ranker")
    staging = registry.staging_dir()
    manifest = save_ranker(trained, data, staging, dataset="ml-100k-slice")
    version = registry.publish(staging, None, manifest)
    registry.promote(version)
    assert registry.current() == version
    served = ServedRanker(load_ranker(registry.version_dir(version)), version)
    window = [data.item_ids[i] for i in data.train[3]]
    assert served.add_items(["new"], np.ones((1, 16), np.float32)) == []  # ID-only: cannot embed it
    with_unknown = served.recommend([window + ["unknown-item"]], 10)[0]
    assert [x.item_id for x in with_unknown] == [x.item_id for x in served.recommend([window], 10)[0]]
    # The harness's "served" method scores through the same class.
    method = ServedRankerMethod(registry.version_dir(version), version, window_size=20)
    method.fit(data)
    s = method.score(np.arange(3), [np.asarray(t) for t in data.train[:3]])
    np.testing.assert_allclose(s[:, 1:], trained.score(np.arange(3), data.train[:3])[:, 1:], rtol=1e-4, atol=1e-4)
    empty = registry.staging_dir()
    (empty / "manifest.json").write_text("{}")
    bad = registry.publish(empty, None, {"format": 1})
    with pytest.raises(ValueError, match="has no weights.pt"):
        registry.promote(bad)
    with pytest.raises(ArtifactError):
        load_ranker(registry.version_dir(bad))


def test_qdrant_search_of_a_ranker_version_equals_the_in_memory_ranking(tmp_path: Path, data: TrainingData,
                                                                         text: np.ndarray) -> None:
    """``retrieval.ranker_search=qdrant``: the version's item table in its own collection, searched by the
    worker's slot, gives the same items as the exact in-memory ranking; catalogue items the text model was not
    trained on are added from their stored vectors."""
    import asyncio
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    from agents.ranker_slot import RankerSlot
    from streams.datasets import Item
    from streams.settings import Settings
    from vectorstore.store import VectorStore

    trained = SLIMRecRanker(replace(CFG, items="text"), item_text=text)
    trained.fit(data)
    settings = Settings.from_env(data={"data_dir": tmp_path}, qdrant={"path": str(tmp_path / "qdrant")},
                                 retrieval={"ranker_search": "qdrant"})
    registry = ModelRegistry.rankers_for_settings(settings)
    staging = registry.staging_dir()
    version = registry.publish(staging, None, save_ranker(trained, data, staging, dataset="slice"))
    store = VectorStore(settings)
    store.ensure_collections(text.shape[1])
    ids = [*data.item_ids[1:], "added-later"]
    vecs = np.vstack([text[1:], text[5][None]])
    store.upsert_items([Item(item_id=i, title=f"title of {i}") for i in ids], vecs, ["h"] * len(ids))
    pool = ThreadPoolExecutor(1)

    async def in_store(fn, *args, bulk=False):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    async def scenario():  # type: ignore[no-untyped-def]
        metrics: Counter[str] = Counter()
        slot = RankerSlot(settings, metrics, in_store)
        served = await slot.load(version, store)
        windows = [[data.item_ids[i] for i in data.train[u]][-20:] for u in range(6)]
        via_qdrant = await slot.rank(served, store, windows, [None] * 6, 10)
        slot.close()
        return metrics, served, windows, via_qdrant

    try:
        metrics, served, windows, via_qdrant = asyncio.run(scenario())
        assert metrics["ranker_items_added"] == 1 and served.collection == store.ranker_collection(version)
        assert store.count(served.collection) == len(ids)
        exact = served.ranker.recommend(windows, 10)
        for q, e in zip(via_qdrant, exact):
            assert [x.item_id for x in q] == [x.item_id for x in e]
            np.testing.assert_allclose([x.score for x in q], [x.score for x in e], rtol=1e-4)
        assert served.titles["added-later"] == "title of added-later"
    finally:
        pool.submit(store.close).result()
        pool.shutdown()
