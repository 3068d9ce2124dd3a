"""``slimstream ab-report``: the A/B experiment's per-arm online figures, from the topics themselves.

Reads the recommendations topic (each message names its arm) and the interactions topic from the beginning
(groupless: it disturbs no worker) up to their ends, joins them as the workers judge events (streams/ab.py),
prints the per-arm online hit rate and attributed hit rate with 95% intervals and B - A, and writes the JSON.
Unlike a worker's ``/stats/`` (its own partitions, since its start) this covers every worker and restart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cli.base import cli, console, load_settings
from streams.kafka_auth import client_options
from streams.settings import Settings


async def _read(settings: Settings, topic: str, idle_s: float = 1.0) -> list[Any]:
    """Every record of ``topic`` up to its end (read on to an empty poll: Tansu's end offset can lag)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**client_options(settings.kafka), group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        if topic not in await consumer.topics():
            return []
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        out: list[Any] = []
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=10_000)
            for records in batch.values():
                out.extend(records)
            if not any(batch.values()):
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= end[tp] for pos, tp in zip(positions, tps)):
                    return out
    finally:
        await consumer.stop()


def _records(settings: Settings) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from streams.events import InvalidEvent, Recommendation, control_record

    async def both() -> tuple[list[Any], list[Any]]:
        return (await _read(settings, settings.kafka.topic_recommendations),
                await _read(settings, settings.kafka.topic_interactions))

    rec_records, event_records = asyncio.run(both())
    recs = []
    for r in rec_records:
        if r.value is None:
            continue  # a forgotten user's tombstone
        rec = Recommendation.model_validate_json(r.value)
        recs.append({"user_id": rec.user_id, "arm": rec.arm, "recommendation_id": rec.recommendation_id,
                     "items": [{"item_id": i.item_id} for i in rec.items], "at": rec.produced_at})
    events = []
    for r in event_records:
        try:
            if r.value is None or control_record(r.value) is not None:
                continue
            raw = json.loads(r.value)
        except (InvalidEvent, ValueError):
            continue  # the worker dead-lettered it
        if isinstance(raw, dict) and isinstance(raw.get("user_id"), str) and isinstance(raw.get("item_id"), str):
            events.append({"user_id": raw["user_id"], "item_id": raw["item_id"],
                           "recommendation_id": raw.get("recommendation_id"), "at": r.timestamp / 1000})
    return recs, events


def _fmt(rate: dict[str, Any]) -> str:
    if not rate["n"]:
        return "no data"
    lo, hi = rate["ci95"]
    return f"{rate['rate']:.4f} [{lo:.4f}, {hi:.4f}] (n={rate['n']})"


@cli.command("ab-report")
def ab_report(
    out: Annotated[Optional[Path], typer.Option(help="JSON file to write (default: reports/ab-<salt>.json)")] = None,
) -> None:
    """Per-arm online hit rate and attributed hit rate of the A/B experiment (SLIMSTREAM_AB_*), with 95%
    intervals, from the recommendations and interactions topics."""
    from streams.ab import arm_report, join_streams

    settings = load_settings()
    recs, events = _records(settings)
    counts = join_streams(recs, events)
    report = {"salt": settings.ab.salt, "share_b": settings.ab.share_b, "enabled": settings.ab.enabled,
              "recommendations": len(recs), "events": len(events),
              "recommendations_without_arm": sum(r["arm"] is None for r in recs), **arm_report(counts)}
    for arm, block in report["arms"].items():
        console.print(f"arm {arm}: {block['users']} users, {block['impressions']} recommendations; online HR "
                      f"{_fmt(block['online_hit_rate'])}; attributed HR {_fmt(block['attributed_hit_rate'])}")
    diff = report["online_hit_rate_difference"]
    if diff:
        console.print(f"online HR, b - a: {diff['b_minus_a']:+.4f} [{diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f}]")
    path = out or Path("reports") / f"ab-{settings.ab.salt}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"report: {path}")


__all__ = ["ab_report"]
