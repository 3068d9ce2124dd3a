"""The worker's trained ranker: loaded from the ranker registry, scored off the loop, hot-swapped.

What is served is what the harness evaluates (``slimstream evaluate --methods served``): the registry version's
:class:`~models.served_ranker.ServedRanker` over the user's window and latest rationale vector.

Loading (a thread, never the loop): the artifact; then, for a model that reads item text, every catalogue item
the model was not trained on is added from its stored text vector, so an item indexed after training can be
recommended; with ``retrieval.ranker_search=qdrant`` the version's item table is written to its own Qdrant
collection (``<items>-ranker-<version>``) and recommendations are Qdrant searches over it (a catalogue larger
than memory, an ANN index on a server); by default the exact dot product runs in memory.

Hot swap (:meth:`RankerSlot.swap`): as the student's (agents/runtime.py): load beside the serving version,
replace it in one assignment on the loop, keep it on failure. A batch takes the ranker it runs on when it
starts, so every answer names the version that ranked it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from streams.registry import ModelRegistry
from streams.settings import Settings

if TYPE_CHECKING:
    from models.served_ranker import ServedItem, ServedRanker
    from vectorstore.store import VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")
InStore = Callable[..., Awaitable[Any]]
SwapResult = Literal["swapped", "noop", "failed"]  # of a ranker's hot swap, and of the student's (agents/runtime.py)


class Served:
    """One loaded version: the ranker, item titles, and its Qdrant collection when searched there."""

    def __init__(self, ranker: ServedRanker, version: str, titles: dict[str, str], collection: str | None) -> None:
        self.ranker = ranker
        self.version = version
        self.titles = titles
        self.collection = collection

    @property
    def label(self) -> str:
        return f"ranker+{self.version}"


class RankerSlot:
    def __init__(self, settings: Settings, metrics: Any, in_store: InStore) -> None:
        self.settings = settings
        self.metrics = metrics
        self.in_store = in_store
        self.registry = ModelRegistry.rankers_for_settings(settings)
        self.served: Served | None = None
        self.served_b: Served | None = None  # A/B: arm b's pinned ranker (None with ranker_b=text: the text ranker)
        self.last_swap: dict[str, Any] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ranker")
        self._lock = asyncio.Lock()

    @property
    def version(self) -> str | None:
        return None if self.served is None else self.served.version

    @property
    def enabled(self) -> bool:
        return self.settings.retrieval.ranker == "registry"

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- loading -----------------------------------------------------------------------------------------------
    async def load(self, version: str, store: VectorStore) -> Served:
        from models.ranker_artifact import load_ranker
        from models.served_ranker import ServedRanker

        if not self.registry.exists(version):
            raise KeyError(f"no ranker version {version!r} in {self.registry.root}")
        ranker = ServedRanker(await self._in_pool(load_ranker, self.registry.version_dir(version)), version)
        catalogue = await self.in_store(lambda: list(store.scroll_items(with_vectors=ranker.reads_text)),
                                        bulk=True)
        titles = {p["item_id"]: p.get("title") or p["item_id"] for p, _ in catalogue if "item_id" in p}
        if ranker.reads_text:
            new = [(p["item_id"], v) for p, v in catalogue
                   if "item_id" in p and v is not None and p["item_id"] not in ranker.index]
            if new:
                added = await self._in_pool(ranker.add_items, [i for i, _ in new], np.stack([v for _, v in new]))
                self.metrics["ranker_items_added"] += len(added)
                log.info("ranker %s: %d catalogue items it was not trained on served from their text", version,
                         len(added))
        collection = None
        if self.settings.retrieval.ranker_search == "qdrant":
            ids = ranker.item_ids[1:]
            collection = await self.in_store(store.ensure_ranker_items, version, ids, ranker.item_matrix()[1:],
                                             [titles.get(i, i) for i in ids], bulk=True)
        return Served(ranker, version, titles, collection)

    def served_for(self, arm: str | None) -> Served | None:
        """What ranks for a user of ``arm``: arm b's pinned ranker where the experiment sets one, else the
        serving one (None: the text ranker)."""
        if arm == "b" and self.settings.ab.ranker_b is not None:
            return self.served_b
        return self.served

    async def start(self, store: VectorStore) -> None:
        """Serve the registry's CURRENT ranker if there is one (and the setting asks for it), and arm b's."""
        pinned = self.settings.ab.ranker_b if self.settings.ab.enabled else None
        if pinned not in (None, "text"):
            # Like arm b's student: a version that does not load stops the worker.
            self.served_b = await self.load(pinned, store)
            log.info("A/B: arm b's ranker %s", pinned)
        if not self.enabled:
            return
        version = await asyncio.to_thread(self.registry.current)
        if version is None:
            log.info("no ranker promoted in %s: serving the text ranker", self.registry.root)
            return
        try:
            self.served = await self.load(version, store)
            log.info("serving ranker %s", version)
        except Exception:
            self.metrics["ranker_load_failures"] += 1
            log.exception("could not load ranker %s: serving the text ranker", version)

    async def swap(self, version: str | None, store: VectorStore, *, reason: str = "") -> SwapResult:
        """Serve ``version`` (None: the text ranker) from now on; idempotent, serialised, old one on failure."""
        async with self._lock:
            if version == self.version:
                self.metrics["ranker_updates_noop"] += 1
                return "noop"
            old, started = self.version, time.time()
            try:
                served = None if version is None else await self.load(version, store)
            except Exception as exc:
                self.metrics["ranker_swap_failures"] += 1
                log.exception("ranker swap to %s failed; still serving %s", version, old)
                self.last_swap = {"from": old, "to": version, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "reason": reason, "at": time.time()}
                return "failed"
            self.served = served  # one assignment: batches already running keep the old object
            self.metrics["ranker_swaps"] += 1
            self.last_swap = {"from": old, "to": version, "ok": True, "load_s": round(time.time() - started, 3),
                              "reason": reason, "at": time.time()}
            log.info("ranker hot swap %s -> %s (%s)", old, version, reason or "no reason given")
            return "swapped"

    # -- scoring -----------------------------------------------------------------------------------------------
    async def rank(self, served: Served, store: VectorStore, windows: Sequence[Sequence[str]],
                   rationales: Sequence[np.ndarray | None], k: int) -> list[list[ServedItem] | None]:
        """Top-k per window with ``served`` (one batched call, off the loop, with a deadline)."""
        deadline = self.settings.retrieval.ranker_deadline_s
        self.metrics["ranker_calls"] += 1
        self.metrics["ranker_windows"] += len(windows)
        if served.collection is None:
            return await asyncio.wait_for(self._in_pool(served.ranker.recommend, windows, k, rationales), deadline)
        return await asyncio.wait_for(self._rank_in_qdrant(served, store, windows, rationales, k), deadline)

    async def _rank_in_qdrant(self, served: Served, store: VectorStore, windows: Sequence[Sequence[str]],
                              rationales: Sequence[np.ndarray | None], k: int) -> list[list[ServedItem] | None]:
        from models.served_ranker import ServedItem

        ranker = served.ranker
        histories = [ranker.indices(w) for w in windows]
        states = await self._in_pool(ranker.states, histories, rationales)
        live = [i for i, h in enumerate(histories) if len(h)]
        hits = await self.in_store(store.search_items_batch, [(states[i], set(windows[i])) for i in live], k,
                                   served.collection)
        out: list[list[ServedItem] | None] = [None] * len(windows)
        for i, found in zip(live, hits):
            out[i] = [ServedItem(h.item_id, h.score) for h in found]
        return out

    def popular(self, served: Served, window: Sequence[str], k: int) -> list[str]:
        seen = set(window)
        return [i for i in served.ranker.popular if i not in seen][:k]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


__all__ = ["RankerSlot", "Served", "SwapResult"]
