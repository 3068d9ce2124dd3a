"""Qdrant wrapper: the item index and the users' rationale vectors, one code path for local mode and a server.

Two collections (names from settings), cosine distance:

* items: one point per catalogue item, id ``item_point_id(item_id)``; payload ``item_id, title, year,
  genres, text_hash``.
* rationales: one point per user, id ``user_point_id(user_id)``; payload at least ``user_id, rationale,
  window_version, model_version, timestamp``.

Point ids are uuid5 of the dataset's own ids, so re-indexing or replaying writes the same points again
instead of adding new ones.

Not thread-safe: Qdrant local mode must not be shared between threads, and :meth:`upsert_rationale`'s
read-then-write check relies on a single writer. The worker gives the store one dedicated thread.
"""

from __future__ import annotations

import importlib
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streams.settings import Settings

if TYPE_CHECKING:
    from qdrant_client import models

    from streams.datasets import Item
else:
    class _Lazy:
        """``qdrant_client.models``, imported on first use: qdrant_client takes ~0.7 s to import, which a
        worker paid before Faust even started (the store is opened in a thread while the group is joined)."""

        def __getattr__(self, name: str) -> Any:
            module = importlib.import_module("qdrant_client.models")
            globals()["models"] = module  # later lookups go straight to the module
            return getattr(module, name)

    models = _Lazy()

# Fixed namespaces: changing them would orphan every stored point.
_ITEM_NAMESPACE = uuid.UUID("6f1c5a52-3b0e-5d8a-9a51-7d0b6a3c9e11")
_USER_NAMESPACE = uuid.UUID("b2e8d4a7-91c3-5f60-8e2d-4a7c1f0b5d23")
_UPSERT_BATCH = 256
_READ_BATCH = 512
_RATIONALE_REQUIRED = ("user_id", "rationale", "window_version", "model_version", "timestamp")


def rationale_key(payload: dict[str, Any]) -> tuple[int, int]:
    """How fresh a stored rationale is: (window epoch, window version); payloads from before epochs have 0."""
    return int(payload.get("window_epoch", 0) or 0), int(payload.get("window_version", -1))


def item_point_id(item_id: str) -> str:
    """Deterministic Qdrant point id of an item."""
    return str(uuid.uuid5(_ITEM_NAMESPACE, item_id))


def user_point_id(user_id: str) -> str:
    """Deterministic Qdrant point id of a user's rationale (a different namespace from items)."""
    return str(uuid.uuid5(_USER_NAMESPACE, user_id))


@dataclass(frozen=True, slots=True)
class ScoredItem:
    item_id: str
    title: str
    score: float
    genres: tuple[str, ...]


class StoreLockedError(RuntimeError):
    """The local-mode directory is held by another client (usually another slimstream process)."""


class VectorStore:
    """Items and rationales in Qdrant: ``QDRANT_URL`` if set, else local mode at ``resolved_qdrant_path``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.items_collection = settings.qdrant.collection_items
        self.rationales_collection = settings.qdrant.collection_rationales
        # What users said they want (PUT /v1/users/{id}/preference), embedded like a rationale: one point each.
        self.preferences_collection = f"{settings.qdrant.collection_rationales}_preferences"
        self.local = not settings.qdrant.url
        from qdrant_client import QdrantClient

        if settings.qdrant.url:
            self.location = settings.qdrant.url
            key = settings.qdrant.api_key
            self.client = QdrantClient(url=settings.qdrant.url, api_key=key.get_secret_value() if key else None,
                                       timeout=max(1, round(settings.qdrant.deadline_s)))
        else:
            path = settings.qdrant_path
            path.mkdir(parents=True, exist_ok=True)
            self.location = str(path)
            try:
                self.client = QdrantClient(path=str(path))
            except RuntimeError as exc:
                if "already accessed" not in str(exc):
                    raise
                raise StoreLockedError(
                    f"Qdrant local-mode directory {path} is locked: another process (probably another "
                    "slimstream worker or `slimstream index`) has it open. Local mode allows one process at "
                    "a time: stop the other one, point QDRANT_PATH elsewhere, or use a Qdrant server "
                    "(QDRANT_URL)."
                ) from None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def ensure_collections(self, dim: int) -> None:
        """Create the collections (cosine, ``dim``) if missing; refuse existing ones of another size."""
        for name, key in ((self.items_collection, "item_id"), (self.rationales_collection, "user_id"),
                          (self.preferences_collection, "user_id")):
            if self.client.collection_exists(name):
                size = self._vector_size(name)
                if size != dim:
                    raise ValueError(
                        f"collection {name!r} in {self.location} holds {size}-d vectors but the encoder makes "
                        f"{dim}-d ones; delete the collection (or use a new QDRANT_PATH) and re-index"
                    )
                continue
            self.client.create_collection(
                name, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE)
            )
            if not self.local:  # local mode has no payload indexes (and warns if asked for one)
                self.client.create_payload_index(name, key, field_schema=models.PayloadSchemaType.KEYWORD)

    def _vector_size(self, collection: str) -> int:
        vectors = self.client.get_collection(collection).config.params.vectors
        if isinstance(vectors, models.VectorParams):
            return vectors.size
        raise ValueError(f"collection {collection!r} uses named vectors; expected a single unnamed vector")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- items -----------------------------------------------------------------------------------------------
    def existing_item_hashes(self) -> dict[str, str]:
        """item_id -> text_hash of every indexed item."""
        return {
            p["item_id"]: p.get("text_hash", "")
            for p in self._scroll_payloads(self.items_collection, ["item_id", "text_hash"])
            if "item_id" in p
        }

    def upsert_items(self, items: Sequence[Item], vectors: np.ndarray, text_hashes: Sequence[str]) -> None:
        """Write items with their vectors and text hashes (same order), in batches."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(items) != len(vectors) or len(items) != len(text_hashes):
            raise ValueError(f"upsert_items: {len(items)} items, vectors of shape {vectors.shape}, "
                             f"{len(text_hashes)} hashes")
        for start in range(0, len(items), _UPSERT_BATCH):
            points = [
                models.PointStruct(
                    id=item_point_id(item.item_id),
                    vector=vec.tolist(),
                    payload={"item_id": item.item_id, "title": item.title, "year": item.year,
                             "genres": list(item.genres), "text_hash": h},
                )
                for item, vec, h in zip(items[start:start + _UPSERT_BATCH], vectors[start:start + _UPSERT_BATCH],
                                        text_hashes[start:start + _UPSERT_BATCH])
            ]
            self.client.upsert(self.items_collection, points=points, wait=True)

    def delete_items(self, item_ids: Collection[str]) -> None:
        ids = [item_point_id(i) for i in item_ids]
        for start in range(0, len(ids), _UPSERT_BATCH):
            self.client.delete(self.items_collection,
                               points_selector=models.PointIdsList(points=ids[start:start + _UPSERT_BATCH]),
                               wait=True)

    def get_item_vectors(self, item_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored (unit) vectors of those ``item_ids`` that are indexed; unknown ids are left out."""
        return {
            rec.payload["item_id"]: np.asarray(rec.vector, dtype=np.float32)
            for rec in self._retrieve(self.items_collection, [item_point_id(i) for i in item_ids],
                                      with_payload=["item_id"], with_vectors=True)
            if rec.payload and rec.vector is not None
        }

    def get_items(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """item_id -> payload (title, year, genres, ...) of the indexed ones among ``item_ids``."""
        return {
            rec.payload["item_id"]: dict(rec.payload)
            for rec in self._retrieve(self.items_collection, [item_point_id(i) for i in item_ids],
                                      with_payload=True, with_vectors=False)
            if rec.payload
        }

    def search_items(self, query: np.ndarray, exclude_item_ids: Collection[str], limit: int) -> list[ScoredItem]:
        """The ``limit`` items closest to ``query`` (cosine), never one of ``exclude_item_ids``.

        The exclusion is a ``must_not`` filter in Qdrant; the ids are also dropped client-side, with a few
        extra hits fetched to make up for them, so a filter that did not apply can never leak a seen item.
        A zero query has no direction and returns no items.
        """
        return self.search_items_batch([(query, exclude_item_ids)], limit)[0]

    def search_items_batch(self, queries: Sequence[tuple[np.ndarray, Collection[str]]],
                           limit: int, collection: str | None = None) -> list[list[ScoredItem]]:
        """:meth:`search_items` for many (query, excluded ids) at once: one Qdrant batch request (one round
        trip to a server), the answers in the order of ``queries``. ``collection``: another collection of
        item points (a ranker version's, :meth:`ensure_ranker_items`) instead of the text items."""
        requests: list[models.QueryRequest] = []
        slots: list[int | None] = []  # index into requests per query; None: no direction, no items
        excludes: list[set[str]] = []
        for query, exclude_item_ids in queries:
            q = np.asarray(query, dtype=np.float32).reshape(-1)
            if not np.all(np.isfinite(q)):
                raise ValueError("search_items: query vector has NaN or infinite values")
            exclude = set(exclude_item_ids)
            excludes.append(exclude)
            if limit < 1 or not np.any(q):
                slots.append(None)
                continue
            flt = None
            if exclude and not self.local:
                flt = models.Filter(must_not=[models.FieldCondition(key="item_id",
                                                                   match=models.MatchAny(any=sorted(exclude)))])
            # Local mode evaluates payload filters point by point in Python (9-18x slower than the plain search
            # on ML-1M, see benchmarks/), so there we fetch len(exclude) extra hits and drop them client-side.
            extra = min(len(exclude), 64) if flt is not None else len(exclude)
            slots.append(len(requests))
            requests.append(models.QueryRequest(query=q.tolist(), filter=flt, limit=limit + extra,
                                                with_payload=["item_id", "title", "genres"], with_vector=False))
        target = collection or self.items_collection
        answers = self.client.query_batch_points(target, requests=requests) if requests else []
        out: list[list[ScoredItem]] = []
        for slot, exclude in zip(slots, excludes):
            out.append([] if slot is None else _scored(answers[slot].points, exclude, limit))
        return out

    def scroll_items(self, with_vectors: bool = False) -> Iterator[tuple[dict[str, Any], np.ndarray | None]]:
        """Every indexed item: (payload, unit text vector or None)."""
        offset = None
        while True:
            records, offset = self.client.scroll(self.items_collection, limit=_READ_BATCH, offset=offset,
                                                 with_payload=True, with_vectors=with_vectors)
            for rec in records:
                vec = None if rec.vector is None else np.asarray(rec.vector, dtype=np.float32)
                yield dict(rec.payload or {}), vec
            if offset is None:
                return

    # -- ranker versions: one collection of item points per trained ranker --------------------------------------
    def ranker_collection(self, version: str) -> str:
        return f"{self.items_collection}-ranker-{version}"

    def ensure_ranker_items(self, version: str, item_ids: Sequence[str], vectors: np.ndarray,
                            titles: Sequence[str]) -> str:
        """The ranker version's item vectors (dot-product space) in their own collection; rebuilt when its
        size or point count differs. Returns the collection name."""
        name = self.ranker_collection(version)
        vectors = np.asarray(vectors, dtype=np.float32)
        if self.client.collection_exists(name):
            if self._vector_size(name) == vectors.shape[1] and self.count(name) == len(item_ids):
                return name
            self.client.delete_collection(name)
        self.client.create_collection(
            name, vectors_config=models.VectorParams(size=int(vectors.shape[1]), distance=models.Distance.DOT))
        for start in range(0, len(item_ids), _UPSERT_BATCH):
            self.client.upsert(name, wait=True, points=[
                models.PointStruct(id=item_point_id(i), vector=v.tolist(), payload={"item_id": i, "title": t})
                for i, v, t in zip(item_ids[start:start + _UPSERT_BATCH], vectors[start:start + _UPSERT_BATCH],
                                   titles[start:start + _UPSERT_BATCH])
            ])
        return name

    # -- rationales ------------------------------------------------------------------------------------------
    def get_rationale(self, user_id: str) -> tuple[np.ndarray, dict[str, Any]] | None:
        """(unit vector, payload) of the user's stored rationale, or None."""
        return self.get_rationales([user_id]).get(user_id)

    def get_rationales(self, user_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """user_id -> (unit vector, payload) of those ``user_ids`` that have a stored rationale."""
        return self._user_points(self.rationales_collection, user_ids)

    def _user_points(self, collection: str, user_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        out: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        for rec in self._retrieve(collection, [user_point_id(u) for u in user_ids], with_payload=True,
                                  with_vectors=True):
            payload = dict(rec.payload or {})
            if rec.vector is not None and "user_id" in payload:
                out[payload["user_id"]] = (np.asarray(rec.vector, dtype=np.float32), payload)
        return out

    def rationale_keys(self, user_ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """user_id -> :func:`rationale_key` of the stored rationale, for those that have one (no vectors read)."""
        return {
            rec.payload["user_id"]: rationale_key(rec.payload)
            for rec in self._retrieve(self.rationales_collection, [user_point_id(u) for u in user_ids],
                                      with_payload=["user_id", "window_version", "window_epoch"], with_vectors=False)
            if rec.payload and "user_id" in rec.payload
        }

    def upsert_rationale(self, user_id: str, vector: np.ndarray, payload: dict[str, Any]) -> bool:
        """Store the user's rationale unless a newer one is already stored: newer by (``window_epoch``,
        ``window_version``), see :func:`rationale_key`.

        Returns False, writing nothing, when the stored one is newer: a replayed event or a slow student answer
        must not clobber a fresher rationale. An equal key is overwritten (same window, e.g. a re-run). A later
        epoch wins whatever its version: the windows were rebuilt from scratch (changelog lost) and count
        from 1 again. Read-then-write is safe because the store has a single writer thread.
        """
        missing = [k for k in _RATIONALE_REQUIRED if k not in payload]
        if missing:
            raise ValueError(f"rationale payload lacks {', '.join(missing)}")
        if payload["user_id"] != user_id:
            raise ValueError(f"rationale payload is for user {payload['user_id']!r}, not {user_id!r}")
        version = payload["window_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"window_version must be an int, got {version!r}")
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ValueError("rationale vector must be finite and non-zero")
        current = self.client.retrieve(self.rationales_collection, ids=[user_point_id(user_id)],
                                       with_payload=["window_version", "window_epoch"], with_vectors=False)
        if current and rationale_key(current[0].payload or {}) > rationale_key(payload):
            return False
        self.client.upsert(self.rationales_collection, wait=True, points=[
            models.PointStruct(id=user_point_id(user_id), vector=vec.tolist(), payload=dict(payload))
        ])
        return True

    def delete_rationales(self, user_id: str) -> int:
        """Delete every rationale point of ``user_id`` (its own point id and any point whose payload names the
        user); returns how many there were. Forgetting a user must leave nothing behind, whatever wrote it."""
        if not self.client.collection_exists(self.rationales_collection):
            return 0
        selector = models.Filter(must=[models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))])
        found = {str(r.id) for r in self._retrieve(self.rationales_collection, [user_point_id(user_id)],
                                                   with_payload=False, with_vectors=False)}
        found |= {str(p.id) for p in self.client.scroll(self.rationales_collection, scroll_filter=selector,
                                                         limit=10_000, with_payload=False)[0]}
        if found:
            self.client.delete(self.rationales_collection, wait=True,
                               points_selector=models.PointIdsList(points=sorted(found)))
        return len(found)

    # -- preferences: the user's own words, an input of the ranker beside (or instead of) the rationale --------
    def upsert_preference(self, user_id: str, vector: np.ndarray, text: str) -> bool:
        """Store the user's preference; whether the user had none before (read-then-write is safe: the store
        has a single writer thread)."""
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise ValueError("preference vector must be finite and non-zero")
        new = not self._retrieve(self.preferences_collection, [user_point_id(user_id)], with_payload=False,
                                 with_vectors=False)
        self.client.upsert(self.preferences_collection, wait=True, points=[models.PointStruct(
            id=user_point_id(user_id), vector=vec.tolist(),
            payload={"user_id": user_id, "text": text, "updated_at": time.time()})])
        return new

    def get_preferences(self, user_ids: Sequence[str]) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """user_id -> (unit vector, payload with ``text``) of those ``user_ids`` that set a preference."""
        if not self.client.collection_exists(self.preferences_collection):
            return {}
        return self._user_points(self.preferences_collection, user_ids)

    def delete_preference(self, user_id: str) -> bool:
        """Delete the user's preference; whether there was one."""
        if not self.client.collection_exists(self.preferences_collection):
            return False
        found = self._retrieve(self.preferences_collection, [user_point_id(user_id)], with_payload=False,
                               with_vectors=False)
        if found:
            self.client.delete(self.preferences_collection, wait=True,
                               points_selector=models.PointIdsList(points=[user_point_id(user_id)]))
        return bool(found)

    def count_preferences(self) -> int:
        if not self.client.collection_exists(self.preferences_collection):
            return 0
        return self.count(self.preferences_collection)

    def rationale_points(self) -> list[dict[str, Any]]:
        """Payloads of all stored rationales (for tests and operations)."""
        return list(self._scroll_payloads(self.rationales_collection, True))

    # -- misc ------------------------------------------------------------------------------------------------
    def count(self, collection: str) -> int:
        return self.client.count(collection, exact=True).count

    def _retrieve(self, collection: str, ids: list[str], **kwargs: Any) -> list[models.Record]:
        out: list[models.Record] = []
        ids = list(dict.fromkeys(ids))  # a window may hold the same item twice
        for start in range(0, len(ids), _READ_BATCH):
            out.extend(self.client.retrieve(collection, ids=ids[start:start + _READ_BATCH], **kwargs))
        return out

    def _scroll_payloads(self, collection: str, with_payload: bool | list[str]) -> Iterator[dict[str, Any]]:
        offset = None
        while True:
            records, offset = self.client.scroll(collection, limit=_READ_BATCH, offset=offset,
                                                 with_payload=with_payload, with_vectors=False)
            for rec in records:
                yield dict(rec.payload or {})
            if offset is None:
                return


def _scored(hits: Sequence[models.ScoredPoint], exclude: Collection[str], limit: int) -> list[ScoredItem]:
    out: list[ScoredItem] = []
    for h in hits:
        p = h.payload or {}
        item_id = p.get("item_id")
        if item_id is None or item_id in exclude or not np.isfinite(h.score):
            continue
        out.append(ScoredItem(item_id=item_id, title=p.get("title", item_id), score=float(h.score),
                              genres=tuple(p.get("genres") or ())))
        if len(out) == limit:
            break
    return out
