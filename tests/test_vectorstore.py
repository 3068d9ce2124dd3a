"""Qdrant (local mode) store and idempotent catalogue indexing, with the real encoder."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from models.encoder import OnnxMiniLMEncoder, load_encoder
from streams.datasets import Item, item_text, load_items
from streams.settings import Settings
from vectorstore.catalogue import IndexReport, index_catalogue
from vectorstore.store import ScoredItem, StoreLockedError, VectorStore, item_point_id, user_point_id

SMALL = 200  # first ML-1M items: enough for retrieval to mean something, quick to embed


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> OnnxMiniLMEncoder:
    # Same cache directory as tests/test_encoder.py, so the session exports the model once.
    data_dir = tmp_path_factory.getbasetemp() / "shared-encoder-data"
    enc = load_encoder(Settings.from_env(data={"data_dir": data_dir}))
    assert isinstance(enc, OnnxMiniLMEncoder)
    return enc


@pytest.fixture(scope="module")
def catalogue() -> list[Item]:
    return load_items("ml-1m")[:SMALL]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env(data={"data_dir": tmp_path}, qdrant={"path": str(tmp_path / "q"), "url": None})


@pytest.fixture
def store(settings: Settings) -> Iterator[VectorStore]:
    s = VectorStore(settings)
    yield s
    s.close()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, encoder: OnnxMiniLMEncoder,
            catalogue: list[Item]) -> Iterator[VectorStore]:
    """The small catalogue, indexed once for the tests that only read it."""
    data_dir = tmp_path_factory.mktemp("indexed")
    s = VectorStore(Settings.from_env(data={"data_dir": data_dir}, qdrant={"path": str(data_dir / "q"), "url": None}))
    index_catalogue(s, encoder, catalogue)
    yield s
    s.close()


class _RenamedEncoder:
    """The same embeddings under another version string, as after an encoder upgrade."""

    def __init__(self, inner: OnnxMiniLMEncoder) -> None:
        self.inner, self.dim, self.version = inner, inner.dim, inner.version + "-next"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.encode(texts)


def test_point_ids_are_deterministic_and_namespaced() -> None:
    assert item_point_id("Toy Story (1995)") == item_point_id("Toy Story (1995)")
    assert item_point_id("x") != item_point_id("y")
    assert item_point_id("x") != user_point_id("x")
    assert uuid.UUID(item_point_id("x")).version == 5 and uuid.UUID(user_point_id("x")).version == 5


def test_index_catalogue_is_idempotent(store: VectorStore, encoder: OnnxMiniLMEncoder,
                                       catalogue: list[Item], settings: Settings) -> None:
    calls: list[tuple[int, int]] = []
    first = index_catalogue(store, encoder, catalogue, progress=lambda d, t: calls.append((d, t)))
    assert first == IndexReport(total=SMALL, embedded=SMALL, unchanged=0, removed=0)
    assert calls[0] == (0, SMALL) and calls[-1] == (SMALL, SMALL)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert store.count(settings.qdrant.collection_items) == SMALL

    calls.clear()
    assert index_catalogue(store, encoder, catalogue, progress=lambda d, t: calls.append((d, t))) == \
        IndexReport(total=SMALL, embedded=0, unchanged=SMALL, removed=0)
    assert calls == [(0, 0)]

    # one edited title: exactly that item is re-embedded, and its payload and vector follow the edit
    target = catalogue[10]
    before = store.get_item_vectors([target.item_id])[target.item_id]
    edited = [i.model_copy(update={"title": "A Completely Different Film"}) if i is target else i
              for i in catalogue]
    assert index_catalogue(store, encoder, edited) == IndexReport(SMALL, 1, SMALL - 1, 0)
    assert store.get_items([target.item_id])[target.item_id]["title"] == "A Completely Different Film"
    after = store.get_item_vectors([target.item_id])[target.item_id]
    assert float(before @ after) < 0.99
    assert store.count(settings.qdrant.collection_items) == SMALL

    # items gone from the catalogue are deleted
    assert index_catalogue(store, encoder, edited[5:]) == IndexReport(SMALL - 5, 0, SMALL - 5, 5)
    assert store.count(settings.qdrant.collection_items) == SMALL - 5
    assert store.get_items([i.item_id for i in edited[:5]]) == {}


def test_index_state_survives_reopening(settings: Settings, encoder: OnnxMiniLMEncoder,
                                        catalogue: list[Item]) -> None:
    with VectorStore(settings) as s:
        index_catalogue(s, encoder, catalogue[:20])
    with VectorStore(settings) as s:
        assert index_catalogue(s, encoder, catalogue[:20]).embedded == 0
        assert len(s.existing_item_hashes()) == 20


def test_new_encoder_version_reembeds_everything(store: VectorStore, encoder: OnnxMiniLMEncoder,
                                                 catalogue: list[Item]) -> None:
    index_catalogue(store, encoder, catalogue[:40])
    report = index_catalogue(store, _RenamedEncoder(encoder), catalogue[:30])
    assert report == IndexReport(total=30, embedded=30, unchanged=0, removed=10)


def test_bad_catalogues_rejected(store: VectorStore, encoder: OnnxMiniLMEncoder, catalogue: list[Item]) -> None:
    with pytest.raises(ValueError, match="duplicate item_id"):
        index_catalogue(store, encoder, [catalogue[0], catalogue[0]])
    with pytest.raises(ValueError, match="empty catalogue"):
        index_catalogue(store, encoder, [])


def test_item_lookups(indexed: VectorStore, encoder: OnnxMiniLMEncoder, catalogue: list[Item]) -> None:
    toy = catalogue[0]
    vecs = indexed.get_item_vectors([toy.item_id, "Not A Movie (2099)", toy.item_id])
    assert set(vecs) == {toy.item_id}
    expected = encoder.encode([item_text(toy)])[0]
    assert float(vecs[toy.item_id] @ expected) > 0.9999
    meta = indexed.get_items([toy.item_id, catalogue[1].item_id, "nope"])
    assert set(meta) == {toy.item_id, catalogue[1].item_id}
    assert meta[toy.item_id]["title"] == "Toy Story"
    assert meta[toy.item_id]["year"] == 1995
    assert meta[toy.item_id]["genres"] == ["Animation", "Children's", "Comedy"]
    assert len(indexed.existing_item_hashes()) == SMALL


def test_search_items_excludes_given_ids(indexed: VectorStore, encoder: OnnxMiniLMEncoder,
                                         catalogue: list[Item]) -> None:
    toy = catalogue[0].item_id
    query = indexed.get_item_vectors([toy])[toy]
    unfiltered = indexed.search_items(query, [], limit=10)
    assert len(unfiltered) == 10 and all(isinstance(h, ScoredItem) for h in unfiltered)
    assert unfiltered[0].item_id == toy and unfiltered[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in unfiltered] == sorted((h.score for h in unfiltered), reverse=True)

    excluded = [h.item_id for h in unfiltered[:6]]
    hits = indexed.search_items(query, excluded, limit=10)
    assert len(hits) == 10
    assert not {h.item_id for h in hits} & set(excluded)
    assert [h.item_id for h in hits[:4]] == [h.item_id for h in unfiltered[6:]]

    # a text query finds the related film first
    q = encoder.encode(["the sequel about the toys of Andy's room: Woody and Buzz"])[0]
    assert indexed.search_items(q, [], limit=3)[0].item_id == toy
    assert indexed.search_items(q, {toy}, limit=3)[0].item_id != toy
    assert indexed.search_items(np.zeros(384, dtype=np.float32), [], limit=3) == []


def test_rationale_versions_only_move_forward(store: VectorStore, encoder: OnnxMiniLMEncoder,
                                              settings: Settings) -> None:
    store.ensure_collections(encoder.dim)
    old_text, new_text = "likes animated comedies", "now into war dramas"
    v_old, v_new = encoder.encode([old_text, new_text])

    def payload(text: str, version: int) -> dict:
        return {"user_id": "u1", "rationale": text, "window_version": version, "model_version": "m0",
                "timestamp": 1.0}

    assert store.get_rationale("u1") is None
    assert store.upsert_rationale("u1", v_new, payload(new_text, 5))
    assert not store.upsert_rationale("u1", v_old, payload(old_text, 4))  # stale: refused
    vec, stored = store.get_rationale("u1")  # type: ignore[misc]
    assert stored["window_version"] == 5 and stored["rationale"] == new_text
    assert float(vec @ v_new) > 0.9999
    assert store.upsert_rationale("u1", v_new, {**payload(new_text, 5), "model_version": "m1"})  # same window
    assert store.upsert_rationale("u1", v_old, payload(old_text, 6))
    assert store.get_rationale("u1")[1]["window_version"] == 6  # type: ignore[index]

    assert store.upsert_rationale("u2", v_old, {**payload(old_text, 1), "user_id": "u2"})
    assert store.count(settings.qdrant.collection_rationales) == 2
    assert sorted((p["user_id"], p["window_version"]) for p in store.rationale_points()) == [("u1", 6), ("u2", 1)]

    # The windows changelog was lost (a new Kafka cluster) while Qdrant kept u1's rationale at version 6: the
    # rebuilt windows count from 1 again under a later epoch, and their rationales win from the first one.
    assert store.upsert_rationale("u1", v_new, {**payload(new_text, 1), "window_epoch": 1_800_000_000_000})
    assert store.get_rationale("u1")[1]["window_version"] == 1  # type: ignore[index]
    assert not store.upsert_rationale("u1", v_old, payload(old_text, 7))  # the old lineage: stale now
    assert store.upsert_rationale("u1", v_old, {**payload(old_text, 2), "window_epoch": 1_800_000_000_000})

    with pytest.raises(ValueError, match="lacks"):
        store.upsert_rationale("u3", v_old, {"user_id": "u3", "rationale": "x"})
    with pytest.raises(ValueError, match="not 'u3'"):
        store.upsert_rationale("u3", v_old, payload(old_text, 1))


def test_local_directory_lock_is_explained(store: VectorStore, settings: Settings) -> None:
    with pytest.raises(StoreLockedError) as err:
        VectorStore(settings)
    assert str(settings.qdrant_path) in str(err.value)
    assert "another process" in str(err.value)
    store.close()
    VectorStore(settings).close()  # free again once the holder closes


def test_ensure_collections(store: VectorStore, settings: Settings) -> None:
    store.ensure_collections(384)
    store.ensure_collections(384)  # idempotent
    assert store.count(settings.qdrant.collection_items) == 0
    assert store.count(settings.qdrant.collection_rationales) == 0
    with pytest.raises(ValueError, match="384-d"):
        store.ensure_collections(768)
