"""What the agents share inside one worker process: the vector store, the encoder, the student, and
the thread pools that keep their blocking calls off the event loop.

Each pool is sized on purpose: Qdrant local mode is not safe to share between threads, so one thread
owns it; the student runs ``student.concurrency`` model calls at once (1 on a CPU box: a second
concurrent batch only splits the same cores); the encoder gets its own thread so a long generation
never delays the embedding of a fresh rationale or the fast path's fallback. A hot swap loads the next
student in a fourth, single-thread pool, so the serving student keeps generating in its own pool until the
swap (loading there would queue behind, and stall, the rationale batches).

Hot swap (:meth:`Runtime.swap_student`): the new student is built off the loop, then ``self.student`` is
replaced in one assignment on the loop. Every batch takes the student it runs on when it starts
(:meth:`Runtime.generate` is given it), so a batch in flight finishes on the old student and reports the
old version; the next batch runs on the new one.

Drift (:attr:`Runtime.drift`): one :class:`streams.drift.DriftMonitor` per worker, fed by the agents on the
loop (O(1) per event). Its reference is ``<registry>/<CURRENT>/drift_reference.json`` when the serving
version has one; otherwise the genre reference is taken from the first ``drift.window_events`` events this
worker sees (after a swap without a reference file, from the first window after the swap) and kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from agents.backlog import RationaleBacklog
from agents.feedback import ArmCounts, Attribution, RecentRecommendations, Trending
from agents.ranker_slot import RankerSlot, SwapResult
from agents.telemetry import Telemetry
from streams.ab import arm_of
from streams.drift import DriftMonitor, StaleShare
from streams.drift_reference import DriftReference, read_drift_reference
from streams.events import Recommendation
from streams.registry import ModelRegistry
from streams.settings import Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.student_base import StudentBackend
    from vectorstore.store import VectorStore

log = logging.getLogger(__name__)
T = TypeVar("T")


GENRE_CACHE_SIZE = 100_000  # item -> genres, for the drift monitor's genre mix (least recently used dropped)
LATENCY_SAMPLES = 2_000  # recent timings kept per measured step, for /metrics/ percentiles

class DeadlineExceeded(TimeoutError):
    pass


def lower_thread_priority(by: int) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux: a thread's priority is its own; raising it
    needs no privilege). Where that is not possible the thread keeps the process's priority."""
    if by <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError:
        log.debug("could not lower the student thread's priority", exc_info=True)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics: Counter[str] = Counter()
        self.latency: defaultdict[str, deque[float]] = defaultdict(lambda: deque(maxlen=LATENCY_SAMPLES))
        self.started_at = time.time()
        self.telemetry = Telemetry()  # the Prometheus histograms (agents/telemetry.py; /metrics)
        # Users waiting for a rationale (agents/backlog.py) and the share of answers without a current one:
        # load, reported as such, never a drift signal.
        self.backlog = RationaleBacklog(settings.worker.rationale_backlog_max)
        self.stale = StaleShare(window=settings.drift.window_events)
        self._store_pool = ThreadPoolExecutor(1, thread_name_prefix="qdrant")
        self._encoder_pool = ThreadPoolExecutor(1, thread_name_prefix="encoder")
        # The student is the slow path: its threads run at a lower OS priority so a generation never starves the
        # event loop (on a small box the fast path shares its cores with the model). Threads llama.cpp spawns from
        # them inherit it.
        nice = (settings.student.nice,)
        self._student_pool = ThreadPoolExecutor(settings.student.concurrency, thread_name_prefix="student",
                                                initializer=lower_thread_priority, initargs=nice)
        self._loader_pool = ThreadPoolExecutor(1, thread_name_prefix="student-loader",
                                               initializer=lower_thread_priority, initargs=nice)
        self.store: VectorStore | None = None
        self.rankers = RankerSlot(settings, self.metrics, self.in_store)  # the trained ranker (agents/ranker_slot.py)
        self.encoder: TextEncoder | None = None
        self.student: StudentBackend | None = None
        self.registry = ModelRegistry.for_settings(settings)
        self.student_version: str | None = None  # registry version being served; None: the base student
        self.swap_in_progress: str | None = None  # model version being loaded
        self.last_swap: dict[str, Any] | None = None
        self._swap_lock = asyncio.Lock()
        # Set once the store / the models are loaded; the agents wait on them before their first event.
        self.store_ready = asyncio.Event()
        self.models_ready = asyncio.Event()
        self.drift = DriftMonitor.from_settings(settings)
        # "file" (the version's drift_reference.json), "lazy" (genre mix of the first window of events),
        # "pending" (that window is still filling); "+lazy-genres": a file without a genre mix, completed lazily.
        self.drift_reference_source = "pending"
        # The rationale centroid's: "file", "lazy" (the first drift_min_events rationales the serving student
        # wrote) or "pending" (still collecting them).
        self.rationale_reference_source = "pending"
        self.drift_last_published: float | None = None  # monotonic time of the last published decision
        self.drift_last_decision: dict[str, Any] | None = None
        self._genres: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        # The pull API's newest recommendation per user and feedback attribution (agents/feedback.py); the
        # items of this worker's recent events, the fallback for a user nobody knows yet.
        self.recent = RecentRecommendations(settings.api.cache_users, settings.api.recent_recommendations)
        self.attribution = Attribution()
        self.trending = Trending()
        self.preference_users = 0  # users with a preference in the store (counted at start, kept by the API)
        self.student_b: StudentBackend | None = None  # A/B: arm b's pinned student (settings.ab.student_b)
        self.arms = ArmCounts()

    # -- start-up -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the store and load the encoder and student, each in its own pool, concurrently."""
        from models.encoder import load_encoder

        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        encoder_f = loop.run_in_executor(self._encoder_pool, load_encoder, self.settings)
        student_f = loop.run_in_executor(self._student_pool, self._load_student)
        self.encoder = await encoder_f
        self.store = await self.in_store(self._open_store, bulk=True)  # may index the whole catalogue
        # Preferences cost one store lookup per answered batch, only once any user has set one.
        self.preference_users = await self.in_store(self.store.count_preferences)
        # The trained ranker before the first answer: the fast path waits for store_ready only.
        await self.rankers.start(self.store)
        self.store_ready.set()
        log.info("vector store ready (%.1fs)", time.monotonic() - t0)
        version, self.student, reference = await student_f
        self.student_version = version
        self._set_drift_reference(reference, clear=False)
        ab = self.settings.ab
        if ab.enabled and ab.student_b is not None:
            # Arm b's student, pinned for the experiment (promotions move arm a only). A version that does not
            # load stops the worker: an experiment that silently serves one arm would measure nothing.
            pinned = None if ab.student_b == "base" else ab.student_b
            self.student_b, _ = await loop.run_in_executor(self._loader_pool, self._load_version, pinned)
            log.info("A/B: arm b's student %s (share %.2f, salt %r)", self.student_b.model_version, ab.share_b, ab.salt)
        self.models_ready.set()
        log.info("student %s ready (%.1fs); drift reference: %s", self.student.model_version,
                 time.monotonic() - t0, self.drift_reference_source)

    def _load_student(self) -> tuple[str | None, "StudentBackend", DriftReference | None]:
        """The registry's CURRENT version (the base student when none was promoted), its drift reference."""
        version = self.registry.current()
        return (version, *self._load_version(version))

    def _load_version(self, version: str | None) -> tuple["StudentBackend", DriftReference | None]:
        """Blocking: build the student for a registry version (``None``: the base one) and read its drift
        reference if it has one."""
        from models.student_factory import load_student

        if version is None:
            student = load_student(self.settings)
        else:
            if not self.registry.exists(version):
                raise KeyError(f"no model version {version!r} in {self.registry.root}")
            student = load_student(self.settings, adapter_dir=self.registry.adapter_dir(version))
        expected = self.registry.model_version(version, self.settings)
        if student.model_version != expected:
            raise ValueError(f"loaded student reports {student.model_version!r}, expected {expected!r}")
        return student, read_drift_reference(self.registry, version)

    # -- preferences ----------------------------------------------------------------------------------------
    async def store_preference(self, user_id: str, vector: np.ndarray, text: str) -> None:
        assert self.store is not None
        self.preference_users += int(await self.in_store(self.store.upsert_preference, user_id, vector, text))

    async def drop_preference(self, user_id: str) -> bool:
        """Delete the user's preference (if any); whether there was one."""
        assert self.store is not None
        dropped = await self.in_store(self.store.delete_preference, user_id)
        self.preference_users = max(0, self.preference_users - int(dropped))
        return dropped

    # -- A/B ------------------------------------------------------------------------------------------------
    def arm(self, user_id: str) -> str | None:
        """The user's arm (streams/ab.py), None when no experiment runs."""
        ab = self.settings.ab
        return arm_of(user_id, ab.salt, ab.share_b) if ab.enabled else None

    def student_for(self, arm: str | None) -> StudentBackend | None:
        return self.student_b if arm == "b" and self.student_b is not None else self.student

    # -- hot swap ------------------------------------------------------------------------------------------
    @property
    def model_version(self) -> str | None:
        return self.student.model_version if self.student is not None else None

    async def swap_ranker(self, version: str | None, *, reason: str = "") -> SwapResult:
        """Serve ranker ``version`` (None: the text ranker) from now on (:meth:`RankerSlot.swap`)."""
        await self.store_ready.wait()
        assert self.store is not None
        return await self.rankers.swap(version, self.store, reason=reason)

    async def swap_student(self, version: str | None, *, reason: str = "") -> SwapResult:
        """Serve registry ``version`` (``None``: the base student) from now on, without blocking the loop.

        Idempotent: asking for the version already served is a no-op. Swaps are serialised. A failed load
        keeps the current student (logged, counted in ``model_swap_failures``).
        """
        await self.models_ready.wait()
        async with self._swap_lock:
            if version == self.student_version:
                self.metrics["model_updates_noop"] += 1
                log.info("model update for %s: already serving it", self.model_version)
                return "noop"
            target = self.registry.model_version(version, self.settings)
            old = self.model_version
            self.swap_in_progress = target
            started = time.time()
            log.info("hot swap %s -> %s (%s): loading", old, target, reason or "no reason given")
            try:
                student, reference = await asyncio.get_running_loop().run_in_executor(
                    self._loader_pool, self._load_version, version)
            except Exception as exc:
                self.metrics["model_swap_failures"] += 1
                log.exception("hot swap to %s failed; still serving %s", target, old)
                self.last_swap = {"from": old, "to": target, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                                  "started_at": started, "finished_at": time.time(), "reason": reason}
                return "failed"
            finally:
                self.swap_in_progress = None
            # One assignment on the loop: batches already running keep the old object (and report its version).
            self.student, self.student_version = student, version
            self.metrics["model_swaps"] += 1
            self._set_drift_reference(reference, clear=True)
            finished = time.time()
            self.last_swap = {"from": old, "to": target, "ok": True, "started_at": started, "finished_at": finished,
                              "load_s": round(finished - started, 3), "reason": reason}
            log.info("hot swap done: serving %s (loaded in %.1fs); drift reference: %s", target,
                     finished - started, self.drift_reference_source)
            return "swapped"

    # -- drift ---------------------------------------------------------------------------------------------
    def _set_drift_reference(self, reference: DriftReference | None, *, clear: bool) -> None:
        """Measure drift against the serving version's reference file; without one, carry over the genre mix
        the monitor already has (the stream's, not the student's) and judge the new version afresh."""
        if reference is not None:
            self.drift_reference_source = "file"
        else:
            reference = DriftReference(model_version=self.model_version, genres=self.drift.reference.genres)
            self.drift_reference_source = "lazy" if reference.genres is not None else "pending"
        n, least = reference.rationale_samples, self.settings.drift.min_events
        if reference.rationale_centroid is not None and (n is None or n >= least):
            self.rationale_reference_source = "file"  # n None: a file from before the count was written
        else:
            # A centroid of a few held-out users' rationales is mostly those users: against it the live
            # centroid of many users stays "far" after a good promotion and would keep waking the retrain job.
            # A reference must rest on as many rationales as a decision does, so take the new student's first
            # drift_min_events rationales instead (see _observe_rationale).
            if reference.rationale_centroid is not None:
                log.info("drift: the version's rationale centroid averages %d rationales (< drift_min_events %d):"
                         " taking the reference from the first %d this student writes", n, least, least)
                reference = reference.model_copy(update={"rationale_centroid": None, "rationale_samples": None})
            self.rationale_reference_source = "pending"
        self.drift.reset_reference(reference, clear=clear)

    def drift_failed(self, what: str) -> None:
        # Monitoring must never stop the stream (e.g. a reference file whose centroid has another dimension).
        self.metrics["drift_errors"] += 1
        if self.metrics["drift_errors"] <= 3:
            log.exception("drift monitor: %s failed (counted in drift_errors; the stream goes on)", what)

    def observe_recommendation(self, rec: Recommendation) -> None:
        """One recommendation sent: the pull API's newest, attribution's impression, the drift judge's."""
        self.recent.add(rec)
        self.attribution.impression(rec)
        if rec.arm is not None:
            self.arms.add(rec.arm, "impressions")
        self.stale.add(bool(rec.rationale_current))
        try:
            self.drift.on_recommendation(rec)
        except Exception:
            self.drift_failed("on_recommendation")

    def load_snapshot(self) -> dict[str, Any]:
        """How far behind the student is: the rationale backlog, and the share of recent answers that went out
        without a rationale for the user's current window. Load, not drift (see streams/drift.py)."""
        return {
            "rationale_backlog": self.backlog.snapshot(),
            "stale_share": self.stale.share(),
            "stale_samples": len(self.stale),
            "latency_s": {name: _percentiles(values) for name, values in self.latency.items()},
        }

    def observe_rationale(self, vector: np.ndarray) -> None:
        try:
            self._observe_rationale(vector)
        except Exception:
            self.drift_failed("on_rationale")

    def _observe_rationale(self, vector: np.ndarray) -> None:
        self.drift.on_rationale(vector)
        ref, window = self.drift.reference, self.drift.rationales
        if ref.rationale_centroid is None and len(window) >= self.settings.drift.min_events:
            centroid = window.centroid()
            if centroid is None or not float(np.linalg.norm(centroid)) > 0:
                return  # the vectors cancel out: no direction to compare with yet
            self.drift.reset_reference(ref.model_copy(update={
                "rationale_centroid": centroid.tolist(), "rationale_samples": len(window),
                "model_version": ref.model_version or self.model_version,
            }), clear=False)
            self.rationale_reference_source = "lazy"
            log.info("drift: rationale reference taken from the first %d rationales of %s", len(window),
                     self.model_version)

    def drift_snapshot(self) -> dict[str, Any]:
        try:
            snap = self.drift.snapshot()
        except Exception as exc:
            self.drift_failed("snapshot")
            snap = {"error": f"{type(exc).__name__}: {exc}"}
        return {**snap, "reference_source": self.drift_reference_source,
                "rationale_reference_source": self.rationale_reference_source,
                "last_decision": self.drift_last_decision}

    def observe_event(self, user_id: str, item_id: str, genres: Sequence[str],
                      recommendation_id: str | None = None) -> None:
        """Feed one applied interaction to the trending counts, attribution (when it names the recommendation
        it responds to) and the drift monitor; take the lazy genre reference once the first full window is in."""
        self.trending.add(item_id)
        arm = self.arm(user_id)
        against = None
        if recommendation_id is not None:
            sent = self.recent.find(user_id, recommendation_id)
            hit = self.attribution.response(sent, item_id)
            if sent is not None:
                against = (sent.items, sent.judged_version)
                if arm is not None:
                    self.arms.add(arm, "attributed")
                    self.arms.add(arm, "attributed_hits", int(bool(hit)))
        try:
            judged = self._observe_event(user_id, item_id, genres, against)
        except Exception:
            self.drift_failed("on_event")
            return
        if arm is not None and judged is not None:
            self.arms.add(arm, "judged")
            self.arms.add(arm, "hits", int(judged))

    def forget_user(self, user_id: str) -> None:
        """Drop what memory keeps keyed by the user (the stream's part of forgetting, agents/forget.py)."""
        self.backlog.discard([user_id])
        self.drift.forget_user(user_id)
        self.recent.forget(user_id)

    def _observe_event(self, user_id: str, item_id: str, genres: Sequence[str],
                       against: tuple[frozenset[str], str | None] | None = None) -> bool | None:
        judged = self.drift.on_event(user_id, item_id, genres, against)
        if self.drift.reference.genres is None and len(self.drift.genres) >= self.settings.drift.window_events:
            ref = self.drift.reference
            self.drift.reset_reference(ref.model_copy(update={
                "genres": self.drift.genres.snapshot(), "model_version": ref.model_version or self.model_version,
            }), clear=False)
            self.drift_reference_source = "file+lazy-genres" if self.drift_reference_source == "file" else "lazy"
            log.info("drift: genre reference taken from the first %d events", len(self.drift.genres))
        return judged

    async def item_genres_many(self, item_ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Each item's catalogue genres (``()`` if unknown): cached; the misses cost one store lookup, once."""
        out: dict[str, tuple[str, ...]] = {}
        missing = []
        for item_id in dict.fromkeys(item_ids):
            genres = self._genres.get(item_id)
            if genres is None:
                missing.append(item_id)
            else:
                self._genres.move_to_end(item_id)
                out[item_id] = genres
        if missing:
            assert self.store is not None
            meta = await self.in_store(self.store.get_items, missing)
            for item_id in missing:
                genres = tuple(str(g) for g in ((meta.get(item_id) or {}).get("genres") or ()))
                out[item_id] = self._genres[item_id] = genres
            while len(self._genres) > GENRE_CACHE_SIZE:
                self._genres.popitem(last=False)
        return out

    def _open_store(self) -> "VectorStore":
        from streams.datasets import load_items
        from vectorstore.catalogue import index_catalogue
        from vectorstore.store import VectorStore

        assert self.encoder is not None
        store = VectorStore(self.settings)
        store.ensure_collections(self.encoder.dim)
        if store.count(self.settings.qdrant.collection_items) == 0:
            # A worker pointed at an empty Qdrant indexes the configured catalogue itself, so
            # `docker compose up` and a fresh cluster need no separate step.
            log.info("items collection is empty: indexing catalogue %r", self.settings.data.dataset)
            report = index_catalogue(store, self.encoder, load_items(self.settings.data.dataset))
            log.info("indexed %s", report)
        return store

    def close(self) -> None:
        if self.store is not None:
            self._store_pool.submit(self.store.close).result(timeout=30)
        for pool in (self._store_pool, self._encoder_pool, self._student_pool, self._loader_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.rankers.close()

    # -- off-loop calls ------------------------------------------------------------------------------------
    async def in_store(self, fn: Callable[..., T], *args: Any, bulk: bool = False) -> T:
        """``fn(*args)`` in the store's thread, waited on for at most ``qdrant.deadline_s`` (``bulk``: a
        catalogue-sized load, no deadline). On timeout the call goes on in its thread (it cannot be killed)
        and the caller gets :class:`DeadlineExceeded`: its batch is retried later, the loop moves on."""
        fut = asyncio.get_running_loop().run_in_executor(self._store_pool, _timed, self.telemetry.store_call, fn, *args)
        if bulk:
            return await fut
        return await self._within(fut, self.settings.qdrant.deadline_s, "store",
                                  f"vector store call {getattr(fn, '__name__', 'call')}")

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        assert self.encoder is not None
        fut = asyncio.get_running_loop().run_in_executor(self._encoder_pool, _timed, self.telemetry.encoder_call,
                                                         self.encoder.encode, list(texts))
        return await self._within(fut, self.settings.encoder.deadline_s, "encoder",
                                  f"encoder call for {len(texts)} texts")

    async def _within(self, fut: "asyncio.Future[T]", deadline_s: float, name: str, what: str) -> T:
        try:
            return await asyncio.wait_for(fut, timeout=deadline_s)
        except asyncio.TimeoutError:
            self.metrics[f"{name}_deadline_exceeded"] += 1
            raise DeadlineExceeded(f"{what} exceeded {deadline_s}s") from None

    async def generate(self, batch: Sequence[list[dict[str, str]]],
                       student: "StudentBackend | None" = None) -> list[str]:
        """One batched student call with a deadline, on ``student`` (default: the serving one; pass the one
        you will attribute the output to, since a hot swap may replace ``self.student`` meanwhile). The
        thread cannot be killed; on timeout we stop waiting, and the pool's size still bounds how many run."""
        student = student or self.student
        assert student is not None
        fut = asyncio.get_running_loop().run_in_executor(self._student_pool, student.generate, list(batch))
        return await self._within(fut, self.settings.student.deadline_s, "student", f"student batch of {len(batch)}")


def _timed(histogram: Any, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in its pool thread, its duration observed in ``histogram`` (thread-safe)."""
    t0 = time.perf_counter()
    try:
        return fn(*args)
    finally:
        histogram.observe(time.perf_counter() - t0)


def _percentiles(values: "deque[float]") -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.fromiter(values, dtype=np.float64)
    p50, p99 = np.percentile(a, [50, 99])
    return {"n": int(a.size), "p50": round(float(p50), 4), "p99": round(float(p99), 4), "max": round(float(a.max()), 4)}
