"""Backlog benchmark: a worker started on a topic that already holds N events, then fresh events at a trickle.

For each backlog size (default 20,000 and 100,000 of ML-1M's earliest interactions, time-ordered, optionally
interleaved with the hostile corpus of ``tests/hostile.py``) on a fresh Tansu broker:

1. publish the backlog, then start ``slimstream worker`` (the real student, encoder and Qdrant local mode);
2. poll ``/metrics/`` until every record was consumed: events/s over the backlog (first to last applied),
   the rationale backlog's high-water mark and what the student managed meanwhile;
3. publish ``--fresh`` events for new users at ``--rate``/s while the student is still far behind, and measure
   publish -> fast-path recommendation latency on the recommendations topic (p50/p99/max);
4. check that nothing was lost: applied events, dead letters, no agent crash in the log.

    .venv/bin/python benchmarks/backlog.py                      # 20k and 100k, ~10 minutes on 2 cores
    .venv/bin/python benchmarks/backlog.py --events 20000 --hostile 10000

Prints a table and writes ``benchmarks/results/backlog.json``.
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
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.settings import Settings  # noqa: E402

S = Settings.from_env()
CRASH_MARKS = ("Crashed reason", "Traceback (most recent call last)")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def backlog_records(n: int, hostile: int, seed: int = 0) -> tuple[list[tuple[bytes | None, bytes | None]], int, int]:
    """The first ``n`` ML-1M interactions in time order as (key, value), with ``hostile`` bad records spread
    evenly among them; returns the records, how many of them are valid and their users."""
    from streams.replay import earliest_events
    from tests.hostile import hostile_corpus, interleave  # the corpus the tests use

    events = earliest_events("ml-1m", n)
    good = [(ev.user_id.encode(), ev.model_dump_json(exclude_none=True).encode()) for ev in events]
    merged = interleave(good, [(r.key, r.value) for r in hostile_corpus(hostile, seed=seed)]) if hostile else good
    return merged, len(good), len({ev.user_id for ev in events})


async def publish(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None]],
                  partitions: list[int] | None = None, **producer_config: Any) -> None:
    """Publish ``records`` (key, value) in order, to ``partitions[i]`` when given (else the key's partition);
    ``producer_config`` overrides the producer's settings."""
    from aiokafka import AIOKafkaProducer

    config = {"acks": "all", "linger_ms": 20, "max_request_size": 2_000_000, **producer_config}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, **config)
    await producer.start()
    try:
        futures = []
        for n, (key, value) in enumerate(records):
            futures.append(await producer.send(topic, value, key=key,
                                               partition=None if partitions is None else partitions[n]))
            if len(futures) >= 2000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def http_json(url: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def index_template(data_dir: Path) -> Path:
    """The ML-1M catalogue in Qdrant local mode, indexed once into ``data.data_dir`` (copied per run)."""
    from models.encoder import load_encoder
    from streams.datasets import load_items
    from vectorstore.catalogue import index_catalogue
    from vectorstore.store import VectorStore

    path = data_dir / "qdrant-template"
    settings = Settings.from_env(data={"data_dir": data_dir}, qdrant={"path": str(path)})
    store = VectorStore(settings)
    try:
        encoder = load_encoder(settings)
        store.ensure_collections(encoder.dim)
        index_catalogue(store, encoder, load_items("ml-1m"))
    finally:
        store.close()
    return path


def add_worker_args(ap: argparse.ArgumentParser, *, backend: str, max_new_tokens: int, data_dir: Path) -> None:
    """The options :func:`worker_env` reads, with this benchmark's defaults."""
    ap.add_argument("--backend", default=backend, choices=["transformers", "llamacpp"])
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--set", action="append", default=[], metavar="SLIMSTREAM_X=V", help="extra worker setting")
    ap.add_argument("--data-dir", type=Path, default=data_dir, help="model caches (ONNX, student) and registry")


def worker_env(bootstrap: str, data_dir: Path, qdrant: Path, port: int, args: argparse.Namespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_") and k not in (
        "KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL", "QDRANT_PATH")}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "QDRANT_PATH": str(qdrant), "SLIMSTREAM_DATA_DIR": str(data_dir),
        "SLIMSTREAM_WEB_PORT": str(port), "SLIMSTREAM_EVENT_TIME_MODE": "replay",
        "SLIMSTREAM_STUDENT_BACKEND": args.backend, "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": str(args.max_new_tokens),
        "PYTHONUNBUFFERED": "1",
    })
    env.update(dict(kv.split("=", 1) for kv in args.set))
    return env


async def fresh_latency(bootstrap: str, n: int, rate: float, tag: str, item_ids: list[str]) -> dict[str, Any]:
    """Publish one event each for ``n`` new users at ``rate``/s; publish -> first fast-path answer, seconds."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.structs import TopicPartition

    from streams.events import InteractionEvent, Recommendation

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_max_wait_ms=5)  # Tansu answers an empty fetch only after this
    await consumer.start()
    tps = [TopicPartition(S.kafka.topic_recommendations, p) for p in range(S.kafka.topic_partitions)]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    for tp in tps:
        await consumer.position(tp)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0)
    await producer.start()
    sent: dict[str, float] = {}
    got: dict[str, float] = {}
    worker_side: list[float] = []

    async def read() -> None:
        while len(got) < n:
            batch = await consumer.getmany(timeout_ms=200)
            now = time.time()
            for records in batch.values():
                for r in records:
                    rec = Recommendation.model_validate_json(r.value)
                    if rec.user_id in sent and rec.user_id not in got and rec.path.value == "fast":
                        got[rec.user_id] = now - sent[rec.user_id]
                        worker_side.append(rec.produced_at - sent[rec.user_id])

    reader = asyncio.ensure_future(read())
    try:
        t0 = time.monotonic()
        for k in range(n):
            delay = t0 + k / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            user = f"fresh-{tag}-{k}"
            ev = InteractionEvent(user_id=user, item_id=item_ids[k % len(item_ids)], event_type="view",
                                  timestamp=time.time())
            sent[user] = time.time()
            await producer.send_and_wait(S.kafka.topic_interactions, ev.model_dump_json().encode(), key=user.encode())
        try:
            await asyncio.wait_for(reader, timeout=60)
        except asyncio.TimeoutError:
            pass
    finally:
        reader.cancel()
        await producer.stop()
        await consumer.stop()
    lat = np.array(sorted(got.values())) if got else np.array([np.nan])
    return {"sent": n, "answered": len(got), "rate_per_s": rate,
            "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1), "max_ms": round(float(lat.max()) * 1000, 1),
            "worker_produced_p50_ms": round(float(np.median(worker_side)) * 1000, 1) if worker_side else None}


def run_one(n: int, args: argparse.Namespace, data_dir: Path, template: Path, work: Path) -> dict[str, Any]:
    from streams.topics import ensure_topics

    records, valid, users = backlog_records(n, args.hostile, args.seed)
    qdrant = work / f"qdrant-{n}"
    shutil.copytree(template, qdrant)
    log_path = work / f"worker-{n}.log"
    with EmbeddedBroker(log_path=work / f"tansu-{n}.log") as broker:
        settings = S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})
        asyncio.run(ensure_topics(settings))
        t = time.monotonic()
        asyncio.run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, records))
        say(f"published {len(records)} records ({valid} valid, {len(records) - valid} hostile) "
            f"in {time.monotonic() - t:.1f}s")
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT,
                                    env=worker_env(broker.bootstrap_servers, data_dir, qdrant, port, args),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.monotonic()
            first_applied = last = student_ready = None
            samples = []
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}; see {log_path}")
                m = http_json(base + "/metrics/")
                now = time.monotonic()
                if student_ready is None and (http_json(base + "/healthz/") or {}).get("models_ready"):
                    student_ready = now
                if m is not None:
                    applied = m.get("events_applied", 0)
                    samples.append((now, applied, m["load"]["rationale_backlog"]["waiting_users"]))
                    if applied and first_applied is None:
                        first_applied = now
                    if m.get("events_in", 0) >= len(records):
                        last = now
                        break
                if now - started > args.timeout:
                    raise RuntimeError(f"backlog not consumed after {args.timeout}s: {m}")
                time.sleep(0.2)
            drained = http_json(base + "/metrics/") or {}
            assert first_applied is not None and last is not None
            secs = max(last - first_applied, 1e-6)
            say(f"backlog of {len(records)} consumed in {secs:.1f}s ({len(records) / secs:.0f} records/s)")
            from streams.datasets import load_items

            items = [i.item_id for i in load_items("ml-1m")[:200]]
            fresh = asyncio.run(fresh_latency(broker.bootstrap_servers, args.fresh, args.rate, str(n), items))
            after = http_json(base + "/metrics/") or {}
            ended = time.monotonic()
        finally:
            stop_process(proc, 30)
    log_text = log_path.read_text(errors="replace")
    load = drained.get("load", {})
    backlog = load.get("rationale_backlog", {})
    return {
        "records": len(records), "valid_events": valid, "hostile_records": len(records) - valid,
        "users": users,
        "consume_s": round(secs, 2), "records_per_s": round(len(records) / secs, 1),
        "events_applied": drained.get("events_applied", 0), "dead_letters": drained.get("dead_letters", 0),
        "handler_errors": drained.get("handler_errors", 0),
        "recommendations_fast": drained.get("recommendations_fast", 0),
        "fast_path_batches": drained.get("fast_path_batches", 0),
        "rationale_backlog_max": backlog.get("high_water"),
        "rationale_backlog_at_drain": backlog.get("waiting_users"),
        "rationales_written_during_backlog": drained.get("rationales_generated", 0),
        "student_ready_after_start_s": None if student_ready is None else round(student_ready - started, 1),
        "student_ready_before_drain_s": None if student_ready is None else round(last - student_ready, 1),
        "rationales_written_by_end": after.get("rationales_generated", 0),
        "seconds_start_to_end": round(ended - started, 1),
        "student_calls_per_1000_events": round(1000 * drained.get("student_calls", 0) / max(1, valid), 2),
        "fresh": fresh,
        "rationale_backlog_after_fresh": (after.get("load") or {}).get("rationale_backlog", {}).get("waiting_users"),
        "agent_crashes_in_log": sum(log_text.count(mark) for mark in CRASH_MARKS),
        "worker_start_to_first_applied_s": round(first_applied - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, nargs="+", default=[20_000, 100_000], help="backlog sizes")
    ap.add_argument("--hostile", type=int, default=0, help="hostile records interleaved in each backlog")
    ap.add_argument("--fresh", type=int, default=200, help="fresh events after the backlog")
    ap.add_argument("--rate", type=float, default=20.0, help="fresh events per second")
    add_worker_args(ap, backend="transformers", max_new_tokens=128, data_dir=ROOT / ".slimstream")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to consume one backlog")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backlog.json")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="slimstream-backlog-"))
    say(f"work dir {work}; indexing the catalogue template")
    template = index_template(args.data_dir)
    runs = []
    for n in args.events:
        say(f"backlog of {n} events")
        runs.append(run_one(n, args, args.data_dir, template, work))
        print(json.dumps(runs[-1], indent=2), flush=True)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "host": platform.node(),
           "cpus": os.cpu_count(), "backend": args.backend, "max_new_tokens": args.max_new_tokens,
           "settings": {"fast_path_batch_max": S.worker.fast_path_batch_max, "fast_path_batch_wait_s": S.worker.fast_path_batch_wait_s,
                        "one_record_per_batch": S.kafka.one_record_per_batch, "student_batch_size": S.student.batch_size},
           "runs": runs, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'records':>9} {'hostile':>8} {'rec/s':>7} {'backlog max':>11} {'fresh p50 ms':>12} {'p99 ms':>8} "
          f"{'answered':>9} {'crashes':>7}")
    for r in runs:
        f = r["fresh"]
        print(f"{r['records']:>9} {r['hostile_records']:>8} {r['records_per_s']:>7} {r['rationale_backlog_max']!s:>11} "
              f"{f['p50_ms']:>12} {f['p99_ms']:>8} {f['answered']:>5}/{f['sent']:<3} {r['agent_crashes_in_log']:>7}")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
