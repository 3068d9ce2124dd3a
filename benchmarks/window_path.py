"""The window path against its floor, side by side in one run: a pass-through Faust agent, one worker, two workers.

Each trial gets a fresh Tansu broker and the same records, and runs one of:

- ``passthrough``: the minimal Faust agent of ``benchmarks/passthrough.py`` (every record forwarded unchanged,
  one produce per record, the worker's producer settings);
- ``worker``: ``slimstream worker`` as deployed (the registry's trained ranker, the real student on llama.cpp,
  the encoder, Qdrant local mode): event -> window -> fast-path recommendation published;
- ``2 workers``: two of them in one consumer group over the 4 partitions (each its own Qdrant local copy).

The consumers are started and ready first (partitions assigned, a warm-up record per user group answered), then
the records are published at once (tens of thousands per second, a backlog to them) and the trial times the
first to the last record handled: forwarded (pass-through) or answered on the fast path (workers: the events of
batches whose recommendations were sent, read from ``/metrics/``), and how busy the box's cores were meanwhile
(``box_cpu_busy`` from ``/proc/stat``: publisher, broker and consumers together; 1.0 is both cores). Trials
alternate kinds and repeat, so the ratios are not an artefact of the box getting busier.

Two mixes of the same number of ML-1M events, keyed by user:

- ``earliest``: ML-1M's first N interactions in time order (few users rating in long sessions, 159 users for
  20k: consecutive events of one user, which the worker's per-batch window write coalesces);
- ``spread``: N // 10 users x their first 10 interactions, round-robin (no user twice within N // 10 events: the
  worst case for coalescing, every event its own window write and its own recommendation).

    .venv/bin/python benchmarks/window_path.py          # 20k events, both mixes, 2 repeats: ~15 minutes

Prints a table and writes ``benchmarks/results/window_path.json``. The worker serves the ranker registry's
CURRENT under ``--data-dir`` (``benchmarks/live_replay.py --train-only`` makes one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.backlog import (  # noqa: E402
    add_worker_args, backlog_records, http_json, index_template, publish, say, worker_env)
from benchmarks.passthrough import OUT_TOPIC  # noqa: E402
from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.conftest import private_data_dir  # noqa: E402

S = Settings.from_env()
Records = list[tuple[bytes | None, bytes | None]]


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole box so far (/proc/stat): how much of the 2 cores a trial used."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return sum(fields) - fields[3] - fields[4], sum(fields)  # idle and iowait are not busy


def busy_share(start: tuple[int, int], end: tuple[int, int]) -> float:
    return round((end[0] - start[0]) / max(end[1] - start[1], 1), 3)


def spread_records(n: int, per_user: int = 10) -> tuple[Records, int]:
    """``n // per_user`` ML-1M users' first ``per_user`` interactions, round-robin over the users."""
    from collections import defaultdict

    from streams.datasets import load_interactions
    from streams.replay import interaction_to_event

    by_user: dict[str, list] = defaultdict(list)
    for it in load_interactions("ml-1m"):
        by_user[it.user_id].append(it)
    users = [u for u in sorted(by_user) if len(by_user[u]) >= per_user][: n // per_user]
    firsts = {u: sorted(by_user[u], key=lambda i: (i.timestamp, i.item_id))[:per_user] for u in users}
    out = []
    for k in range(per_user):
        for u in users:
            i = firsts[u][k]
            ev = interaction_to_event(i.user_id, i.item_id, i.rating, i.timestamp)
            out.append((ev.user_id.encode(), ev.model_dump_json(exclude_none=True).encode()))
    return out, len(users)


def warmup_records(n: int = 40) -> Records:
    """One event each for ``n`` fresh users: keys hashed over every partition, so each consumer gets some."""
    from streams.events import InteractionEvent

    return [(f"warm-{k}".encode(), InteractionEvent(user_id=f"warm-{k}", item_id="Toy Story (1995)",
                                                     event_type="view", timestamp=978300000.0 + k)
             .model_dump_json(exclude_none=True).encode()) for k in range(n)]


async def _forwarded(bootstrap: str, n: int, records: Records, timeout: float) -> tuple[float, float, int]:
    """Publish ``records`` and time the pass-through's output from the first to the ``n``-th record."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=10)
    await consumer.start()
    tps = [TopicPartition(OUT_TOPIC, p) for p in range(S.kafka.topic_partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    first = last = 0.0
    got = 0
    try:
        pub = asyncio.ensure_future(publish(bootstrap, S.kafka.topic_interactions, records))
        deadline = time.monotonic() + timeout
        while got < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.monotonic()
            for recs in batch.values():
                if recs:
                    first = first or now
                    got += len(recs)
                    last = now
        await pub
    finally:
        await consumer.stop()
    return first, last, got


def _passthrough(bootstrap: str, records: Records, work: Path, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "PASSTHROUGH_DATADIR": str(work)}
    with open(work / "passthrough.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "passthrough.py"), "--child"], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        warm = warmup_records()
        _, _, got = asyncio.run(_forwarded(bootstrap, len(warm), warm, 300))
        if got < len(warm):
            raise RuntimeError(f"pass-through forwarded {got}/{len(warm)} warm-up records; see {work}")
        c0 = cpu_ticks()
        first, last, got = asyncio.run(_forwarded(bootstrap, len(records), records, timeout))
        c1 = cpu_ticks()
    finally:
        stop_process(proc, 20.0)
    return {"handled": got, "seconds": round(last - first, 3),
            "events_per_s": round(got / max(last - first, 1e-6), 1), "box_cpu_busy": busy_share(c0, c1)}


def _metrics(ports: list[int]) -> list[dict[str, Any]]:
    return [http_json(f"http://127.0.0.1:{p}/metrics/") or {} for p in ports]


def _answered(ms: list[dict[str, Any]]) -> int:
    return sum(m.get("fast_path_batch_events", 0) for m in ms)


def _workers(bootstrap: str, records: Records, n_workers: int, args: argparse.Namespace, template: Path,
             work: Path) -> dict[str, Any]:
    procs, ports = [], []
    try:
        for w in range(n_workers):
            qdrant = work / f"qdrant-{w}"
            shutil.copytree(template, qdrant)
            port = free_port()
            env = worker_env(bootstrap, args.data_dir, qdrant, port, args)
            env["SLIMSTREAM_DATA_DIR"] = str(private_data_dir(args.data_dir, work / f"data-{w}"))
            with open(work / f"worker-{w}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            ports.append(port)
        _until(lambda: all((http_json(f"http://127.0.0.1:{p}/healthz/") or {}).get("assigned_partitions", 0) > 0
                           and (http_json(f"http://127.0.0.1:{p}/healthz/") or {}).get("models_ready")
                           for p in ports), 300, procs, "workers ready and assigned")
        warm = warmup_records()
        asyncio.run(publish(bootstrap, S.kafka.topic_interactions, warm))
        # Every worker answered some warm-up: the group has settled and each owns partitions.
        _until(lambda: (lambda ms: _answered(ms) >= len(warm) and all(m.get("fast_path_batch_events", 0) for m in ms))(
            _metrics(ports)), 300, procs, "warm-up answered by every worker")
        base = _answered(_metrics(ports))
        c0 = cpu_ticks()
        asyncio.run(publish(bootstrap, S.kafka.topic_interactions, records))
        first = last = None
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = _answered(_metrics(ports)) - base
            now = time.monotonic()
            if done > 0 and first is None:
                first = now
            if done >= len(records):
                last = now
                break
            time.sleep(0.2)  # /metrics/ computes percentiles: polling it costs the worker CPU
        c1 = cpu_ticks()
        ms = _metrics(ports)
        if last is None or first is None:
            raise RuntimeError(f"workers answered {_answered(ms) - base}/{len(records)}; see {work}")
    finally:
        for p in procs:
            stop_process(p, 30.0)
    logs = "".join((work / f"worker-{w}.log").read_text(errors="replace") for w in range(n_workers))
    return {"handled": _answered(ms) - base, "seconds": round(last - first, 3),
            "events_per_s": round(len(records) / max(last - first, 1e-6), 1), "box_cpu_busy": busy_share(c0, c1),
            "per_worker_events": [m.get("events_applied", 0) for m in ms],
            "recommendations_fast": sum(m.get("recommendations_fast", 0) for m in ms),
            "fast_path_batches": sum(m.get("fast_path_batches", 0) for m in ms),
            "rationales_generated": sum(m.get("rationales_generated", 0) for m in ms),
            "dead_letters": sum(m.get("dead_letters", 0) for m in ms),
            "crashes_in_log": logs.count("Traceback (most recent call last)")}


def _until(predicate, timeout: float, procs: list[subprocess.Popen[bytes]], what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError(f"a worker exited while waiting for: {what}")
        if predicate():
            return
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for: {what}")


def trial(kind: str, records: Records, args: argparse.Namespace, template: Path, work: Path) -> dict[str, Any]:
    from streams.topics import ensure_topics

    work.mkdir(parents=True)
    with EmbeddedBroker(log_path=work / "tansu.log") as broker:
        asyncio.run(ensure_topics(S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})))
        if kind == "passthrough":
            return _passthrough(broker.bootstrap_servers, records, work, args.timeout)
        return _workers(broker.bootstrap_servers, records, 2 if kind == "2 workers" else 1, args, template, work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--mixes", default="earliest,spread")
    ap.add_argument("--kinds", default="passthrough,worker,2 workers")
    ap.add_argument("--repeats", type=int, default=2)
    add_worker_args(ap, backend="llamacpp", max_new_tokens=64, data_dir=ROOT / ".slimstream" / "live-replay")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "window_path.json")
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    work = Path(tempfile.mkdtemp(prefix="slimstream-window-path-"))
    template = index_template(args.data_dir)
    results: dict[str, Any] = {}
    for mix in args.mixes.split(","):
        if mix == "earliest":
            records, _, users = backlog_records(args.events, 0)
        elif mix == "spread":
            records, users = spread_records(args.events)
        else:
            raise SystemExit(f"unknown mix {mix!r}")
        trials: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for r in range(args.repeats):
            for kind in kinds:
                got = trial(kind, records, args, template, work / f"{mix}-{kind.replace(' ', '')}-{r}")
                trials[kind].append(got)
                say(f"{mix} #{r} {kind}: {got['events_per_s']} events/s")
        best = {k: max(t["events_per_s"] for t in v) for k, v in trials.items()}
        results[mix] = {"records": len(records), "users": users, "trials": trials, "best_events_per_s": best}
        if "passthrough" in best:
            results[mix]["ratio_to_passthrough"] = {k: round(v / best["passthrough"], 2) for k, v in best.items()}
        if "worker" in best and "2 workers" in best:
            results[mix]["two_workers_over_one"] = round(best["2 workers"] / best["worker"], 2)
    out = {"command": " ".join(["python", *sys.argv]), "host": platform.node(), "cpus": os.cpu_count(),
           "backend": args.backend, "settings": {"one_record_per_batch": S.kafka.one_record_per_batch,
                                                 "fast_path_batch_max": S.worker.fast_path_batch_max,
                                                 "fast_path_batch_wait_s": S.worker.fast_path_batch_wait_s,
                                                 "extra": args.set},
           "results": results, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'mix':<9} {'users':>6} " + " ".join(f"{k + ' ev/s':>16}" for k in kinds) + f" {'worker/pt':>10} {'2w/1w':>6}")
    for mix, r in results.items():
        print(f"{mix:<9} {r['users']:>6} " + " ".join(f"{r['best_events_per_s'][k]:>16}" for k in kinds)
              + f" {r.get('ratio_to_passthrough', {}).get('worker', '-')!s:>10} {r.get('two_workers_over_one', '-')!s:>6}")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
