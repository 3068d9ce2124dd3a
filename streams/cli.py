"""``slimstream``: the command line. Thin: each command wires settings to the modules that do the work.

A bad argument prints one line (``slimstream: error: ...``) and exits with code 2.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer
from aiokafka.errors import KafkaConnectionError
from typer._click import exceptions as click_exc  # typer >= 0.29 vendors click
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streams.settings import Settings, get_settings

_NO_PUBLISH_HELP = "change the registry only (offline); running workers switch at their next start"

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="slimstream: SLIM rationales as a streaming recommender.")
console = Console(stderr=False)


def _fail(message: str, code: int = 1) -> None:
    print(f"slimstream: error: {' '.join(message.split())}", file=sys.stderr)
    raise typer.Exit(code)


# --- worker ----------------------------------------------------------------------------------------------
@cli.command()
def worker(
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run the stream worker (Faust agents) against KAFKA_BOOTSTRAP_SERVERS."""
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    from streams.topics import ensure_topics

    settings = get_settings()
    asyncio.run(ensure_topics(settings))
    from faust.worker import Worker

    import agents  # noqa: F401  (registers the agents)
    from streams.app import app

    code = 0
    try:
        Worker(app, loglevel=log_level.lower(), quiet=True).execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Faust has stopped every service and flushed the producer. A model call may still be running in a
    # pool thread (threads cannot be interrupted); its request was not acknowledged and will be redelivered,
    # so exit now instead of letting the interpreter join that thread.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# --- index-items -----------------------------------------------------------------------------------------
@cli.command("index-items")
def index_items(
    items: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k, or an items .csv/.jsonl file or dir")] = None,
) -> None:
    """Embed the item catalogue into Qdrant (idempotent: unchanged items are not re-embedded)."""
    settings = get_settings()
    report = _index(settings, items or settings.dataset)
    console.print(f"items: {report.total} total, {report.embedded} embedded, {report.unchanged} unchanged, "
                  f"{report.removed} removed")


def _index(settings: Settings, source: str):  # type: ignore[no-untyped-def]
    from models.encoder import load_encoder
    from streams.datasets import load_items
    from vectorstore.catalogue import index_catalogue
    from vectorstore.store import VectorStore

    try:
        catalogue = load_items(source)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc), 2)
    encoder = load_encoder(settings)
    store = VectorStore(settings)
    try:
        store.ensure_collections(encoder.dim)
        with _progress() as progress:
            task = progress.add_task("embedding items", total=len(catalogue))
            return index_catalogue(store, encoder, catalogue,
                                   progress=lambda done, total: progress.update(task, completed=done, total=total))
    finally:
        store.close()


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


# --- produce ---------------------------------------------------------------------------------------------
@cli.command()
def produce(
    file: Annotated[Path, typer.Argument(help="InteractionEvents as .jsonl or .csv")],
    rate: Annotated[Optional[float], typer.Option(min=0.01, help="events per second (default: unthrottled)")] = None,
) -> None:
    """Publish interaction events from a file to the interactions topic, keyed by user_id."""
    from streams.replay import publish_events, read_event_file

    if not file.is_file():
        raise typer.BadParameter(f"no such file: {file}", param_hint="FILE")
    if file.suffix.lower() not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise typer.BadParameter(f"unsupported extension {file.suffix!r} (use .jsonl or .csv)", param_hint="FILE")
    settings = get_settings()
    good, bad = [], 0
    for line, ev in read_event_file(file):
        if isinstance(ev, str):
            bad += 1
            print(f"{file}:{line}: skipped: {ev}", file=sys.stderr)
        else:
            good.append(ev)

    sent = publish_events(settings, good, rate)
    console.print(f"sent {sent} events to {settings.topic_interactions!r}; {bad} invalid lines skipped")
    if bad:
        raise typer.Exit(1)


# --- replay ----------------------------------------------------------------------------------------------
@cli.command()
def replay(
    users: Annotated[int, typer.Option(min=1, help="dataset users whose history is replayed")] = 8,
    rate: Annotated[float, typer.Option(min=0.01, help="events per second")] = 5.0,
    max_events: Annotated[int, typer.Option(min=1, help="events in all (max_events / users per user)")] = 400,
    seed: Annotated[int, typer.Option(help="user sample seed")] = 7,
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default SLIMSTREAM_DATASET)")] = None,
) -> None:
    """Publish a seeded sample of a dataset's users' interactions, in time order, to the interactions topic."""
    from streams.replay import publish_events, sample_replay

    settings = get_settings()
    try:
        events = sample_replay(data or settings.dataset, users, max_events, seed)
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"--data: {exc}", 2)

    sent = publish_events(settings, events, rate)
    console.print(f"sent {sent} events of {len({e.user_id for e in events})} users to {settings.topic_interactions!r}")


# --- topics ----------------------------------------------------------------------------------------------
@cli.command()
def topics(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the broker")] = 60.0,
) -> None:
    """Create the app's topics up front (partition counts from settings) and check existing ones match."""
    _create_topics(get_settings(), timeout)


def _create_topics(settings: Settings, timeout: float) -> None:
    from streams.topics import TopicMismatch, ensure_topics, topic_specs

    try:
        counts = asyncio.run(ensure_topics(settings, timeout=timeout))
    except TopicMismatch as exc:
        _fail(str(exc))
    for spec in topic_specs(settings):
        console.print(f"{spec.name}: {counts[spec.name]} partition(s){' (compacted)' if spec.compacted else ''}"
                      f" - {spec.purpose}")


# --- init ------------------------------------------------------------------------------------------------
@cli.command()
def init(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the broker")] = 60.0,
) -> None:
    """One-shot deployment set-up: create the topics, then index the catalogue (SLIMSTREAM_DATASET) into Qdrant.
    Idempotent: run it before the workers on every deploy."""
    settings = get_settings()
    _create_topics(settings, timeout)
    report = _index(settings, settings.dataset)
    console.print(f"catalogue {settings.dataset}: {report.total} items ({report.embedded} embedded now, "
                  f"{report.unchanged} unchanged, {report.removed} removed)")


# --- export-student --------------------------------------------------------------------------------------
@cli.command("export-student")
def export_student(
    out: Annotated[Path, typer.Argument(help="directory to write the Hugging Face-format student into")],
    if_missing: Annotated[bool, typer.Option("--if-missing", help="do nothing when OUT already holds an export")] = False,
) -> None:
    """Write the base student as a Hugging Face model directory (safetensors, config, tokenizer, chat template),
    the format vLLM serves; registry adapters are LoRA adapters for exactly these weights."""
    from models.student import export_base_model

    settings = get_settings()
    if if_missing and (out / "config.json").is_file():
        console.print(f"{out} already holds an export; nothing to do")
        return
    try:
        path = export_base_model(settings, out)
    except (FileNotFoundError, FileExistsError) as exc:
        _fail(str(exc))
    console.print(f"student {settings.student_model_version} written to {path}")


# --- tail ------------------------------------------------------------------------------------------------
@cli.command()
def tail(
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest message")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print raw JSON lines")] = False,
    limit: Annotated[Optional[int], typer.Option(min=1, help="stop after this many messages")] = None,
) -> None:
    """Print the recommendations topic as it arrives."""
    settings = get_settings()
    asyncio.run(_tail(settings, from_beginning, as_json, limit))


async def _tail(settings: Settings, from_beginning: bool, as_json: bool, limit: int | None) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.events import Recommendation

    consumer = AIOKafkaConsumer(settings.topic_recommendations, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest" if from_beginning else "latest",
                                enable_auto_commit=False, group_id=None)
    try:
        await consumer.start()
    except KafkaConnectionError:
        await consumer.stop()
        raise
    n = 0
    try:
        async for msg in consumer:
            if as_json:
                print(msg.value.decode(), flush=True)
            else:
                show_recommendation(Recommendation.model_validate_json(msg.value))
            n += 1
            if limit and n >= limit:
                break
    finally:
        await consumer.stop()


def show_recommendation(rec, out: Console | None = None) -> None:  # type: ignore[no-untyped-def]
    out = out or console
    top = ", ".join(f"{i.title} ({i.score:.2f})" for i in rec.items[:5])
    head = (f"[bold]{rec.user_id}[/] v{rec.window_version} [{'green' if rec.path == 'slow' else 'cyan'}]"
            f"{rec.path.value}[/] {'current' if rec.rationale_current else 'previous'} rationale")
    if rec.path.value == "slow" and rec.rationale:
        out.print(Panel(f"[bold]Top:[/] {top}\n\n{rec.rationale}", title=head, title_align="left",
                        subtitle=rec.rationale_model_version or "", subtitle_align="right"))
    else:
        out.print(f"{head}: {top}")


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
) -> None:
    """Run everything on this machine: Tansu broker, Qdrant local mode, catalogue, worker, and a replay.

    Stops by itself once every replayed user has a recommendation with a rationale for their final window
    (or after --wait seconds), unless --follow is given; Ctrl-C stops everything at any time.
    """
    from streams.broker import EmbeddedBroker, stop_process

    base = get_settings()
    base.data_dir.mkdir(parents=True, exist_ok=True)
    logs = base.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    broker = EmbeddedBroker(port=port, log_path=logs / "tansu.log")
    worker_proc: subprocess.Popen[bytes] | None = None
    try:
        console.print(f"starting Tansu broker on {broker.host}:{broker.port} ...")
        broker.start()
        settings = base.model_copy(update={"kafka_bootstrap_servers": broker.bootstrap_servers})
        from streams.topics import ensure_topics

        asyncio.run(ensure_topics(settings))
        report = _index(settings, settings.dataset)
        console.print(f"catalogue {settings.dataset}: {report.total} items ({report.embedded} embedded now)")
        # up replays MovieLens' 2000-2003 interactions: the worker must admit historical timestamps.
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
               "SLIMSTREAM_DATA_DIR": str(settings.data_dir), "SLIMSTREAM_EVENT_TIME_MODE": "replay"}
        worker_log = open(logs / "worker.log", "ab")
        worker_proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], env=env,
                                       stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        console.print(f"worker started (pid {worker_proc.pid}, log {logs / 'worker.log'}); Ctrl-C stops everything")
        asyncio.run(_replay_and_show(settings, users, rate, max_events, seed, worker_proc, follow, wait))
    except KeyboardInterrupt:
        console.print("\nstopping ...")
    finally:
        if worker_proc is not None:
            stop_process(worker_proc, 20.0)
        broker.stop()
        console.print("stopped: broker and worker are down")


async def _replay_and_show(settings: Settings, users: int, rate: float, max_events: int, seed: int,
                           worker_proc: subprocess.Popen[bytes], follow: bool, wait: float) -> None:
    from aiokafka import AIOKafkaConsumer

    from streams.events import Recommendation
    from streams.replay import publish, sample_replay, start_producer

    events = sample_replay(settings.dataset, users, max_events, seed)
    final_version = dict(Counter(ev.user_id for ev in events))  # distinct events: window version = count
    explained: set[str] = set()
    consumer = AIOKafkaConsumer(settings.topic_recommendations, bootstrap_servers=settings.kafka_bootstrap_servers,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    producer = await start_producer(settings)
    stats = {"fast": 0, "slow": 0}
    try:
        with _progress() as progress:
            sent_task = progress.add_task(f"replaying {users} users", total=len(events))
            slow_task = progress.add_task("rationales (slow path)", total=None)

            async def show() -> None:
                async for msg in consumer:
                    rec = Recommendation.model_validate_json(msg.value)
                    stats[rec.path.value] += 1
                    if rec.path.value == "slow":
                        progress.update(slow_task, advance=1)
                        if rec.rationale_window_version == final_version.get(rec.user_id):
                            explained.add(rec.user_id)
                    show_recommendation(rec, progress.console)

            shower = asyncio.create_task(show())
            await publish(producer, settings.topic_interactions, events, rate,
                          on_sent=lambda ev: progress.update(sent_task, advance=1))
            progress.update(sent_task, description="replay done; waiting for rationales")
            deadline = asyncio.get_running_loop().time() + wait
            while worker_proc.poll() is None and not shower.done():
                if not follow and (explained >= set(final_version) or asyncio.get_running_loop().time() > deadline):
                    break
                await asyncio.sleep(0.5)
            shower.cancel()
            if worker_proc.poll() is not None:
                _fail(f"worker exited with code {worker_proc.returncode}; see {settings.data_dir / 'logs/worker.log'}")
        console.print(f"{len(events)} events from {len(final_version)} users -> {stats['fast']} fast-path and "
                      f"{stats['slow']} slow-path recommendations; {len(explained)}/{len(final_version)} users "
                      "have a rationale for their final window")
    finally:
        await producer.stop()
        await consumer.stop()


# --- distill ---------------------------------------------------------------------------------------------
@cli.command()
def distill(
    records: Annotated[Path, typer.Argument(help="rationale records (.jsonl, RationaleRecord per line)")],
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory (default <data_dir>/registry)")] = None,
    version: Annotated[Optional[str], typer.Option(help="name of the new version (default: the next v<NNNN>)")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="registry version or adapter directory to continue training")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="make the new version the registry's CURRENT one and "
                                                            "tell the running workers to hot-swap to it")] = False,
    no_publish: Annotated[bool, typer.Option("--no-publish", help="with --promote: " + _NO_PUBLISH_HELP)] = False,
    lora_r: Annotated[int, typer.Option(min=1)] = 8,
    lora_alpha: Annotated[int, typer.Option(min=1)] = 16,
    lora_dropout: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.05,
    target_modules: Annotated[str, typer.Option(help="'attention' (q,k,v,o), 'all' (+ gate,up,down) or comma-separated names")] = "attention",
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 2e-4,
    epochs: Annotated[float, typer.Option(help="ignored when --max-steps is set")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="optimizer steps")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    grad_accum: Annotated[int, typer.Option(min=1)] = 1,
    max_seq_len: Annotated[int, typer.Option(min=32, help="prompt + rationale tokens")] = 1024,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.99, help="held-out users' share of the records")] = 0.1,
    seed: Annotated[int, typer.Option()] = 0,
    data_version: Annotated[Optional[str], typer.Option(help="data label for the manifest (default: the records' dataset_version)")] = None,
) -> None:
    """LoRA-distil teacher rationales into the student and publish the adapter as a registry version."""
    from pydantic import ValidationError

    from retrain.distill import ATTENTION_MODULES, MLP_MODULES, DistillConfig, distill as run_distill

    if not records.is_file():
        raise typer.BadParameter(f"no such file: {records}", param_hint="RECORDS")
    named = {"attention": ATTENTION_MODULES, "all": ATTENTION_MODULES + MLP_MODULES}
    modules = named.get(target_modules) or tuple(m.strip() for m in target_modules.split(",") if m.strip())
    try:
        config = DistillConfig(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                               target_modules=modules, lr=lr, epochs=epochs, max_steps=max_steps,
                               batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len,
                               val_fraction=val_fraction, seed=seed)
    except ValidationError as exc:
        _fail(str(exc), 2)
    settings = get_settings()
    with _progress() as progress:
        task = progress.add_task("distilling", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"distilling (loss {loss:.3f})")

        try:
            result = run_distill(records, settings, registry=registry, config=config, resume_from=resume_from,
                                 version=version, data_version=data_version, promote=promote, on_step=on_step)
        except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
            _fail(str(exc), 2)
    m = result.manifest["metrics"]
    val = (f"{m['val_nll_before']:.3f} -> {m['val_nll_after']:.3f}" if m["val_nll_before"] is not None
           else "n/a (no validation records)")
    console.print(f"{result.version}: {result.steps} steps on {result.train_examples} examples "
                  f"({result.steps_per_s:.2f} steps/s); train loss {m['train_loss_first']:.3f} -> "
                  f"{m['train_loss_last']:.3f}; val NLL {val}")
    console.print(f"adapter: {result.adapter_dir}; model version {result.model_version}"
                  + ("; promoted to CURRENT" if promote else f"; promote it with `slimstream models promote {result.version}`"))
    if promote and not no_publish:
        _announce(_registry(registry), "promote", "distill")


# --- models (the adapter registry) -----------------------------------------------------------------------
models_cli = typer.Typer(no_args_is_help=True, help="Distilled student versions (the registry): list, promote, rollback, publish.")
cli.add_typer(models_cli, name="models")


def _registry(path: Optional[Path]):  # type: ignore[no-untyped-def]
    from retrain.registry import ModelRegistry

    return ModelRegistry(path) if path is not None else ModelRegistry.for_settings(get_settings())


@models_cli.command("list")
def models_list(
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory")] = None,
) -> None:
    """Every version with its parent, data and validation NLL; * marks CURRENT."""
    reg = _registry(registry)
    current = reg.current()
    for v in reg.list_versions():
        m = reg.get(v)
        nll = m.get("metrics", {}).get("val_nll_after")
        console.print(f"{'*' if v == current else ' '} {v}  parent={m.get('parent_version')}  "
                      f"data={m.get('data', {}).get('version')}  val_nll={'n/a' if nll is None else f'{nll:.3f}'}  "
                      f"created={m.get('created_at')}")
    if current is None:
        console.print("(no CURRENT version: the base model)")


def _announce(reg, action: str, reason: str) -> None:  # type: ignore[no-untyped-def]
    """Publish the registry's new state as a ModelUpdate; a broker failure is one line and exit 1, the
    registry change stays (the registry is the source of truth; `models publish` re-announces it)."""
    from aiokafka.errors import KafkaError

    from streams.model_updates import model_update_for, publish_model_update_sync

    settings = get_settings()
    update = model_update_for(reg, settings, action, reason)  # type: ignore[arg-type]
    kafka_log = logging.getLogger("aiokafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # its per-attempt connection errors: the one line below says it
    try:
        publish_model_update_sync(settings, update)
    except KafkaError as exc:
        _fail(f"CURRENT is {update.version or 'the base model'} in {reg.root}, but the model update was not "
              f"published to Kafka at {settings.kafka_bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS): "
              f"{str(exc) or type(exc).__name__}; running workers keep their student until they restart or "
              "`slimstream models publish` succeeds")
    finally:
        kafka_log.setLevel(level)
    console.print(f"published model update {update.event_id} to {settings.topic_model_updates!r}: "
                  f"{update.model_version}")


@models_cli.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="registry version")],
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory")] = None,
    no_publish: Annotated[bool, typer.Option("--no-publish", help=_NO_PUBLISH_HELP)] = False,
    reason: Annotated[str, typer.Option(help="recorded in the history and the update")] = "cli",
) -> None:
    """Make VERSION the registry's CURRENT one and tell the running workers to hot-swap to it."""
    reg = _registry(registry)
    try:
        reg.promote(version, reason=reason)
    except (KeyError, ValueError) as exc:
        _fail(str(exc).strip("'\""), 2)
    console.print(f"CURRENT: {version}")
    if not no_publish:
        _announce(reg, "promote", reason)


@models_cli.command("rollback")
def models_rollback(
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory")] = None,
    no_publish: Annotated[bool, typer.Option("--no-publish", help=_NO_PUBLISH_HELP)] = False,
    reason: Annotated[str, typer.Option(help="recorded in the history and the update")] = "cli",
) -> None:
    """Make CURRENT the version that was current before the last promote (or the base model); workers swap."""
    reg = _registry(registry)
    try:
        version = reg.rollback(reason=reason)
    except LookupError as exc:
        _fail(str(exc).strip("'\""), 2)
    console.print(f"CURRENT: {version or 'none (the base model)'}")
    if not no_publish:
        _announce(reg, "rollback", reason)


@models_cli.command("publish")
def models_publish(
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory")] = None,
    reason: Annotated[str, typer.Option(help="sent with the update")] = "republish",
) -> None:
    """Announce the registry's CURRENT to the running workers again (after --no-publish or a failed publish)."""
    reg = _registry(registry)
    history = reg.history()
    action = "rollback" if history and history[-1].get("action") == "rollback" else "promote"
    console.print(f"CURRENT: {reg.current() or 'none (the base model)'}")
    _announce(reg, action, reason)


# --- serve-teacher ---------------------------------------------------------------------------------------
@cli.command("serve-teacher")
def serve_teacher(
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port")] = 8000,
    host: Annotated[str, typer.Option(help="bind address (0.0.0.0 in a container)")] = "127.0.0.1",
    teacher: Annotated[str, typer.Option(help="embedded teacher: 0.5b or 1.5b (scripts/install-teacher.sh)")] = "0.5b",
    gguf: Annotated[Optional[Path], typer.Option(help="serve this GGUF file instead of the embedded teacher")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="model id clients send (default: the teacher's or the GGUF's name)")] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, help="generations running at once")] = 1,
    max_queue: Annotated[int, typer.Option(min=0, help="requests waiting for a slot; more get 503 + Retry-After")] = 8,
    max_tokens_default: Annotated[int, typer.Option(min=1, help="completion tokens when a request names none")] = 256,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch threads (default SLIMSTREAM_STUDENT_THREADS)")] = None,
    backend: Annotated[str, typer.Option(help="transformers, or llamacpp (~6x faster; the slimstream[llamacpp] extra)")] = "transformers",
    api_key: Annotated[Optional[str], typer.Option(envvar="SLIMSTREAM_SERVE_API_KEY", show_default=False,
                                                   help="require this bearer token on /v1")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Serve the offline teacher (or any GGUF chat model) as an OpenAI-compatible API on /v1."""
    if teacher not in ("0.5b", "1.5b"):
        raise typer.BadParameter(f"unknown teacher {teacher!r}: 0.5b or 1.5b", param_hint="--teacher")
    if log_level.lower() not in {"debug", "info", "warning", "error"}:
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    if gguf is not None and not gguf.is_file():
        raise typer.BadParameter(f"no such file: {gguf}", param_hint="--gguf")
    if backend not in ("transformers", "llamacpp"):
        raise typer.BadParameter(f"unknown backend {backend!r}: transformers or llamacpp", param_hint="--backend")
    from models.serving import api_server

    argv = ["--host", host, "--port", str(port), "--teacher", teacher, "--max-concurrency", str(max_concurrency),
            "--max-queue", str(max_queue), "--max-tokens-default", str(max_tokens_default),
            "--log-level", log_level.lower(), "--backend", backend]
    if gguf is not None:
        argv += ["--gguf-dir", str(gguf.parent), "--gguf-file", gguf.name]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if threads:
        argv += ["--threads", str(threads)]
    if api_key:
        argv += ["--api-key", api_key]
    try:
        api_server.main(argv)
    except (FileNotFoundError, ValueError) as exc:  # teacher wheels not installed, damaged parts
        _fail(str(exc))


# --- evaluate --------------------------------------------------------------------------------------------
@cli.command()
def evaluate(
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default: SLIMSTREAM_DATASET)")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated: random, popularity, item-knn, sasrec, text-mean, "
                                               "slim-{base,distilled,teacher}, sasrec+slim-{base,distilled,teacher}, "
                                               "sasrec+text-mean")]
        = "random,popularity,item-knn,sasrec,text-mean",
    sample_users: Annotated[int, typer.Option(min=0, help="seeded user sample reported separately (0: all users)")] = 1000,
    limit_users: Annotated[Optional[int], typer.Option(min=1, help="keep only this many (seeded) users: a quick slice")] = None,
    seed: Annotated[int, typer.Option(help="seed of the user sample, the sampled negatives and SASRec")] = 0,
    out: Annotated[Path, typer.Option(help="reports directory; the run goes to OUT/RUN/")] = Path("reports"),
    run: Annotated[Optional[str], typer.Option(help="run name (default: <data>-<UTC time>)")] = None,
    sasrec_epochs: Annotated[int, typer.Option(min=1, help="SASRec epoch cap (early stopping on validation NDCG@10)")] = 30,
    sasrec_minutes: Annotated[float, typer.Option(min=0.05, help="SASRec training-time budget")] = 7.0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads for SASRec (0: torch's default, all cores)")] = 1,
    bootstrap: Annotated[bool, typer.Option(help="bootstrap confidence intervals instead of the normal approximation")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter of the distilled student (default: the registry's CURRENT)")] = None,
) -> None:
    """Offline evaluation: leave-one-out, full and sampled-100 ranking, HR/NDCG/coverage/popularity with 95% CIs.

    Writes OUT/RUN/results.json, results.md and PNG plots.
    """
    from models.sasrec import SASRecConfig
    from retrain.evaluate import BUILTIN_METHODS, run_evaluation

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in BUILTIN_METHODS]
    if not names or unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none)'}; expected some of "
                                 f"{', '.join(BUILTIN_METHODS)}", param_hint="--methods")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise typer.BadParameter(f"not a LoRA adapter directory: {adapter}", param_hint="--adapter")
    settings = get_settings()
    source = data or settings.dataset
    config = SASRecConfig(time_budget_s=sasrec_minutes * 60, threads=threads or None)
    with _progress() as progress:
        task = progress.add_task("evaluating", total=None)
        try:
            result = run_evaluation(
                source, names, sample_users=sample_users or None, seed=seed, out_dir=out, sasrec_epochs=sasrec_epochs,
                run_name=run, limit_users=limit_users, sasrec_config=config,
                ci="bootstrap" if bootstrap else "normal", settings=settings, adapter_dir=adapter, keep_going=True,
                progress=lambda message, done, total: progress.update(task, description=message, completed=done,
                                                                      total=total))
        except (ValueError, FileNotFoundError) as exc:  # unknown source, malformed files, too few users
            _fail(str(exc), 2)
    names_by_key = {m["key"]: m["name"] for m in result["methods"]}
    for population, block in result["results"].items():
        if not block:
            continue
        console.print(f"[bold]{population}[/] ({result['populations'][population]} users): "
                      "HR@10 / NDCG@10, full | sampled-100")
        for key, r in block.items():
            f, s = r["full"], r["sampled"]
            console.print(f"  {names_by_key[key]:<38} {f['HR@10']['mean']:.4f} / {f['NDCG@10']['mean']:.4f} | "
                          f"{s['HR@10']['mean']:.4f} / {s['NDCG@10']['mean']:.4f}")
    console.print(f"report: {result['run_dir']}/results.md ({result['elapsed_s']:.0f} s)")
    for key, error in result["failed"].items():
        print(f"slimstream: error: method {key} failed: {' '.join(error.split())}", file=sys.stderr)
    if result["failed"]:
        raise typer.Exit(1)


# --- teacher-rationales ---------------------------------------------------------------------------------
@cli.command("teacher-rationales")
def teacher_rationales(
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default: SLIMSTREAM_DATASET)")] = None,
    users: Annotated[int, typer.Option(help="seeded training users (a larger N on the same version adds users)")] = 100,
    samples: Annotated[int, typer.Option(help="teacher samples per window; the best by outcome score is kept")] = 4,
    window_size: Annotated[Optional[int], typer.Option(help="items in the prompt window (default: SLIMSTREAM_WINDOW_SIZE)")] = None,
    targets: Annotated[int, typer.Option(help="next training items after the window used to score samples")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the user draw and the teacher's sampling")] = 0,
    temperature: Annotated[float, typer.Option(help="sampling temperature (> 0)")] = 0.8,
    max_tokens: Annotated[Optional[int], typer.Option(help="tokens per rationale (default: SLIMSTREAM_TEACHER_MAX_TOKENS)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="directory of the datasets (default <data_dir>/rationales)")] = None,
    version: Annotated[Optional[str], typer.Option(help="dataset version, the file name (default <data>-<prompt>-<model>)")] = None,
) -> None:
    """Outcome-filtered teacher rationales for training windows: OUT/VERSION.jsonl (+ .meta.json); resumable."""
    import re as _re

    from models.encoder import load_encoder
    from models.teacher import TeacherClient, TeacherConfig, TeacherError
    from retrain.rationales import generate_rationales

    for name, value in (("--users", users), ("--samples", samples), ("--window-size", window_size),
                        ("--targets", targets), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise typer.BadParameter(f"must be at least 1, got {value}", param_hint=name)
    if temperature <= 0:
        raise typer.BadParameter(f"must be > 0, got {temperature}", param_hint="--temperature")
    if version is not None and not _re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise typer.BadParameter("letters, digits, '.', '_' and '-' only", param_hint="--version")
    settings = get_settings()
    source = data or settings.dataset
    out_dir = out or settings.data_dir / "rationales"
    config = TeacherConfig.from_settings(settings)

    async def job(progress: Progress, task) -> object:  # type: ignore[no-untyped-def]
        encoder = await asyncio.to_thread(load_encoder, settings)
        async with TeacherClient(config, cache_dir=settings.data_dir / "teacher-cache") as teacher:
            return await generate_rationales(
                source, teacher=teacher, encoder=encoder, out_dir=out_dir, dataset_version=version, n_users=users,
                samples=samples, window_size=window_size or settings.window_size, n_targets=targets, seed=seed,
                temperature=temperature, max_tokens=max_tokens,
                progress=lambda done, total: progress.update(task, completed=done, total=total))

    def stop(signum: int, frame: object) -> None:
        # SIGTERM (a scheduler stopping the job) like Ctrl-C: the job's clean-up writes the .meta.json counts.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with _progress() as progress:
        task = progress.add_task("teacher rationales", total=None)
        try:
            result = asyncio.run(job(progress, task))
        except TeacherError as exc:
            _fail(f"teacher at {config.teacher_url} (SLIMSTREAM_TEACHER_URL) failed: {exc}")
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc), 2)
    console.print(f"{result.path}: {result.records} records ({result.written} new, {result.skipped} already there"
                  + (f", {result.empty} with only empty samples" if result.empty else "") + "); "
                  f"teacher: {result.teacher_stats['http_requests']} requests, "
                  f"{result.teacher_stats['cache_hits']} cached, ${result.teacher_stats['cost_usd']:.4f}")


# --- retrain ---------------------------------------------------------------------------------------------
@cli.command()
def retrain(
    every: Annotated[Optional[str], typer.Option(help="run a cycle now and then every DURATION (90s, 30m, 1h, 1h30m); "
                                                     "a drift decision on the drift topic wakes it early")] = None,
    data: Annotated[Optional[str], typer.Option(help="offline source instead of the interactions topic: ml-100k, "
                                                    "ml-1m or a directory of interactions + items files")] = None,
    max_events: Annotated[Optional[int], typer.Option(min=1, help="most recent events per cycle (with --data: the "
                                                                  "dataset's last N); default SLIMSTREAM_RETRAIN_MAX_EVENTS")] = None,
    max_users: Annotated[Optional[int], typer.Option(min=2, help="drifted users per cycle (default SLIMSTREAM_RETRAIN_MAX_USERS)")] = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="training steps (default SLIMSTREAM_RETRAIN_MAX_STEPS)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="build and evaluate the candidate, never promote it")] = False,
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory (default <data_dir>/registry)")] = None,
) -> None:
    """Retrain: drifted users' recent events -> teacher rationales -> continue-trained student -> gate -> registry.

    One cycle, or with --every one cycle per period. A candidate that passes the gate is promoted and announced
    to the workers (model-updates topic); a rejected one stays in the registry, unpromoted.
    """
    from models.teacher import TeacherError
    from retrain.cycle import default_publisher, parse_duration, retrain_every, retrain_once

    interval = None
    if every is not None:
        try:
            interval = parse_duration(every)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--every") from None
    if data is not None:
        from streams.datasets import load_items

        try:
            load_items(data)
        except (ValueError, FileNotFoundError) as exc:
            _fail(f"--data: {exc}", 2)
    settings = get_settings()
    if max_steps is not None:
        settings = settings.model_copy(update={"retrain_max_steps": max_steps})
    reg = _registry(registry)
    announce = default_publisher(settings, reg)

    def publish(**update: object) -> None:
        kafka_log = logging.getLogger("aiokafka")
        level = kafka_log.level
        kafka_log.setLevel(logging.CRITICAL)  # its per-attempt connection errors: one line below says it
        try:
            announce(**update)
        finally:
            kafka_log.setLevel(level)

    def say(message: str, style: str = "") -> None:
        import time

        from rich.markup import escape

        text = escape(message) if not style else f"[{style}]{escape(message)}[/]"
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {text}", soft_wrap=True)

    def cycle(reason: object) -> object:
        return retrain_once(settings, data=data, registry=reg, drift_reason=reason,
                            publish=None if dry_run else publish, dry_run=dry_run,
                            max_users=max_users, max_events=max_events, progress=say)

    def show(result) -> None:  # type: ignore[no-untyped-def]
        if result.status == "skipped":
            say(f"skipped: {result.reason}")
            return
        cand, cur = result.candidate_metrics or {}, result.current_metrics or {}
        say(f"{result.version} ({result.status}): NDCG@10 {cand.get('ndcg@10', float('nan')):.4f} vs "
            f"{cur.get('ndcg@10', float('nan')):.4f}, HR@10 {cand.get('hr@10', float('nan')):.4f} vs "
            f"{cur.get('hr@10', float('nan')):.4f} (candidate vs {result.parent_version or 'base'}) on "
            f"{len(result.heldout_users)} held-out users; {result.new_records} new + {result.replay_records} "
            f"replayed records; {result.reason}")
        if result.status == "promoted" and result.publish_error:
            say(f"CURRENT is {result.version}, but the model update was not published ({result.publish_error}); "
                "`slimstream models publish` re-announces it", "yellow")

    if interval is None:
        try:
            show(cycle(None))
        except TeacherError as exc:
            _fail(f"teacher at {settings.teacher_url} (SLIMSTREAM_TEACHER_URL) failed: {exc}")
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        return

    def failed(exc: BaseException) -> None:
        say(f"cycle failed: {' '.join(str(exc).split()) or type(exc).__name__}; next one on schedule", "red")

    say(f"retraining every {every} (and at once on a drift decision, if the drift topic exists); Ctrl-C stops")
    try:
        asyncio.run(retrain_every(interval, cycle, settings, on_result=show, on_error=failed))
    except KeyboardInterrupt:
        # A cycle may be running in a thread (training cannot be interrupted); every registry change is atomic,
        # so leave now instead of waiting for it.
        console.print("stopped")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


# --- schemas ---------------------------------------------------------------------------------------------
@cli.command()
def schemas(out: Annotated[Path, typer.Option(help="directory")] = Path(__file__).parent / "schemas") -> None:
    """Write the JSON Schema of every event contract."""
    from streams.events import SCHEMA_MODELS

    out.mkdir(parents=True, exist_ok=True)
    for name, model in SCHEMA_MODELS.items():
        (out / f"{name}.schema.json").write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
    console.print(f"wrote {len(SCHEMA_MODELS)} schemas to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: click's usage errors become one line and exit code 2."""
    command = typer.main.get_command(cli)
    try:
        result = command.main(args=argv, prog_name="slimstream", standalone_mode=False)
    except click_exc.UsageError as exc:  # includes BadParameter, NoSuchOption, MissingParameter
        message = " ".join(exc.format_message().split())
        print(f"slimstream: error: {message}", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except KafkaConnectionError as exc:
        settings = get_settings()
        print(f"slimstream: error: cannot reach Kafka at {settings.kafka_bootstrap_servers} "
              f"(KAFKA_BOOTSTRAP_SERVERS): {exc}", file=sys.stderr)
        sys.exit(1)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    # Without standalone mode click returns an Exit's code instead of exiting.
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
