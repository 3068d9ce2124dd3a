"""Recovery time: how long a restarted worker takes to apply its first event, per table store and user count.

For each ``--users`` N on a fresh Tansu broker: the windows changelog is filled with N users' 20-item windows
(written straight to the changelog topic, batched with the worker's linger as the worker writes them, or one
record per batch with ``--one-record-per-batch`` as it wrote them before session 13, under the partition the
worker would use), then ``slimstream worker`` is started (trained ranker, llama.cpp student,
Qdrant local mode) with each ``--stores``:

- ``memory``: Faust rebuilds the table from the whole changelog on every start;
- ``rocksdb``: a first start reads the whole changelog into RocksDB (``cold``), a graceful stop, then a restart
  reads only what was written since (``warm``, the production restart).

A probe event for a new user is published just before each start. The figures: seconds from the start to
recovery completed (``/healthz/``) and to the probe applied (``/metrics/`` events_applied), and the changelog's
size, so recovery time per GB follows. Start-up includes the consumer group join (Tansu answers JoinGroup after
half the session timeout, ``SLIMSTREAM_BROKER_SESSION_TIMEOUT_S``; measured in tests/test_kafka_compat.py),
loading the ranker, the encoder and the store (concurrently with the join) and the process's imports.

    .venv/bin/python benchmarks/recovery.py --users 10000 100000     # writes benchmarks/results/recovery.json

Found with it and fixed: a restart after the first worker of a group stalled ~13 s (the first worker never
left: Tansu numbers the first generation 0 and aiokafka leaves only from generation > 0,
``streams/kafka_compat.py``); a worker's log went silent while llama.cpp loaded (its quiet mode redirects the
process's descriptors 1 and 2); on a CPU with AMX every llama.cpp generation segfaulted (``scripts/install.sh``
builds without AMX). With one-record batches, at 100,000 users (217.6 MB, ~25,000 batches per changelog
partition) the first start on a fresh group did not progress: Faust reported no changelog record received in 5
minutes while the Tansu process sat at 100% CPU (Tansu 0.6.0's fetch cost grows with the number of batches in a
partition). Batched, as the worker now writes, that read completes (27.6 s, memory store). Then, with the memory
store at 100,000 users, the worker often consumed nothing: Faust dropped the records it delivered while it sought
the input partitions after recovery (streams/faust_resume.py, fixed). A stall is recorded with ``/consumer/`` and
``/stats/`` (``consumer_at_stall``) and the worker's thread and task stacks in its log: the memory store's
restart at 100,000 users still stalls in some runs (README, Known limitations). On Apache Kafka the batch quirks
do not apply.
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

from benchmarks.backlog import add_worker_args, http_json, index_template, publish, say, worker_env  # noqa: E402
from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import WINDOWS_TABLE  # noqa: E402
from tests.conftest import private_data_dir  # noqa: E402

S = Settings.from_env()


def window_records(n: int, size: int, seed: int = 0) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of ``n`` users' windows of ``size`` ML-1M items, as the worker's table holds
    them: Faust JSON key and value, on the partition of the user's interactions (the default partitioner)."""
    import numpy as np
    from aiokafka.partitioner import DefaultPartitioner

    from streams.datasets import load_items
    from streams.events import WindowItem
    from streams.window import WindowState

    items = [i.item_id for i in load_items("ml-1m")]
    rng = np.random.default_rng(seed)
    parts = list(range(S.kafka.topic_partitions))
    partitioner = DefaultPartitioner()
    out = []
    for u in range(n):
        user = f"rec-{u}"
        p = partitioner(user.encode(), parts, parts)
        picked = rng.choice(len(items), size=size, replace=False)
        state = WindowState(user_id=user, version=size, epoch=1_700_000_000_000 + u,
                            items=tuple(WindowItem(item_id=items[i], event_type="rating", value=4.0,
                                                   timestamp=978_300_000.0 + k) for k, i in enumerate(picked)),
                            last_event_timestamp=978_300_000.0 + size, partition=p, offset=-1)
        out.append((p, json.dumps(user).encode(), json.dumps(state.model_dump(mode="json")).encode()))
    return out


async def fill_changelog(bootstrap: str, records: list[tuple[int, bytes, bytes]], one_per_batch: bool) -> None:
    """Write the changelog as the worker does: batched with its linger (recovery probes each partition's last
    batch for the true end, ``streams/kafka_compat.py``), or ``one_per_batch`` as it did before session 13."""
    batching = ({"linger_ms": 0, "max_batch_size": 1} if one_per_batch
                else {"linger_ms": S.kafka.producer_linger_ms})
    await publish(bootstrap, S.kafka.changelog_topic(WINDOWS_TABLE), [(k, v) for _, k, v in records],
                  partitions=[p for p, _, _ in records], acks=1, **batching)


def start_worker(bootstrap: str, data_dir: Path, qdrant: Path, store: str, args: argparse.Namespace,
                 log: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``slimstream worker`` with the ``store`` table store, its output appended to ``log``; (process, web port)."""
    port = free_port()
    env = worker_env(bootstrap, data_dir, qdrant, port, args)
    env["SLIMSTREAM_TABLE_STORE"] = store
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def start_once(bootstrap: str, data_dir: Path, qdrant: Path, store: str, probe: str, args: argparse.Namespace,
               log: Path) -> dict[str, Any]:
    """Publish a probe event, start a worker, time recovery and the probe's application, stop it gracefully."""
    from streams.events import InteractionEvent

    ev = InteractionEvent(user_id=probe, item_id="Toy Story (1995)", event_type="view", timestamp=978_300_100.0)
    asyncio.run(publish(bootstrap, S.kafka.topic_interactions, [(probe.encode(), ev.model_dump_json().encode())]))
    t0 = time.monotonic()
    proc, port = start_worker(bootstrap, data_dir, qdrant, store, args, log)
    recovered = applied = None
    try:
        while time.monotonic() - t0 < args.timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
            h = http_json(f"http://127.0.0.1:{port}/healthz/") or {}
            now = time.monotonic()
            if recovered is None and h.get("recovery_completed") and h.get("assigned_partitions"):
                recovered = now - t0
            m = http_json(f"http://127.0.0.1:{port}/metrics/") or {}
            if m.get("events_applied", 0) >= 1:
                applied = time.monotonic() - t0
                break
            time.sleep(0.1)
        users = http_json(f"http://127.0.0.1:{port}/window/rec-0/")
        mine = http_json(f"http://127.0.0.1:{port}/window/{probe}/")  # the event applied was the probe itself
        # A stall: what the consumer does (agents/consumer_view.py) and every thread's and task's stack, in the log.
        stuck = ({"consumer": http_json(f"http://127.0.0.1:{port}/consumer/"),
                  "stats": http_json(f"http://127.0.0.1:{port}/stats/")} if applied is None else None)
        if applied is None and proc.poll() is None:
            for sig in (signal.SIGQUIT, signal.SIGUSR1):
                os.kill(proc.pid, sig)
            time.sleep(3)
    finally:
        stop_process(proc, 60.0)
    if applied is None:
        say(f"the probe was not applied within {args.timeout:.0f}s (recorded as a stall); see {log}")
    return {"start_to_recovered_s": None if recovered is None else round(recovered, 2),
            "start_to_first_applied_s": None if applied is None else round(applied, 2),
            "stalled": applied is None,
            "a_recovered_window_has_items": bool(users and users.get("items")),
            "probe_in_window": bool(mine and mine.get("version") == 1),
            **({"consumer_at_stall": stuck} if applied is None else {})}


def run_one(n: int, stores: list[str], args: argparse.Namespace, template: Path, work: Path) -> dict[str, Any]:
    from streams.topics import ensure_topics

    records = window_records(n, S.worker.window_size)
    size = sum(len(k) + len(v) for _, k, v in records)
    row: dict[str, Any] = {"users": n, "changelog_records": n, "changelog_mb": round(size / 2**20, 1),
                           "changelog_one_record_per_batch": args.one_record_per_batch}
    with EmbeddedBroker(log_path=work / f"tansu-{n}.log") as broker:
        asyncio.run(ensure_topics(S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})))
        t = time.monotonic()
        asyncio.run(fill_changelog(broker.bootstrap_servers, records, args.one_record_per_batch))
        say(f"{n} users: changelog of {row['changelog_mb']} MB written in {time.monotonic() - t:.0f}s")
        for store in stores:
            data = private_data_dir(args.data_dir, work / f"data-{n}-{store}")
            qdrant = work / f"qdrant-{n}-{store}"
            shutil.copytree(template, qdrant)
            starts = ["cold", "warm"] if store == "rocksdb" else ["start", "restart"]
            for k, label in enumerate(starts):
                got = start_once(broker.bootstrap_servers, data, qdrant, store, f"probe-{n}-{store}-{k}", args,
                                 work / f"worker-{n}-{store}.log")
                row[f"{store}_{label}"] = got
                say(f"{n} users, {store} {label}: {got}")
    return row


def run_filled_by_events(n: int, args: argparse.Namespace, template: Path, work: Path) -> dict[str, Any]:
    """RocksDB at ``n`` users filled the production way: a worker applies one event per user (its store and
    the changelog get a record each), stops gracefully, and the restart reads only what came since. A cold read
    of such a changelog does not progress on Tansu at 100,000 users (the module docstring); this one does not
    need it."""
    import numpy as np

    from streams.datasets import load_items
    from streams.events import InteractionEvent
    from streams.topics import ensure_topics

    items = [i.item_id for i in load_items("ml-1m")]
    rng = np.random.default_rng(1)
    events = [(f"rec-{u}".encode(), InteractionEvent(
        user_id=f"rec-{u}", item_id=items[int(rng.integers(len(items)))], event_type="view",
        timestamp=978_300_000.0 + u, event_id=f"fill-{u}").model_dump_json().encode()) for u in range(n)]
    row: dict[str, Any] = {"users": n, "filled_by": "events"}
    with EmbeddedBroker(log_path=work / f"tansu-events-{n}.log") as broker:
        asyncio.run(ensure_topics(S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})))
        data = private_data_dir(args.data_dir, work / f"data-events-{n}")
        qdrant = work / f"qdrant-events-{n}"
        shutil.copytree(template, qdrant)
        t = time.monotonic()
        asyncio.run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, events))
        say(f"{n} users: {n} events published in {time.monotonic() - t:.0f}s")
        log = work / f"worker-events-{n}.log"
        t0 = time.monotonic()
        proc, port = start_worker(broker.bootstrap_servers, data, qdrant, "rocksdb", args, log)
        applied = 0
        try:
            while time.monotonic() - t0 < args.timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log}")
                applied = (http_json(f"http://127.0.0.1:{port}/metrics/") or {}).get("events_applied", applied)
                if applied >= n:
                    break
                time.sleep(1.0)
        finally:
            stop_process(proc, 60.0)
        row["fill_applied"] = applied
        row["fill_s"] = round(time.monotonic() - t0, 1)
        say(f"{n} users: {applied} events applied in {row['fill_s']}s; restarting")
        if applied < n:
            row["rocksdb_warm"] = None
            return row
        row["rocksdb_warm"] = start_once(broker.bootstrap_servers, data, qdrant, "rocksdb", f"probe-events-{n}", args,
                                         log)
        say(f"{n} users, rocksdb warm (filled by events): {row['rocksdb_warm']}")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--stores", default="memory,rocksdb")
    add_worker_args(ap, backend="llamacpp", max_new_tokens=64, data_dir=ROOT / ".slimstream" / "live-replay")
    ap.add_argument("--events-users", type=int, nargs="*", default=[],
                    help="also: RocksDB filled by a worker applying one event per user, then a warm restart")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs) at the end")
    ap.add_argument("--one-record-per-batch", action="store_true",
                    help="fill the changelog one record per batch (the worker's pre-session-13 writes)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recovery.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="slimstream-recovery-"))
    template = index_template(args.data_dir)
    rows = [run_one(n, args.stores.split(","), args, template, work) for n in args.users]
    rows += [run_filled_by_events(n, args, template, work) for n in args.events_users]
    out = {"command": " ".join(["python", *sys.argv]), "host": platform.node(), "cpus": os.cpu_count(),
           "session_timeout_s": S.kafka.broker_session_timeout_s,
           "rebalance_timeout_s": S.kafka.broker_rebalance_timeout_s, "rows": rows,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'users':>8} {'MB':>6} " + " ".join(f"{s + ' ' + k:>18}" for s in args.stores.split(",")
                                                   for k in (("cold", "warm") if s == "rocksdb" else ("start", "restart"))))
    for r in rows:
        if r.get("filled_by") == "events":
            warm = r["rocksdb_warm"] or {}
            print(f"{r['users']:>8} users filled by events (RocksDB), warm restart: "
                  f"{warm.get('start_to_first_applied_s', 'not reached')}")
            continue
        cells = [r[key]["start_to_first_applied_s"] for key in r if isinstance(r[key], dict)]
        print(f"{r['users']:>8} {r['changelog_mb']:>6} " + " ".join(f"{str(c if c is not None else 'stall'):>18}"
                                                                    for c in cells))
    print(f"wrote {args.out}")
    if args.keep:
        print(f"kept {work} (worker and broker logs)")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
