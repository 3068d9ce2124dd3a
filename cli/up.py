"""``slimstream up``: broker, topics, catalogue, worker and a replay on this machine, with the answers on screen."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from typing import Annotated, Optional

import typer

from cli.base import cli, console, fail, load_settings, progress_bar
from cli.deploy import index_source
from cli.events import show_recommendation
from streams.kafka_auth import client_options
from streams.settings import Settings


# --- up --------------------------------------------------------------------------------------------------
@cli.command()
def up(
    users: Annotated[int, typer.Option(min=1, help="ML users whose history is replayed")] = 8,
    rate: Annotated[float, typer.Option(min=0.1, help="events per second")] = 5.0,
    max_events: Annotated[int, typer.Option(min=1, help="stop replaying after this many events")] = 400,
    seed: Annotated[int, typer.Option(help="user sample seed")] = 7,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="broker port (default: a free one)")] = None,
    follow: Annotated[bool, typer.Option(help="keep running after the replay's rationales arrived")] = False,
    wait: Annotated[float, typer.Option(min=1, help="seconds to wait for the last rationales after the replay")] = 900,
    ranker_minutes: Annotated[float, typer.Option(min=0.1, help="first run: training budget of the ranker trained, "
                                                                 "cached and promoted when none is (0.1 = 6 s)")] = 5.0,
    train_ranker: Annotated[bool, typer.Option(help="train a ranker on the first run (off: the text ranker "
                                                    "serves until one is promoted)")] = True,
) -> None:
    """Run everything on this machine: Tansu broker, Qdrant local mode, catalogue, worker, and a replay.

    Stops by itself once every replayed user has a recommendation with a rationale for their final window
    (or after --wait seconds), unless --follow is given; Ctrl-C stops everything at any time.
    """
    from streams.broker import EmbeddedBroker, stop_process

    base = load_settings()
    base.data.data_dir.mkdir(parents=True, exist_ok=True)
    logs = base.data.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    broker = EmbeddedBroker(port=port, log_path=logs / "tansu.log")
    worker_proc: subprocess.Popen[bytes] | None = None
    try:
        console.print(f"starting Tansu broker on {broker.host}:{broker.port} ...")
        broker.start()
        settings = base.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})
        from streams.topics import ensure_topics

        asyncio.run(ensure_topics(settings))
        report = index_source(settings, settings.data.dataset)
        console.print(f"catalogue {settings.data.dataset}: {report.total} items ({report.embedded} embedded now)")
        if train_ranker:
            _ensure_ranker(settings, ranker_minutes)
        # up replays MovieLens' 2000-2003 interactions: the worker must admit historical timestamps.
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               "SLIMSTREAM_DATA_DIR": str(settings.data.data_dir), "SLIMSTREAM_EVENT_TIME_MODE": "replay"}
        worker_log = open(logs / "worker.log", "ab")
        worker_proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env,
                                       stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        console.print(f"worker started (pid {worker_proc.pid}, log {logs / 'worker.log'}); Ctrl-C stops everything")
        web = f"http://{settings.worker.web_host}:{settings.worker.web_port}"
        console.print(f"HTTP API and pages: {web}/v1/recommendations/<user>, {web}/ui/ (docs/api.md)")
        asyncio.run(_replay_and_show(settings, users, rate, max_events, seed, worker_proc, follow, wait))
    except KeyboardInterrupt:
        console.print("\nstopping ...")
    finally:
        if worker_proc is not None:
            stop_process(worker_proc, 20.0)
        broker.stop()
        console.print("stopped: broker and worker are down")


def _ensure_ranker(settings: Settings, minutes: float) -> None:
    """The first run trains the served ranker once (within ``minutes``), judges it through the serving code and
    promotes it; later runs serve the cached CURRENT version."""
    from streams.registry import ModelRegistry

    registry = ModelRegistry.rankers_for_settings(settings)
    current = registry.current()
    if settings.retrieval.ranker != "registry":
        console.print("ranker: the text ranker (SLIMSTREAM_RANKER=text)")
        return
    if current is None:
        from retrain.ranker import RankerSpec, train_ranker

        console.print(f"first run: training the served ranker on {settings.data.dataset} (budget {minutes:g} min) ...")
        spec = RankerSpec(minutes=minutes, checkpoint_dir=str(settings.data.data_dir / "checkpoints"))
        result = train_ranker(settings, settings.data.dataset, spec, promote=True,
                              progress=lambda msg: console.print(f"  {msg}", highlight=False))
        if not result.promoted:
            console.print(f"ranker {result.version} not promoted ({result.reason}): serving the text ranker")
            return
        current = result.version
    m = registry.get(current)
    served, pop = m["metrics"]["served"], m["metrics"]["popularity"]
    console.print(f"ranker {current}: {m.get('name')}, test NDCG@10 {served['NDCG@10']:.4f} / HR@10 "
                  f"{served['HR@10']:.4f} on {m['metrics']['users']} users (popularity {pop['NDCG@10']:.4f}), "
                  f"trained {m['training']['seconds']:.0f} s")


async def _replay_and_show(settings: Settings, users: int, rate: float, max_events: int, seed: int,
                           worker_proc: subprocess.Popen[bytes], follow: bool, wait: float) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.events import Recommendation
    from streams.replay import publish, sample_replay, start_producer

    events = sample_replay(settings.data.dataset, users, max_events, seed)
    final_version = dict(Counter(ev.user_id for ev in events))  # distinct events: window version = count
    explained: set[str] = set()
    consumer = AIOKafkaConsumer(settings.kafka.topic_recommendations, **client_options(settings.kafka),
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    producer = await start_producer(settings)
    stats = {"fast": 0, "slow": 0}
    try:
        with progress_bar() as progress:
            sent_task = progress.add_task(f"replaying {users} users", total=len(events))
            slow_task = progress.add_task("rationales (slow path)", total=None)

            async def show() -> None:
                async for msg in consumer:
                    if msg.value is None:  # a forgotten user's tombstone
                        continue
                    rec = Recommendation.model_validate_json(msg.value)
                    stats[rec.path.value] += 1
                    if rec.path.value == "slow":
                        progress.update(slow_task, advance=1)
                        if rec.rationale_window_version == final_version.get(rec.user_id):
                            explained.add(rec.user_id)
                    show_recommendation(rec, progress.console)

            shower = asyncio.create_task(show())
            await publish(producer, settings.kafka.topic_interactions, events, rate,
                          on_sent=lambda ev: progress.update(sent_task, advance=1))
            progress.update(sent_task, description="replay done; waiting for rationales")
            deadline = asyncio.get_running_loop().time() + wait
            while worker_proc.poll() is None and not shower.done():
                if not follow and (explained >= set(final_version) or asyncio.get_running_loop().time() > deadline):
                    break
                await asyncio.sleep(0.5)
            shower.cancel()
            if worker_proc.poll() is not None:
                fail(f"worker exited with code {worker_proc.returncode}; see {settings.data.data_dir / 'logs/worker.log'}")
        console.print(f"{len(events)} events from {len(final_version)} users -> {stats['fast']} fast-path and "
                      f"{stats['slow']} slow-path recommendations; {len(explained)}/{len(final_version)} users "
                      "have a rationale for their final window")
    finally:
        await producer.stop()
        await consumer.stop()


