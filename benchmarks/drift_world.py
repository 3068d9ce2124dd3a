"""The drift scenario's world: the users' plans (a genre shift), hit-rate intervals, the child processes, and
the :class:`Scenario` that publishes the phases and judges what the worker recommends
(``benchmarks/drift_scenario.py`` runs it)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import subprocess
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.broker import stop_process
from streams.events import InteractionEvent
from streams.settings import Settings

SHIFT_GENRES = ("Horror", "Film-Noir", "Documentary", "Western", "Sci-Fi")
PHASES = ("before", "shift", "after")
STAGES = ("start", "before", "shift", "retrain", "after", "end")  # where a drift decision can arrive
NO_RATIONALE = "(no rationale)"


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
# summaries


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
