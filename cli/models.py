"""Student commands: ``distill`` (a new registry version) and ``models list|promote|rollback|publish``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.base import NO_PUBLISH_HELP, cli, console, fail, load_settings, progress_bar, quiet_kafka_log


# --- distill ---------------------------------------------------------------------------------------------
@cli.command()
def distill(
    records: Annotated[Path, typer.Argument(help="rationale records (.jsonl, RationaleRecord per line)")],
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory (default <data_dir>/registry)")] = None,
    version: Annotated[Optional[str], typer.Option(help="name of the new version (default: the next v<NNNN>)")] = None,
    resume_from: Annotated[Optional[str], typer.Option(help="registry version or adapter directory to continue training")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="make the new version the registry's CURRENT one and "
                                                            "tell the running workers to hot-swap to it")] = False,
    no_publish: Annotated[bool, typer.Option("--no-publish", help="with --promote: " + NO_PUBLISH_HELP)] = False,
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

    from retrain.distill import ATTENTION_MODULES, MLP_MODULES, DistillConfig
    from retrain.distill import distill as run_distill

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
        fail(str(exc), 2)
    settings = load_settings()
    with progress_bar() as progress:
        task = progress.add_task("distilling", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"distilling (loss {loss:.3f})")

        try:
            result = run_distill(records, settings, registry=registry, config=config, resume_from=resume_from,
                                 version=version, data_version=data_version, promote=promote, on_step=on_step)
        except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
            fail(str(exc), 2)
    m = result.manifest["metrics"]
    val = (f"{m['val_nll_before']:.3f} -> {m['val_nll_after']:.3f}" if m["val_nll_before"] is not None
           else "n/a (no validation records)")
    console.print(f"{result.version}: {result.steps} steps on {result.train_examples} examples "
                  f"({result.steps_per_s:.2f} steps/s); train loss {m['train_loss_first']:.3f} -> "
                  f"{m['train_loss_last']:.3f}; val NLL {val}")
    console.print(f"adapter: {result.adapter_dir}; model version {result.model_version}"
                  + ("; promoted to CURRENT" if promote else f"; promote it with `slimstream models promote {result.version}`"))
    if promote and not no_publish:
        _announce(open_registry(registry), "promote", "distill")


# --- models (the adapter registry) -----------------------------------------------------------------------
models_cli = typer.Typer(no_args_is_help=True, help="Distilled student versions (the registry): list, promote, rollback, publish.")
cli.add_typer(models_cli, name="models")


def open_registry(path: Optional[Path]):  # type: ignore[no-untyped-def]
    from streams.registry import ModelRegistry

    return ModelRegistry(path) if path is not None else ModelRegistry.for_settings(load_settings())


@models_cli.command("list")
def models_list(
    registry: Annotated[Optional[Path], typer.Option(help="model registry directory")] = None,
) -> None:
    """Every version with its parent, data and validation NLL; * marks CURRENT."""
    reg = open_registry(registry)
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

    settings = load_settings()
    update = model_update_for(reg, settings, action, reason)  # type: ignore[arg-type]
    try:
        with quiet_kafka_log():
            publish_model_update_sync(settings, update)
    except KafkaError as exc:
        fail(f"CURRENT is {update.version or 'the base model'} in {reg.root}, but the model update was not "
              f"published to Kafka at {settings.kafka.bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS): "
              f"{str(exc) or type(exc).__name__}; running workers keep their version until they restart or "
              "`slimstream models publish` succeeds")
    console.print(f"published model update {update.event_id} to {settings.kafka.topic_model_updates!r}: "
                  f"{update.model_version}")


def add_switch_commands(group: typer.Typer, open_fn, *, label: str, none: str) -> None:  # type: ignore[no-untyped-def]
    """``promote`` / ``rollback`` / ``publish`` on ``group`` for the registry ``open_fn(path)`` opens (the
    students' here, the rankers' in :mod:`cli.rankers`); ``label`` names CURRENT in the output, ``none`` what
    serves when nothing is promoted."""

    @group.command("promote")
    def promote(
        version: Annotated[str, typer.Argument(help="registry version")],
        registry: Annotated[Optional[Path], typer.Option(help="registry directory")] = None,
        no_publish: Annotated[bool, typer.Option("--no-publish", help=NO_PUBLISH_HELP)] = False,
        reason: Annotated[str, typer.Option(help="recorded in the history and the update")] = "cli",
    ) -> None:
        """Make VERSION the registry's CURRENT one and tell the running workers to hot-swap to it."""
        reg = open_fn(registry)
        try:
            reg.promote(version, reason=reason)
        except (KeyError, ValueError) as exc:
            fail(str(exc).strip("'\""), 2)
        console.print(f"{label}: {version}")
        if not no_publish:
            _announce(reg, "promote", reason)

    @group.command("rollback")
    def rollback(
        registry: Annotated[Optional[Path], typer.Option(help="registry directory")] = None,
        no_publish: Annotated[bool, typer.Option("--no-publish", help=NO_PUBLISH_HELP)] = False,
        reason: Annotated[str, typer.Option(help="recorded in the history and the update")] = "cli",
    ) -> None:
        """Make CURRENT the version that was current before the last promote; workers swap."""
        reg = open_fn(registry)
        try:
            version = reg.rollback(reason=reason)
        except LookupError as exc:
            fail(str(exc).strip("'\""), 2)
        console.print(f"{label}: {version or none}")
        if not no_publish:
            _announce(reg, "rollback", reason)

    @group.command("publish")
    def publish(
        registry: Annotated[Optional[Path], typer.Option(help="registry directory")] = None,
        reason: Annotated[str, typer.Option(help="sent with the update")] = "republish",
    ) -> None:
        """Announce the registry's CURRENT to the running workers again (after --no-publish or a failed publish)."""
        reg = open_fn(registry)
        history = reg.history()
        action = "rollback" if history and history[-1].get("action") == "rollback" else "promote"
        console.print(f"{label}: {reg.current() or none}")
        _announce(reg, action, reason)


add_switch_commands(models_cli, open_registry, label="CURRENT", none="none (the base model)")
