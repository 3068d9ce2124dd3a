"""The floor the window path is measured against: a pass-through Faust agent on the same broker and records.

Publishes the same backlog as ``benchmarks/backlog.py`` (ML-1M's earliest N interactions, keyed by user) to a
fresh Tansu broker, starts a minimal Faust worker (``--child``: this file again) whose one agent forwards every
record unchanged to an output topic (same partitions, the worker's producer settings including one record per
batch), and times the backlog from the first to the last forwarded record. Compare with the worker's events/s on
the same backlog (``benchmarks/results/backlog_ranker.json``; the issue asks for >= 0.5x).

    .venv/bin/python benchmarks/passthrough.py --events 20000     # writes benchmarks/results/passthrough.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT_TOPIC = "passthrough-out"


def child() -> None:
    """The pass-through worker (run as a subprocess): interactions -> passthrough-out, bytes unchanged."""
    import faust

    from streams.app import broker_url
    from streams.settings import Settings

    s = Settings.from_env()
    extra = {"producer_max_batch_size": 1} if s.kafka.one_record_per_batch else {}
    app = faust.App("passthrough", broker=broker_url(s.kafka.bootstrap_servers), store="memory://",
                    topic_partitions=s.kafka.topic_partitions, topic_allow_declare=False, web_enabled=False,
                    producer_linger=s.kafka.producer_linger_ms / 1000.0, consumer_auto_offset_reset="earliest",
                    datadir=str(Path(os.environ["PASSTHROUGH_DATADIR"])), **extra)
    source = app.topic(s.kafka.topic_interactions, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    out = app.topic(OUT_TOPIC, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    @app.agent(source)
    async def forward(stream):  # type: ignore[no-untyped-def]
        async for event in stream.events():
            await out.send(key=event.key, value=event.value)

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


async def _count(bootstrap: str, n: int, timeout: float) -> tuple[float | None, float | None, int]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(OUT_TOPIC, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                                enable_auto_commit=False, fetch_max_wait_ms=10)
    await consumer.start()
    first = last = None
    got = 0
    deadline = time.monotonic() + timeout
    try:
        while got < n and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            now = time.time()
            for records in batch.values():
                if records:
                    first = first or now
                    got += len(records)
                    last = now
    finally:
        await consumer.stop()
    return first, last, got


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child()
        return
    import tempfile

    from benchmarks.backlog import backlog_records, publish, say
    from streams.broker import EmbeddedBroker, stop_process
    from streams.settings import Settings
    from streams.topics import ensure_topics

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--set", action="append", default=[], metavar="SLIMSTREAM_X=V")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "passthrough.json")
    args = p.parse_args(argv)
    records, valid, users = backlog_records(args.events, 0)
    with tempfile.TemporaryDirectory(prefix="passthrough-") as tmp, EmbeddedBroker(log_path=Path(tmp) / "tansu.log") as broker:
        s = Settings.from_env().updated(kafka={"bootstrap_servers": broker.bootstrap_servers})
        asyncio.run(ensure_topics(s))
        asyncio.run(publish(broker.bootstrap_servers, s.kafka.topic_interactions, records))
        say(f"published {len(records)} records of {users} users")
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "PASSTHROUGH_DATADIR": tmp,
               **dict(kv.split("=", 1) for kv in args.set)}
        with open(Path(tmp) / "worker.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, __file__, "--child"], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            first, last, got = asyncio.run(_count(broker.bootstrap_servers, len(records), 600))
        finally:
            stop_process(proc, 20.0)
    rate = None if not first or not last or last <= first else round(got / (last - first), 1)
    out = {"command": "python benchmarks/passthrough.py " + " ".join(argv or sys.argv[1:]), "records": len(records),
           "forwarded": got, "records_per_s": rate, "settings": args.set}
    say(f"pass-through Faust agent: {got} records forwarded, {rate} records/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
