"""Drift scenario on ML-1M, end to end: the online hit rate before a taste shift, after it, and after a retrain
promoted a new student, each per model version (issue 4's evidence run).

Everything is the real thing, nothing is mocked: an embedded Tansu broker, a ``slimstream worker`` subprocess
on a fresh run directory (its own data dir, Qdrant local mode and model registry; the worker indexes the
ML-1M catalogue itself), a teacher behind an OpenAI-compatible endpoint, and one retrain cycle
(``retrain.cycle.retrain_once``, in a child process) over the stream's own interactions topic.

1. **before**: a seeded sample of ML-1M users (``--users``) replays the first ``--events-per-user`` events of
   each user's real, time-ordered history, one event per user per round; after each round the script waits
   for every user's fast-path recommendation and (unless ``--no-wait-rationales``) the slow-path one with a
   rationale for that window, so that the next event is judged against a settled top-K.
2. **shift**: the same users' tastes change. Each user's next ``--shift-events`` events are real ML-1M items
   (never in that user's history) at least half of whose genres (``--min-shift-share``) are among the
   ``--genres-per-user`` genres of ``--shift-genres`` that were rarest in that user's history (ties seeded),
   drawn without replacement with probability
   proportional to ML-1M popularity, each with a rating drawn from that item's real ratings; timestamps go on
   from the user's last event at the user's median gap. The worker's drift monitor is read from ``/metrics/``
   after every round and the ``drift-decisions`` topic is consumed throughout.
3. **retrain**: one cycle (drifted users -> teacher rationales -> continue-trained student -> held-out gate ->
   registry). ``--gate-margin`` is the gate's margin (``SLIMSTREAM_RETRAIN_GATE_MARGIN``); the verdict is
   recorded as is. Only ``--force-promote`` promotes a rejected candidate (``slimstream models promote``), and
   the output then says so. A promotion publishes a ModelUpdate and the worker hot-swaps (awaited here).
4. **after**: ``--after-events`` more shifted events per user (new items, same genres).

The online hit rate is the drift monitor's: each event is judged against the top-K last emitted to that user
(fast or slow path), and attributed to the model version of that recommendation's rationale (``(no
rationale)`` before the user had one). The script keeps the same tally from the recommendations topic, per
phase (the worker's windows roll and are reset by a hot swap), and cross-checks it with the worker's own
counts wherever those cover exactly one phase. The drift monitor's settings here: rolling window =
the "before" phase's event count (so its lazy genre reference is exactly the pre-shift mix), one check per
second (the stale-rationale share is load, not a drift signal, and never fires).

Writes ``benchmarks/results/drift_scenario.json`` (``--results``) and prints a table. Worker, teacher,
retrain child and broker are stopped on exit, Ctrl-C and errors (each runs in its own process group).

Smoke run (minutes on 2 busy cores)::

    .venv/bin/python benchmarks/drift_scenario.py --users 4 --events-per-user 6 --shift-events 6 \\
        --after-events 6 --max-new-tokens 32 --retrain-max-steps 2 --retrain-samples 2 \\
        --teacher-max-tokens 96 --retrain-targets 2 --retrain-holdout-events 2

Full-size run (not a smoke: hours on 2 CPU cores; a GPU teacher via ``--teacher-url`` makes it much faster)::

    .venv/bin/python benchmarks/drift_scenario.py --users 32 --events-per-user 20 --shift-events 20 \\
        --after-events 20 --max-new-tokens 64 --retrain-max-steps 20 --retrain-samples 4 --threads 2 \\
        --out /tmp/drift-ml1m   # a fresh directory: logs, registry and Qdrant are kept there

Defaults: llama.cpp student backend (``--backend transformers`` for the other one); the teacher is
``--teacher-url`` if given, else ``slimstream serve-teacher --backend llamacpp`` started here on the embedded
Qwen2.5-Coder-0.5B when ``scripts/install-teacher.sh`` was run, else on the SmolLM2 GGUF (``--teacher``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.events import InteractionEvent  # noqa: E402
from streams.settings import Settings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "drift_scenario.json"
SHIFT_GENRES = ("Horror", "Film-Noir", "Documentary", "Western", "Sci-Fi")
PHASES = ("before", "shift", "after")
STAGES = ("start", "before", "shift", "retrain", "after", "end")  # where a drift decision can arrive
NO_RATIONALE = "(no rationale)"
CACHE_LINKS = ("encoder", "student", "item-vectors")  # content-keyed caches shared with --cache-dir


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# the scenario's events


@dataclass
class UserPlan:
    user_id: str
    before: list[InteractionEvent]
    shift: list[InteractionEvent]
    after: list[InteractionEvent]
    shift_genres: list[str]
    history_events: int
    history_share: dict[str, float]  # share of each candidate shift genre in the user's whole ML-1M history

    def phase(self, name: str) -> list[InteractionEvent]:
        return {"before": self.before, "shift": self.shift, "after": self.after}[name]


def _weighted_sample(rng: random.Random, items: list[str], weights: list[float], k: int) -> list[str]:
    """k distinct items, probability proportional to weight (Efraimidis-Spirakis keys), seeded."""
    keyed = sorted(((rng.random() ** (1.0 / w), it) for it, w in zip(items, weights)), reverse=True)
    return [it for _, it in keyed[:k]]


def build_plans(users: int, before: int, shift: int, after: int, seed: int, genres: tuple[str, ...],
                genres_per_user: int, min_shift_share: float = 0.5) -> list[UserPlan]:
    """Per user: the first ``before`` real events, then ``shift + after`` seeded shifted events: unseen items at
    least ``min_shift_share`` of whose genres are the user's shift genres."""
    from streams.drift import GenreDistribution
    from streams.datasets import load_interactions, load_items, sample_users
    from streams.replay import interaction_to_event

    catalogue = {it.item_id: it for it in load_items("ml-1m")}
    known = {g for it in catalogue.values() for g in it.genres}
    unknown = [g for g in genres if g not in known]
    if unknown:
        raise ValueError(f"--shift-genres: not ML-1M genres: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    inter = load_interactions("ml-1m")
    popularity: Counter[str] = Counter(i.item_id for i in inter)
    ratings: dict[str, list[float]] = defaultdict(list)
    history: dict[str, list[Any]] = defaultdict(list)
    for i in inter:
        if i.rating is not None:
            ratings[i.item_id].append(i.rating)
        history[i.user_id].append(i)
    chosen = list(dict.fromkeys(i.user_id for i in sample_users(inter, users, seed, min_events=before)))
    plans = []
    for user in sorted(chosen):
        rng = random.Random(f"{seed}:{user}")
        hist = sorted(history[user], key=lambda i: i.timestamp)
        seen = {i.item_id for i in hist}
        dist = GenreDistribution(window=None)
        for i in hist:
            dist.add(catalogue[i.item_id].genres if i.item_id in catalogue else ())
        share = dist.proportions()
        ranked = sorted(genres, key=lambda g: (share.get(g, 0.0), rng.random()))
        picked = ranked[:genres_per_user]
        pool = sorted(it for it, meta in catalogue.items() if it not in seen and meta.genres
                      and len(set(meta.genres) & set(picked)) >= min_shift_share * len(set(meta.genres)))
        n = shift + after
        if len(pool) < n:
            raise ValueError(f"{user}: only {len(pool)} unseen items in {picked} for {n} shifted events")
        items = _weighted_sample(rng, pool, [popularity[it] + 1.0 for it in pool], n)
        first = hist[:before]
        gaps = [b.timestamp - a.timestamp for a, b in zip(first, first[1:]) if b.timestamp > a.timestamp]
        gap = float(round(min(86_400.0, max(1.0, statistics.median(gaps))))) if gaps else 60.0
        t0 = first[-1].timestamp
        shifted = [interaction_to_event(user, it, rng.choice(ratings[it]) if ratings[it] else 4.0, t0 + gap * (k + 1))
                   for k, it in enumerate(items)]
        plans.append(UserPlan(
            user_id=user,
            before=[interaction_to_event(user, i.item_id, i.rating, i.timestamp) for i in first],
            shift=shifted[:shift], after=shifted[shift:], shift_genres=picked, history_events=len(hist),
            history_share={g: round(share.get(g, 0.0), 4) for g in genres}))
    return plans


# ---------------------------------------------------------------------------------------------------------
# statistics


def wilson(hits: int, n: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """95% Wilson score interval of a proportion (sensible at 0 hits and small n)."""
    if n == 0:
        return None, None
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_block(hits: int, judged: int) -> dict[str, Any]:
    lo, hi = wilson(hits, judged)
    return {"judged": judged, "hits": hits, "hit_rate": hits / judged if judged else None,
            "ci95": [lo, hi] if judged else None}


# ---------------------------------------------------------------------------------------------------------
# processes


def http_json(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except Exception:
        return False


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


class Children:
    """Every subprocess started here (each in its own process group), stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []

    def start(self, name: str, argv: list[str], *, env: dict[str, str], cwd: Path, log: Path,
              stop_timeout: float = 30.0, stdout_to_log: bool = True) -> subprocess.Popen[bytes]:
        out = open(log, "ab")
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out if stdout_to_log else None,
                                stderr=out, start_new_session=True)
        out.close()
        self.procs.append((name, proc, stop_timeout))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for entry in list(self.procs):
            if entry[1] is proc:
                stop_process(proc, entry[2])
                self.procs.remove(entry)

    def stop_all(self) -> None:
        while self.procs:
            name, proc, timeout = self.procs.pop()
            if proc.poll() is None:
                say(f"stopping {name} (pid {proc.pid})")
            stop_process(proc, timeout)


def teacher_source(choice: str, cache_dir: Path) -> tuple[list[str], str, str]:
    """(serve-teacher arguments, served model name, description) for --teacher."""
    from models.teacher_weights import VARIANTS

    if choice == "auto":
        assembled = cache_dir / "teacher" / VARIANTS["0.5b"].file_name
        try:
            from importlib import metadata

            metadata.distribution(VARIANTS["0.5b"].distribution(1))
            installed = True
        except Exception:
            installed = False
        choice = "0.5b" if assembled.is_file() or installed else "smollm2"
    if choice in VARIANTS:
        w = VARIANTS[choice]
        return ["--teacher", choice], w.model_id, f"embedded {w.model_id} ({w.file_name})"
    if choice == "smollm2":
        from models.student_base import student_gguf_path

        gguf = student_gguf_path(Settings.from_env())
        return ["--gguf", str(gguf)], gguf.stem, f"SmolLM2 GGUF {gguf.name} (the student's base; a weak teacher)"
    gguf = Path(choice)
    if not gguf.is_file():
        raise ValueError(f"--teacher: {choice!r} is not 0.5b, 1.5b, smollm2, auto or a GGUF file")
    return ["--gguf", str(gguf.resolve())], gguf.stem, f"GGUF {gguf}"


# ---------------------------------------------------------------------------------------------------------
# the run


@dataclass
class Judgement:
    phase: str
    round: int
    user: str
    item: str
    hit: bool
    version: str
    path: str
    settled: bool  # the previous round's recommendations had all arrived when the event was sent


@dataclass
class PhaseLog:
    name: str
    rounds: int = 0
    events: int = 0
    rounds_timed_out: int = 0
    round_wait_s: list[float] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    wall_s: float = 0.0
    worker_start: dict[str, Any] | None = None
    worker_end: dict[str, Any] | None = None


class Scenario:
    def __init__(self, args: argparse.Namespace, plans: list[UserPlan], settings: Any, worker_url: str,
                 worker: subprocess.Popen[bytes], worker_log: Path) -> None:
        self.args, self.plans, self.settings = args, plans, settings
        self.worker_url, self.worker, self.worker_log = worker_url, worker, worker_log
        self.recs: dict[str, list[Any]] = defaultdict(list)
        self.fast_seen: dict[str, int] = defaultdict(int)  # user -> newest fast-path window version seen
        self.slow_seen: dict[str, int] = defaultdict(int)  # user -> newest rationale window version seen
        self.sent: dict[str, int] = defaultdict(int)
        self.changed = asyncio.Event()
        self.judgements: list[Judgement] = []
        self.decisions: list[dict[str, Any]] = []
        self.timeline: list[dict[str, Any]] = []
        self.phases: dict[str, PhaseLog] = {}
        self.where = ("start", 0)
        self.round_settled = True

    # -- consumers --------------------------------------------------------------------------------------
    async def consume_recommendations(self, consumer: Any) -> None:
        from streams.events import Recommendation

        async for msg in consumer:
            rec = Recommendation.model_validate_json(msg.value)
            self.recs[rec.user_id].append(rec)
            if rec.path.value == "fast":
                self.fast_seen[rec.user_id] = max(self.fast_seen[rec.user_id], rec.window_version)
            elif rec.rationale_window_version is not None:
                self.slow_seen[rec.user_id] = max(self.slow_seen[rec.user_id], rec.rationale_window_version)
            self.changed.set()

    async def consume_decisions(self, consumer: Any) -> None:
        async for msg in consumer:
            try:
                decision = json.loads(msg.value)
            except ValueError:
                continue
            for_phase = self.where
            self.decisions.append({"phase": for_phase[0], "round": for_phase[1], "received_at": time.time(),
                                   "worker": msg.key.decode() if msg.key else None, "decision": decision})
            fired = ", ".join(f"{f['signal']} {f['value']:.3f} > {f['threshold']:g}" for f in decision.get("fired", []))
            say(f"drift decision ({for_phase[0]}, round {for_phase[1]}): {fired}")

    # -- worker views -----------------------------------------------------------------------------------
    async def metrics(self) -> dict[str, Any]:
        return await asyncio.to_thread(http_json, f"{self.worker_url}/metrics/")

    def check_worker(self) -> None:
        if self.worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {self.worker.returncode}:\n{log_tail(self.worker_log)}")

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check_worker()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=min(1.0, left))
            except asyncio.TimeoutError:
                pass
        return True

    # -- a phase ----------------------------------------------------------------------------------------
    def judge(self, phase: str, rnd: int, ev: InteractionEvent) -> None:
        """What the worker's drift monitor will do with this event: judge it against the user's last top-K."""
        recs = self.recs.get(ev.user_id)
        if not recs:
            return
        last = recs[-1]
        self.judgements.append(Judgement(
            phase=phase, round=rnd, user=ev.user_id, item=ev.item_id,
            hit=ev.item_id in {i.item_id for i in last.items}, version=last.rationale_model_version or NO_RATIONALE,
            path=last.path.value, settled=self.round_settled))

    async def run_phase(self, name: str, producer: Any) -> PhaseLog:
        from streams.replay import publish

        log = self.phases[name] = PhaseLog(name)
        log.worker_start = await self.metrics()
        log.started = time.time()
        t0 = time.monotonic()
        rounds = max(len(p.phase(name)) for p in self.plans)
        for r in range(rounds):
            self.where = (name, r + 1)
            batch = [p.phase(name)[r] for p in self.plans if r < len(p.phase(name))]
            for ev in batch:
                self.judge(name, r + 1, ev)
            await publish(producer, self.settings.kafka.topic_interactions, batch, self.args.rate)
            for ev in batch:
                self.sent[ev.user_id] += 1
            users = [ev.user_id for ev in batch]

            def arrived() -> bool:
                return all(self.fast_seen[u] >= self.sent[u] and
                           (not self.args.wait_rationales or self.slow_seen[u] >= self.sent[u]) for u in users)

            w0 = time.monotonic()
            ok = await self.wait_for(arrived, self.args.round_timeout)
            log.round_wait_s.append(time.monotonic() - w0)
            self.round_settled = ok
            log.rounds += 1
            log.events += len(batch)
            if not ok:
                log.rounds_timed_out += 1
                say(f"  {name} round {r + 1}: not every recommendation arrived within {self.args.round_timeout:g}s")
            m = await self.metrics()
            d = m.get("drift", {})
            self.timeline.append({"phase": name, "round": r + 1, "t": round(time.time(), 3),
                                  "events_seen": d.get("events_seen"), "signals": d.get("signals"),
                                  "reference_source": d.get("reference_source"),
                                  "rationale_reference_source": d.get("rationale_reference_source"),
                                  "student_model_version": m.get("student_model_version"),
                                  "drift_decisions_published": m.get("drift_decisions_published", 0)})
            sig = d.get("signals") or {}
            js = sig.get("genre_js")
            say(f"  {name} round {r + 1}/{rounds}: {len(batch)} events, waited {log.round_wait_s[-1]:.1f}s; "
                f"genre JS {'n/a' if js is None else f'{js:.3f}'}, "
                f"{m.get('drift_decisions_published', 0)} drift decision(s) published")
        # give the drift timer a couple of checks on the phase's final state
        await asyncio.sleep(2 * self.settings.drift.check_every_s + 0.5)
        log.wall_s = time.monotonic() - t0
        log.ended = time.time()
        log.worker_end = await self.metrics()
        return log


# ---------------------------------------------------------------------------------------------------------
# the retrain child (a separate process: training cannot be interrupted inside a thread, a process can)


def retrain_child(spec_path: str) -> None:
    from retrain.cycle import default_publisher, retrain_once
    from streams.drift import DriftDecision
    from streams.registry import ModelRegistry


    spec = json.loads(Path(spec_path).read_text())
    settings = Settings.from_env()
    registry = ModelRegistry.for_settings(settings)
    reason = DriftDecision.model_validate(spec["drift_reason"]) if spec.get("drift_reason") else None
    result = retrain_once(settings, registry=registry, drift_reason=reason,
                          publish=default_publisher(settings, registry), max_users=spec.get("max_users"),
                          progress=lambda m: print(f"{time.strftime('%H:%M:%S')}   [retrain] {m}", flush=True))
    Path(spec["result"]).write_text(result.model_dump_json(indent=2))


async def wait_process(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still running after {timeout:.0f}s")
        await asyncio.sleep(1.0)
    return proc.returncode


# ---------------------------------------------------------------------------------------------------------
# orchestration


def scenario_env(args: argparse.Namespace, run_dir: Path, data_dir: Path, broker: EmbeddedBroker,
                 n_before: int, web_port: int) -> dict[str, str]:
    """One environment for the worker, the retrain child and the CLI: stray SLIMSTREAM_* settings removed."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLIMSTREAM_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL", "QDRANT_PATH",
                                                             "QDRANT_API_KEY")}
    drift_window = args.drift_window or n_before
    env.update({
        "PYTHONUNBUFFERED": "1",
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "QDRANT_PATH": str(run_dir / "qdrant"),
        "SLIMSTREAM_DATA_DIR": str(data_dir),
        "SLIMSTREAM_REGISTRY_DIR": str(run_dir / "registry"),
        "SLIMSTREAM_DATASET": "ml-1m",
        "SLIMSTREAM_WEB_PORT": str(web_port),
        "SLIMSTREAM_STUDENT_BACKEND": args.backend,
        "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "SLIMSTREAM_STUDENT_THREADS": str(args.threads),
        "SLIMSTREAM_STUDENT_BATCH_WAIT_S": "0.3",
        "SLIMSTREAM_DRIFT_WINDOW_EVENTS": str(drift_window),
        "SLIMSTREAM_DRIFT_MIN_EVENTS": str(args.drift_min_events or max(5, drift_window // 4)),
        "SLIMSTREAM_DRIFT_CHECK_EVERY_S": "1",
        "SLIMSTREAM_DRIFT_COOLDOWN_S": str(args.drift_cooldown),
        "SLIMSTREAM_RETRAIN_GATE_MARGIN": str(args.gate_margin),
        "SLIMSTREAM_RETRAIN_MAX_STEPS": str(args.retrain_max_steps),
        "SLIMSTREAM_RETRAIN_SAMPLES": str(args.retrain_samples),
        "SLIMSTREAM_RETRAIN_TARGETS": str(args.retrain_targets),
        "SLIMSTREAM_RETRAIN_HOLDOUT_EVENTS": str(args.retrain_holdout_events),
        "SLIMSTREAM_RETRAIN_WINDOW_SIZE": str(args.retrain_window),
        "SLIMSTREAM_RETRAIN_TEACHER_MAX_TOKENS": str(args.teacher_max_tokens),
        "SLIMSTREAM_RETRAIN_SEED": str(args.seed),
        "SLIMSTREAM_TEACHER_TIMEOUT_S": "600",
        "SLIMSTREAM_TEACHER_MAX_CONCURRENCY": "2",
    })
    return env


def worker_counts(snapshot: dict[str, Any] | None) -> dict[str, tuple[int, int]]:
    """(hits, judged) of the worker's hit-rate windows: overall under ``None``'s key ``"*"``, then per version."""
    hr = ((snapshot or {}).get("drift") or {}).get("hit_rate") or {}
    out = {"*": (int(hr.get("overall", {}).get("hits", 0)), int(hr.get("overall", {}).get("judged", 0)))}
    for v, c in (hr.get("by_version") or {}).items():
        out[v] = (int(c["hits"]), int(c["judged"]))
    return out


def summarise_phase(sc: Scenario, log: PhaseLog) -> dict[str, Any]:
    js = [j for j in sc.judgements if j.phase == log.name]
    by_version: dict[str, list[Judgement]] = defaultdict(list)
    for j in js:
        by_version[j.version].append(j)
    client = {"all": rate_block(sum(j.hit for j in js), len(js)),
              "by_version": {v: rate_block(sum(j.hit for j in g), len(g)) for v, g in by_version.items()}}
    # The worker's own counts cover this phase exactly when its windows neither rolled nor were reset within it.
    start, end = worker_counts(log.worker_start), worker_counts(log.worker_end)
    swapped = (log.worker_end or {}).get("model_swaps", 0) != (log.worker_start or {}).get("model_swaps", 0)
    delta = {v: (end[v][0] - start.get(v, (0, 0))[0], end[v][1] - start.get(v, (0, 0))[1]) for v in end}
    exact = not swapped and delta["*"][1] == len(js)
    worker = {"exact": exact, "window_at_end": {v: {"hits": h, "judged": n} for v, (h, n) in end.items()}}
    if exact:
        worker["phase"] = {v: {"hits": h, "judged": n} for v, (h, n) in delta.items() if n}
        mine = {v: (b["hits"], b["judged"]) for v, b in client["by_version"].items() if v != NO_RATIONALE}
        theirs = {v: hn for v, hn in delta.items() if v != "*" and hn[1]}
        worker["agrees_with_tally"] = delta["*"] == (client["all"]["hits"], client["all"]["judged"]) and mine == theirs
    drift = (log.worker_end or {}).get("drift") or {}
    in_phase = [r for recs in sc.recs.values() for r in recs if log.started <= r.produced_at <= log.ended]
    return {
        "events_sent": log.events, "rounds": log.rounds, "rounds_timed_out": log.rounds_timed_out,
        "unsettled_judgements": sum(not j.settled for j in js),
        "wall_s": round(log.wall_s, 1), "round_wait_s": {
            "mean": round(statistics.mean(log.round_wait_s), 2) if log.round_wait_s else None,
            "max": round(max(log.round_wait_s), 2) if log.round_wait_s else None},
        "hit_rate": client,
        "worker_hit_rate": worker,
        "drift_at_end": {k: drift.get(k) for k in ("events_seen", "model_version", "reference_source",
                                                    "rationale_reference_source", "signals", "samples",
                                                    "last_decision")},
        "student_model_version_at_end": (log.worker_end or {}).get("student_model_version"),
        "recommendations": {"fast": sum(r.path.value == "fast" for r in in_phase),
                            "slow": sum(r.path.value == "slow" for r in in_phase),
                            "slow_by_version": dict(Counter(r.rationale_model_version for r in in_phase
                                                            if r.path.value == "slow"))},
    }


def manifest_summary(registry_dir: Path, version: str | None) -> dict[str, Any] | None:
    if not version:
        return None
    path = registry_dir / version / "manifest.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    ev = m.get("evaluation") or {}
    rt = m.get("retrain") or {}
    return {"version": version, "parent_version": m.get("parent_version"), "gate": m.get("gate"),
            "metrics": {"candidate": ev.get("candidate"), "current": ev.get("current"),
                        "current_version": ev.get("current_version"), "training": m.get("metrics")},
            "held_out_users": ev.get("held_out_users"), "train_users": rt.get("train_users"),
            "new_records": rt.get("new_records"), "replay_records": rt.get("replay_records"),
            "drift_scores": rt.get("drift_scores"), "reference": rt.get("reference"), "teacher": rt.get("teacher"),
            "data_window": m.get("data_window"), "drift_reason": m.get("drift_reason"),
            "examples": ev.get("examples"), "created_at": m.get("created_at")}


async def run_scenario(args: argparse.Namespace, plans: list[UserPlan], env: dict[str, str], run_dir: Path,
                       children: Children, out: dict[str, Any]) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.replay import start_producer


    settings = Settings.from_env()  # from os.environ, which main() set to ``env``
    logs = run_dir / "logs"
    timings = out["timings"]

    # the worker
    t = time.monotonic()
    worker_log = logs / "worker.log"
    worker = children.start("worker", [sys.executable, "-m", "cli", "worker"], env=env, cwd=run_dir,
                            log=worker_log, stop_timeout=30)
    url = f"http://127.0.0.1:{env['SLIMSTREAM_WEB_PORT']}"
    say(f"worker started (pid {worker.pid}, log {worker_log}); waiting until it is ready (first start indexes the "
        "ML-1M catalogue)")
    deadline = time.monotonic() + args.start_timeout
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with code {worker.returncode}:\n{log_tail(worker_log)}")
        try:
            h = http_json(f"{url}/healthz/")
            if h["models_ready"] and h["recovery_completed"] and h["assigned_partitions"] > 0:
                break
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"worker not ready after {args.start_timeout}s:\n{log_tail(worker_log)}")
        await asyncio.sleep(1.0)
    timings["worker_ready_s"] = round(time.monotonic() - t, 1)
    say(f"worker ready in {timings['worker_ready_s']}s, serving {h['model_version']}")
    out["base_model_version"] = h["model_version"]

    sc = Scenario(args, plans, settings, url, worker, worker_log)
    recs_c = AIOKafkaConsumer(settings.kafka.topic_recommendations, bootstrap_servers=settings.kafka.bootstrap_servers,
                              group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    drift_c = AIOKafkaConsumer(settings.kafka.topic_drift, bootstrap_servers=settings.kafka.bootstrap_servers,
                               group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
    await recs_c.start()
    await drift_c.start()
    producer = await start_producer(settings)
    tasks = [asyncio.create_task(sc.consume_recommendations(recs_c)), asyncio.create_task(sc.consume_decisions(drift_c))]
    try:
        for name in ("before", "shift"):
            say(f"phase {name}: {sum(len(p.phase(name)) for p in plans)} events from {len(plans)} users")
            await sc.run_phase(name, producer)
            out["phases"][name] = summarise_phase(sc, sc.phases[name])

        # retrain ------------------------------------------------------------------------------------------
        sc.where = ("retrain", 0)
        reason = sc.decisions[-1]["decision"] if sc.decisions else None
        spec = {"drift_reason": reason, "result": str(run_dir / "retrain_result.json"),
                "max_users": args.retrain_max_users or len(plans)}
        (run_dir / "retrain_spec.json").write_text(json.dumps(spec, indent=2))
        say(f"retrain: one cycle over the interactions topic (reason: "
            f"{'the last drift decision' if reason else 'scheduled: no drift decision fired'}; gate margin "
            f"{args.gate_margin:g}); log {logs / 'retrain.log'}")
        t = time.monotonic()
        child = children.start("retrain", [sys.executable, str(Path(__file__).resolve()), "--retrain-child",
                                           str(run_dir / "retrain_spec.json")],
                               env=env, cwd=run_dir, log=logs / "retrain.log", stop_timeout=10, stdout_to_log=False)
        code = await wait_process(child, args.retrain_timeout, "the retrain cycle")
        children.stop(child)
        timings["retrain_s"] = round(time.monotonic() - t, 1)
        if code != 0:
            raise RuntimeError(f"retrain cycle failed with code {code}:\n{log_tail(logs / 'retrain.log')}")
        result = json.loads((run_dir / "retrain_result.json").read_text())
        registry_dir = Path(env["SLIMSTREAM_REGISTRY_DIR"])
        retrain: dict[str, Any] = {
            "status": result["status"], "reason": result["reason"], "version": result.get("version"),
            "parent_version": result.get("parent_version"), "gate": result.get("gate"),
            "candidate_metrics": result.get("candidate_metrics"), "current_metrics": result.get("current_metrics"),
            "published": result.get("published"), "publish_error": result.get("publish_error"),
            "triggered_by": "drift decision" if reason else "scheduled (no drift decision had fired)",
            "wall_s": result.get("wall_s"), "forced_promotion": False,
            "manifest": manifest_summary(registry_dir, result.get("version"))}
        out["retrain"] = retrain
        say(f"retrain: {retrain['status']} {retrain['version'] or ''} in {timings['retrain_s']}s: {retrain['reason']}")
        promoted = result["status"] == "promoted"
        if result["status"] == "rejected" and args.force_promote:
            say(f"--force-promote: promoting {result['version']} although the gate rejected it")
            proc = await asyncio.to_thread(
                subprocess.run, [sys.executable, "-m", "cli", "models", "promote", result["version"],
                                 "--reason", f"drift_scenario --force-promote (gate: {result['reason']})"],
                cwd=run_dir, env=env, capture_output=True, text=True, timeout=120, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"models promote failed: {proc.stderr.strip()}")
            retrain["forced_promotion"] = True
            promoted = True

        # the hot swap ---------------------------------------------------------------------------------------
        if promoted:
            expected = f"{out['base_model_version']}+{result['version']}"
            t = time.monotonic()
            say(f"waiting for the worker to hot-swap to {expected}")
            while True:
                sc.check_worker()
                m = await sc.metrics()
                if m.get("student_model_version") == expected:
                    break
                if m.get("model_swap_failures", 0):
                    raise RuntimeError(f"hot swap failed: {m.get('last_model_swap')}")
                if time.monotonic() - t > args.swap_timeout:
                    raise TimeoutError(f"no hot swap to {expected} after {args.swap_timeout}s")
                await asyncio.sleep(1.0)
            timings["swap_wait_s"] = round(time.monotonic() - t, 1)
            out["swap"] = {"to": expected, "last_model_swap": m.get("last_model_swap"),
                           "model_swaps": m.get("model_swaps")}
            say(f"swapped: {m.get('last_model_swap')}")
        else:
            out["swap"] = None
            say("no promotion: the 'after' phase runs on the same student")

        say(f"phase after: {sum(len(p.after) for p in plans)} events from {len(plans)} users")
        await sc.run_phase("after", producer)
        out["phases"]["after"] = summarise_phase(sc, sc.phases["after"])
        sc.where = ("end", 0)
        final = await sc.metrics()
        out["worker_metrics_final"] = final
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await producer.stop()
        await recs_c.stop()
        await drift_c.stop()
        out["drift"]["decisions"] = sc.decisions
        out["drift"]["timeline"] = sc.timeline
        out["judgements"] = [j.__dict__ for j in sc.judgements]
        out["timings"]["phases_s"] = {n: round(p.wall_s, 1) for n, p in sc.phases.items()}


# ---------------------------------------------------------------------------------------------------------
# the table


def fmt_rate(b: dict[str, Any]) -> str:
    if not b["judged"]:
        return f"{0:>6} {0:>5}  {'-':>8}  {'-':>15}"
    lo, hi = b["ci95"]
    return f"{b['judged']:>6} {b['hits']:>5}  {b['hit_rate']:>8.3f}  [{lo:.3f}, {hi:.3f}]"


def print_table(out: dict[str, Any]) -> None:
    print()
    print("online hit rate (each event judged against the top-K last sent to its user; version = that top-K's "
          "rationale author)")
    print(f"{'phase':<7} {'model version':<40} {'judged':>6} {'hits':>5}  {'hit rate':>8}  {'95% CI':>15}  worker")
    for phase in PHASES:
        ph = out["phases"].get(phase)
        if not ph:
            continue
        w = ph["worker_hit_rate"]
        check = ("agrees" if w.get("agrees_with_tally") else "DIFFERS") if w["exact"] else "rolled/reset"
        print(f"{phase:<7} {'all':<40} {fmt_rate(ph['hit_rate']['all'])}  {check}")
        for v, b in sorted(ph["hit_rate"]["by_version"].items()):
            print(f"{'':<7} {v:<40} {fmt_rate(b)}")
    print()
    print("drift monitor at the end of each phase (worker /metrics/)")
    print(f"{'phase':<7} {'reference (genre/rationale)':<28} {'events':>6} {'genre JS':>9} {'genre PSI':>9} {'rationale d':>11} "
          f"{'hit drop':>8}  decisions so far")
    for phase in PHASES:
        ph = out["phases"].get(phase)
        if not ph:
            continue
        d = ph["drift_at_end"]
        s = d.get("signals") or {}

        def f(k: str, width: int) -> str:
            v = s.get(k)
            return f"{'n/a':>{width}}" if v is None else f"{v:>{width}.3f}"

        n_dec = sum(1 for x in out["drift"]["decisions"] if STAGES.index(x["phase"]) <= STAGES.index(phase))
        ref = f"{d.get('reference_source')}/{d.get('rationale_reference_source')}"
        print(f"{phase:<7} {ref:<28} {str(d.get('events_seen')):>6} {f('genre_js', 9)} "
              f"{f('genre_psi', 9)} {f('rationale_distance', 11)} {f('hit_rate_drop', 8)}  {n_dec}")
    first = out["drift"]["decisions"][0] if out["drift"]["decisions"] else None
    if first:
        fired = ", ".join(f"{x['signal']}={x['value']:.3f}>{x['threshold']:g}" for x in first["decision"]["fired"])
        print(f"first drift decision: {first['phase']} round {first['round']}: {fired}")
    else:
        print("no drift decision fired")
    r = out.get("retrain")
    if r:
        print()
        g = r.get("gate") or {}
        cm, cu = r.get("candidate_metrics") or {}, r.get("current_metrics") or {}
        man = r.get("manifest") or {}
        print(f"retrain ({r['triggered_by']}): {r['status']} {r.get('version') or ''} (parent "
              f"{r.get('parent_version') or 'base'}), {out['timings'].get('retrain_s')}s")
        if cm or cu:
            print(f"  held-out ({len(man.get('held_out_users') or [])} users) NDCG@10 candidate "
                  f"{cm.get('ndcg@10', float('nan')):.4f} vs current {cu.get('ndcg@10', float('nan')):.4f}; HR@10 "
                  f"{cm.get('hr@10', float('nan')):.4f} vs {cu.get('hr@10', float('nan')):.4f}; "
                  f"{man.get('new_records')} new + {man.get('replay_records')} replayed records")
        print(f"  gate: {g.get('reason', r['reason'])}" + ("  [FORCED PROMOTION: --force-promote]"
                                                         if r.get("forced_promotion") else ""))
    sw = out.get("swap")
    if sw:
        ls = sw.get("last_model_swap") or {}
        print(f"hot swap: {ls.get('from')} -> {ls.get('to')} (load {ls.get('load_s')}s)")
    t = out["timings"]
    print(f"timings: worker ready {t.get('worker_ready_s')}s, teacher ready {t.get('teacher_ready_s')}s, phases "
          f"{t.get('phases_s')}, retrain {t.get('retrain_s')}s, swap wait {t.get('swap_wait_s')}s, "
          f"total {t.get('total_s')}s")


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--users", type=int, default=8, help="seeded ML-1M users")
    ap.add_argument("--events-per-user", type=int, default=10, help="real events per user before the shift")
    ap.add_argument("--shift-events", type=int, default=10, help="shifted events per user before the retrain")
    ap.add_argument("--after-events", type=int, default=10, help="shifted events per user after the retrain")
    ap.add_argument("--seed", type=int, default=0, help="user sample, shift genres, items, ratings, retrain")
    ap.add_argument("--shift-genres", default=",".join(SHIFT_GENRES), help="candidate genres of the shift")
    ap.add_argument("--genres-per-user", type=int, default=2, help="rarest candidate genres each user shifts to")
    ap.add_argument("--min-shift-share", type=float, default=0.5,
                    help="a shifted item has at least this share of its genres among the user's shift genres")
    ap.add_argument("--rate", type=float, default=20.0, help="events per second within a round")
    ap.add_argument("--no-wait-rationales", dest="wait_rationales", action="store_false",
                    help="wait only for the fast path after each round, not for the rationale")
    ap.add_argument("--round-timeout", type=float, default=300.0, help="seconds to wait for a round's answers")
    ap.add_argument("--backend", choices=["llamacpp", "transformers"], default="llamacpp", help="student backend")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="student rationale length cap")
    ap.add_argument("--threads", type=int, default=1, help="student / training threads")
    ap.add_argument("--teacher-url", help="an OpenAI-compatible endpoint (.../v1); default: start one here")
    ap.add_argument("--teacher-model", help="model name at --teacher-url (default SLIMSTREAM_TEACHER_MODEL's default)")
    ap.add_argument("--teacher", default="auto",
                    help="teacher to serve without --teacher-url: auto, 0.5b, 1.5b, smollm2, or a GGUF path")
    ap.add_argument("--teacher-threads", type=int, help="llama.cpp threads of the teacher (default --threads)")
    ap.add_argument("--teacher-max-tokens", type=int, default=128, help="tokens per teacher rationale")
    ap.add_argument("--gate-margin", type=float, default=0.0,
                    help="promote when candidate NDCG@10 >= current - margin (SLIMSTREAM_RETRAIN_GATE_MARGIN)")
    ap.add_argument("--force-promote", action="store_true", help="promote the candidate even if the gate rejects it")
    ap.add_argument("--retrain-max-steps", type=int, default=20)
    ap.add_argument("--retrain-samples", type=int, default=4, help="teacher samples per window")
    ap.add_argument("--retrain-max-users", type=int, help="drifted users per cycle (default: all --users)")
    ap.add_argument("--retrain-window", type=int,
                    help="window events per retrain prompt (default: min(20, before + shift - targets - held-out))")
    ap.add_argument("--retrain-targets", type=int, default=3)
    ap.add_argument("--retrain-holdout-events", type=int, default=3)
    ap.add_argument("--drift-window", type=int, help="drift monitor rolling window (default: the 'before' events)")
    ap.add_argument("--drift-min-events", type=int, help="events before a decision (default: max(5, window / 4))")
    ap.add_argument("--drift-cooldown", type=float, default=60.0, help="seconds between published decisions")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--retrain-timeout", type=float, default=6 * 3600.0)
    ap.add_argument("--swap-timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, help="run directory, kept (default: a temporary one, removed on success)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--cache-dir", type=Path,
                    help="where the encoder/student/item-vector caches and the assembled teacher live "
                         "(default SLIMSTREAM_DATA_DIR or .slimstream)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--retrain-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.retrain_child:
        return args
    for name in ("users", "events_per_user", "shift_events", "after_events", "genres_per_user", "threads",
                 "max_new_tokens", "retrain_max_steps", "retrain_samples", "retrain_targets",
                 "retrain_holdout_events", "teacher_max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.events_per_user < 2:
        ap.error("--events-per-user must be at least 2 (the first event of a user has nothing to be judged against)")
    if args.users < 2:
        ap.error("--users must be at least 2 (a retrain cycle holds some users out)")
    args.shift_genres = tuple(g.strip() for g in args.shift_genres.split(",") if g.strip())
    if args.genres_per_user > len(args.shift_genres):
        ap.error("--genres-per-user exceeds the number of --shift-genres")
    room = args.events_per_user + args.shift_events - args.retrain_targets - args.retrain_holdout_events
    if args.retrain_window is None:
        args.retrain_window = min(20, room)
    if args.retrain_window < 1 or args.retrain_window > room:
        ap.error(f"a retrain needs window + targets + held-out <= before + shift events per user; at most "
                 f"{room} window events fit (raise --shift-events or lower --retrain-targets/--retrain-holdout-events)")
    args.teacher_threads = args.teacher_threads or args.threads
    return args


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.retrain_child:
        retrain_child(args.retrain_child)
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    started = time.monotonic()
    cache_dir = (args.cache_dir or Path(os.environ.get("SLIMSTREAM_DATA_DIR") or ROOT / ".slimstream")).resolve()
    temp = args.out is None
    if not temp and args.out.exists() and any(args.out.iterdir()):
        # A fresh broker with an old Qdrant would keep the old runs' rationales (newer window versions win).
        raise SystemExit(f"drift_scenario: error: --out {args.out} is not empty; every run needs a fresh directory")
    run_dir = (Path(tempfile.mkdtemp(prefix="slimstream-drift-")) if temp else args.out).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    data_dir = run_dir / "data"
    data_dir.mkdir(exist_ok=True)
    for name in CACHE_LINKS:  # content-keyed caches: the ONNX encoder, the de-quantized student, item vectors
        (cache_dir / name).mkdir(parents=True, exist_ok=True)
        link = data_dir / name
        if not link.exists():
            link.symlink_to(cache_dir / name, target_is_directory=True)

    say(f"building the scenario: {args.users} ML-1M users, {args.events_per_user} + {args.shift_events} + "
        f"{args.after_events} events each, seed {args.seed}")
    plans = build_plans(args.users, args.events_per_user, args.shift_events, args.after_events, args.seed,
                        args.shift_genres, args.genres_per_user, args.min_shift_share)
    if len(plans) < args.users:
        raise SystemExit(f"only {len(plans)} ML-1M users have {args.events_per_user} events")
    for p in plans:
        say(f"  {p.user_id}: {p.history_events} events in ML-1M; shifts to {'+'.join(p.shift_genres)} "
            f"(history share {', '.join(f'{g} {p.history_share[g]:.2f}' for g in p.shift_genres)})")

    out: dict[str, Any] = {
        "scenario": "drift on ML-1M: before shift / after shift / after retrain, online hit rate per model version",
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                       if k not in ("retrain_child",)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "git": git_state(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_dir": str(run_dir),
        "users": [{"user_id": p.user_id, "history_events": p.history_events, "shift_genres": p.shift_genres,
                   "history_share_of_shift_genres": {g: p.history_share[g] for g in p.shift_genres},
                   "before_items": [e.item_id for e in p.before], "shift_items": [e.item_id for e in p.shift],
                   "after_items": [e.item_id for e in p.after]} for p in plans],
        "phases": {}, "drift": {}, "timings": {}, "retrain": None, "swap": None, "completed": False,
    }
    children = Children()
    broker = EmbeddedBroker(log_path=run_dir / "logs" / "tansu.log")
    ok = False
    try:
        broker.start()
        say(f"Tansu broker on {broker.bootstrap_servers}; run directory {run_dir}")
        env = scenario_env(args, run_dir, data_dir, broker, args.users * args.events_per_user, free_port())
        out["parameters"]["drift_window_events"] = int(env["SLIMSTREAM_DRIFT_WINDOW_EVENTS"])
        out["parameters"]["drift_min_events"] = int(env["SLIMSTREAM_DRIFT_MIN_EVENTS"])

        # the teacher
        t = time.monotonic()
        if args.teacher_url:
            env["SLIMSTREAM_TEACHER_URL"] = args.teacher_url
            if args.teacher_model:
                env["SLIMSTREAM_TEACHER_MODEL"] = args.teacher_model
            out["teacher"] = {"url": args.teacher_url, "model": args.teacher_model or "(settings default)",
                              "started_here": False}
        else:
            source, model, what = teacher_source(args.teacher, cache_dir)
            port = free_port()
            teacher_env = {**env, "SLIMSTREAM_DATA_DIR": str(cache_dir)}  # where the assembled teacher lives
            say(f"starting the teacher: {what}, llama.cpp, {args.teacher_threads} thread(s), port {port}")
            teacher = children.start("teacher", [sys.executable, "-m", "cli", "serve-teacher", *source,
                                                 "--backend", "llamacpp", "--port", str(port),
                                                 "--threads", str(args.teacher_threads), "--max-queue", "64",
                                                 "--served-model-name", model, "--log-level", "warning"],
                                     env=teacher_env, cwd=run_dir, log=run_dir / "logs" / "teacher.log", stop_timeout=15)
            while not http_ok(f"http://127.0.0.1:{port}/health"):
                if teacher.poll() is not None:
                    raise RuntimeError(f"teacher exited with code {teacher.returncode}:\n"
                                       f"{log_tail(run_dir / 'logs' / 'teacher.log')}")
                if time.monotonic() - t > args.start_timeout:
                    raise TimeoutError("teacher not ready")
                time.sleep(1.0)
            env["SLIMSTREAM_TEACHER_URL"] = f"http://127.0.0.1:{port}/v1"
            env["SLIMSTREAM_TEACHER_MODEL"] = model
            out["teacher"] = {"url": env["SLIMSTREAM_TEACHER_URL"], "model": model, "source": what,
                              "backend": "llamacpp", "threads": args.teacher_threads, "started_here": True}
            out["timings"]["teacher_ready_s"] = round(time.monotonic() - t, 1)
            say(f"teacher ready in {out['timings']['teacher_ready_s']}s")
        out["parameters"]["teacher_model"] = out["teacher"]["model"]
        out["environment"] = {k: v for k, v in env.items() if k.startswith(("SLIMSTREAM_", "KAFKA_", "QDRANT_"))}
        os.environ.clear()
        os.environ.update(env)
        asyncio.run(run_scenario(args, plans, env, run_dir, children, out))
        ok = True
        out["completed"] = True
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
        out["error"] = "interrupted"
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        say(f"failed: {out['error']}")
        raise
    finally:
        children.stop_all()
        broker.stop()
        out["timings"]["total_s"] = round(time.monotonic() - started, 1)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=2, default=str) + "\n")
        if out["phases"]:
            print_table(out)
        say(f"results: {args.results}" + ("" if ok else " (incomplete)"))
        if temp and ok and not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        else:
            say(f"run directory kept: {run_dir} (logs under logs/)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
