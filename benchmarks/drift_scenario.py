"""Drift scenario on ML-1M, end to end: the online hit rate before a taste shift, after it, and after a retrain
promoted a new student, each per model version (issue 4's evidence run).

Everything is the real thing, nothing is mocked: an embedded Tansu broker, a ``slimstream worker`` subprocess
on a fresh run directory (its own data dir, Qdrant local mode and model registry; the worker indexes the
ML-1M catalogue itself), a teacher behind an OpenAI-compatible endpoint, and one retrain cycle
(``retrain.job.retrain_once``, in a child process) over the stream's own interactions topic.

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
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from streams.broker import EmbeddedBroker, free_port  # noqa: E402
from streams.settings import Settings  # noqa: E402
from benchmarks.drift_world import (  # noqa: E402
    PHASES, SHIFT_GENRES, STAGES, Children, Scenario, UserPlan, build_plans,
    http_json, http_ok, log_tail, manifest_summary, say, summarise_phase, teacher_source,
)

RESULTS = ROOT / "benchmarks" / "results" / "drift_scenario.json"
CACHE_LINKS = ("encoder", "student", "item-vectors")  # content-keyed caches shared with --cache-dir



# ---------------------------------------------------------------------------------------------------------
# the retrain child (a separate process: training cannot be interrupted inside a thread, a process can)


def retrain_child(spec_path: str) -> None:
    from retrain.job import default_publisher, retrain_once
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


async def run_scenario(args: argparse.Namespace, plans: list[UserPlan], env: dict[str, str], run_dir: Path,
                       children: Children, out: dict[str, Any]) -> None:
    """The worker, then the phases before and during the shift, one retrain cycle, the hot swap (if the
    candidate was promoted) and the phase after, with every figure written into ``out``."""
    from aiokafka import AIOKafkaConsumer

    from streams.replay import start_producer

    settings = Settings.from_env()  # from os.environ, which main() set to ``env``
    worker, worker_log, url = await start_worker(args, env, run_dir, children, out)
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
        result, promoted = await retrain_cycle(args, sc, env, run_dir, children, out)
        if promoted:
            await wait_for_swap(args, sc, f"{out['base_model_version']}+{result['version']}", out)
        else:
            out["swap"] = None
            say("no promotion: the 'after' phase runs on the same student")
        say(f"phase after: {sum(len(p.after) for p in plans)} events from {len(plans)} users")
        await sc.run_phase("after", producer)
        out["phases"]["after"] = summarise_phase(sc, sc.phases["after"])
        sc.where = ("end", 0)
        out["worker_metrics_final"] = await sc.metrics()
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


async def start_worker(args: argparse.Namespace, env: dict[str, str], run_dir: Path, children: Children,
                       out: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path, str]:
    """``slimstream worker`` in a child process, waited for until healthy: (process, log, base URL)."""
    t = time.monotonic()
    worker_log = run_dir / "logs" / "worker.log"
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
    out["timings"]["worker_ready_s"] = round(time.monotonic() - t, 1)
    say(f"worker ready in {out['timings']['worker_ready_s']}s, serving {h['model_version']}")
    out["base_model_version"] = h["model_version"]
    return worker, worker_log, url


async def retrain_cycle(args: argparse.Namespace, sc: Scenario, env: dict[str, str], run_dir: Path,
                        children: Children, out: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """One retrain cycle in a child process over the interactions topic (and ``--force-promote``): its result
    and whether a new version is now current."""
    logs = run_dir / "logs"
    sc.where = ("retrain", 0)
    reason = sc.decisions[-1]["decision"] if sc.decisions else None
    spec = {"drift_reason": reason, "result": str(run_dir / "retrain_result.json"),
            "max_users": args.retrain_max_users or len(sc.plans)}
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
    out["timings"]["retrain_s"] = round(time.monotonic() - t, 1)
    if code != 0:
        raise RuntimeError(f"retrain cycle failed with code {code}:\n{log_tail(logs / 'retrain.log')}")
    result = json.loads((run_dir / "retrain_result.json").read_text())
    retrain: dict[str, Any] = {
        "status": result["status"], "reason": result["reason"], "version": result.get("version"),
        "parent_version": result.get("parent_version"), "gate": result.get("gate"),
        "candidate_metrics": result.get("candidate_metrics"), "current_metrics": result.get("current_metrics"),
        "published": result.get("published"), "publish_error": result.get("publish_error"),
        "triggered_by": "drift decision" if reason else "scheduled (no drift decision had fired)",
        "wall_s": result.get("wall_s"), "forced_promotion": False,
        "manifest": manifest_summary(Path(env["SLIMSTREAM_REGISTRY_DIR"]), result.get("version"))}
    out["retrain"] = retrain
    say(f"retrain: {retrain['status']} {retrain['version'] or ''} in {out['timings']['retrain_s']}s: "
        f"{retrain['reason']}")
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
    return result, promoted


async def wait_for_swap(args: argparse.Namespace, sc: Scenario, expected: str, out: dict[str, Any]) -> None:
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
    out["timings"]["swap_wait_s"] = round(time.monotonic() - t, 1)
    out["swap"] = {"to": expected, "last_model_swap": m.get("last_model_swap"), "model_swaps": m.get("model_swaps")}
    say(f"swapped: {m.get('last_model_swap')}")


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
