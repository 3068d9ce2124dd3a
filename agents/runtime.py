"""What the agents share inside one worker process: the vector store, the encoder, the student, and
the thread pools that keep their blocking calls off the event loop.

Each pool is sized on purpose: Qdrant local mode is not safe to share between threads, so one thread
owns it; the student runs ``student_concurrency`` model calls at once (1 on a CPU box: a second
concurrent batch only splits the same cores); the encoder gets its own thread so a long generation
never delays the embedding of a fresh rationale or the fast path's fallback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from streams.settings import Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.student import StudentBackend
    from vectorstore.store import VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")


class DeadlineExceeded(TimeoutError):
    pass


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics: Counter[str] = Counter()
        self.started_at = time.time()
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="qdrant")
        self._encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self._student_pool = ThreadPoolExecutor(settings.student_concurrency, thread_name_prefix="student")
        self.store: VectorStore | None = None
        self.encoder: TextEncoder | None = None
        self.student: StudentBackend | None = None
        # Set once the store / the models are loaded; the agents wait on them before their first event.
        self.store_ready = asyncio.Event()
        self.models_ready = asyncio.Event()

    # -- start-up -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and load the encoder and student, each in its own pool, concurrently."""
        from models.encoder import load_encoder

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        encoder_f = loop.run_in_executor(self._encoder_pool, load_encoder, self.settings)
        student_f = loop.run_in_executor(self._student_pool, self._load_student)
        self.encoder = await encoder_f
        self.store = await self.in_store(self._open_store)
        self.store_ready.set()
        log.info("vector store ready (%.1fs)", time.monotonic() - t0)
        self.student = await student_f
        self.models_ready.set()
        log.info("student %s ready (%.1fs)", self.student.model_version, time.monotonic() - t0)

    def _load_student(self) -> "StudentBackend":
        """The base student plus the registry's CURRENT adapter, if one was promoted."""
        from models.student import load_student
        from retrain.registry import ModelRegistry

        adapter = ModelRegistry.for_settings(self.settings).current_adapter_dir()
        return load_student(self.settings, adapter_dir=adapter) if adapter else load_student(self.settings)

    def _open_store(self) -> "VectorStore":
        from streams.datasets import load_items
        from vectorstore.catalogue import index_catalogue
        from vectorstore.store import VectorStore

        assert self.encoder is not None
        store = VectorStore(self.settings)
        store.ensure_collections(self.encoder.dim)
        if store.count(self.settings.collection_items) == 0:
            # A worker pointed at an empty Qdrant indexes the configured catalogue itself, so
            # `docker compose up` and a fresh cluster need no separate step.
            log.info("items collection is empty: indexing catalogue %r", self.settings.dataset)
            report = index_catalogue(store, self.encoder, load_items(self.settings.dataset))
            log.info("indexed %s", report)
        return store

    def close(self) -> None:
        if self.store is not None:
            self._store_pool.submit(self.store.close).result(timeout=30)
        for pool in (self._store_pool, self._encoder_pool, self._student_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    # -- off-loop calls ------------------------------------------------------------------------------------
    async def in_store(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._store_pool, fn, *args)

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        assert self.encoder is not None
        return await asyncio.get_running_loop().run_in_executor(self._encoder_pool, self.encoder.encode, list(texts))

    async def generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        """One batched student call with a deadline. The thread cannot be killed; on timeout we stop
        waiting, and the pool's size still bounds how many calls run."""
        assert self.student is not None
        fut = asyncio.get_running_loop().run_in_executor(self._student_pool, self.student.generate, list(batch))
        try:
            return await asyncio.wait_for(fut, timeout=self.settings.student_deadline_s)
        except asyncio.TimeoutError:
            self.metrics["student_deadline_exceeded"] += 1
            raise DeadlineExceeded(f"student batch of {len(batch)} exceeded {self.settings.student_deadline_s}s")
