"""The floor the window path is measured against: a pass-through Faust agent on the same broker and records.

``--child`` runs the agent (this file as a subprocess): every record of the interactions topic forwarded
unchanged to an output topic (same partitions, the worker's producer settings including one record per batch).
``benchmarks/window_path.py`` starts it beside the worker on the same records and times both; run alone, this
file is that benchmark's pass-through trial on ML-1M's earliest N interactions:

    .venv/bin/python benchmarks/passthrough.py --events 20000    # = window_path.py --kinds passthrough --mixes earliest
"""

from __future__ import annotations

import os
import sys
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


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        child()
        return
    from benchmarks.window_path import main as window_path

    window_path(["--kinds", "passthrough", "--mixes", "earliest", "--repeats", "1",
                 "--out", str(ROOT / "benchmarks" / "results" / "passthrough.json"), *args])


if __name__ == "__main__":
    main()
