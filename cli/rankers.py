"""Ranker commands: ``train-ranker`` (a new ranker registry version) and ``rankers list|promote|rollback``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.base import NO_PUBLISH_HELP, cli, console, fail, load_settings
from cli.models import _announce, add_switch_commands

ITEMS_HELP = "id: SASRec item IDs (SLIM ID-based); text: projected item text (ID-agnostic); id+text: both"


def open_rankers(path: Optional[Path]):  # type: ignore[no-untyped-def]
    from streams.registry import ModelRegistry

    if path is not None:
        return ModelRegistry(path, artifact="weights.pt", kind="ranker")
    return ModelRegistry.rankers_for_settings(load_settings())


def _figures(manifest: dict) -> str:
    m = manifest.get("metrics") or {}
    served, pop = m.get("served") or {}, m.get("popularity") or {}
    return (f"NDCG@10 {served.get('NDCG@10', float('nan')):.4f} HR@10 {served.get('HR@10', float('nan')):.4f} "
            f"(popularity {pop.get('NDCG@10', float('nan')):.4f}) on {m.get('users', '?')} users")


@cli.command("train-ranker")
def train_ranker(
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default: SLIMSTREAM_DATASET)")] = None,
    items: Annotated[str, typer.Option(help=ITEMS_HELP)] = "id",
    minutes: Annotated[float, typer.Option(min=0.1, help="training time budget")] = 30.0,
    epochs: Annotated[int, typer.Option(min=1, help="upper bound; early stopping usually ends sooner")] = 200,
    patience: Annotated[int, typer.Option(min=1, help="validation checks without improvement before stopping")] = 5,
    max_len: Annotated[Optional[int], typer.Option(min=2, help="history the model reads (default: SLIMSTREAM_WINDOW_SIZE, what a worker holds)")] = None,
    limit_users: Annotated[Optional[int], typer.Option(min=10, help="a seeded slice of the users (quick runs)")] = None,
    rationale_users: Annotated[int, typer.Option(min=0, help="seeded users whose training prefix gets a base-student "
                                                              "rationale as the model's input (0: no rationale input)")] = 0,
    seed: Annotated[int, typer.Option()] = 0,
    version: Annotated[Optional[str], typer.Option(help="name of the new version (default: the next v<NNNN>)")] = None,
    promote: Annotated[bool, typer.Option("--promote", help="make it CURRENT if it passes the gate and tell the workers")] = False,
    no_publish: Annotated[bool, typer.Option("--no-publish", help="with --promote: " + NO_PUBLISH_HELP)] = False,
    checkpoints: Annotated[Optional[Path], typer.Option(help="checkpoint directory (default <data_dir>/checkpoints)")] = None,
) -> None:
    """Train a ranker on a dataset, score it through the serving code, gate it, publish it as a registry version."""
    from retrain.ranker import RankerSpec
    from retrain.ranker import train_ranker as run

    if items not in ("id", "text", "id+text"):
        raise typer.BadParameter(f"{items!r}: expected id, text or id+text", param_hint="--items")
    settings = load_settings()
    source = data or settings.data.dataset
    spec = RankerSpec(items=items, max_len=max_len, epochs=epochs, minutes=minutes, patience=patience, seed=seed,  # type: ignore[arg-type]
                      limit_users=limit_users, rationale_users=rationale_users,
                      checkpoint_dir=str(checkpoints or settings.data.data_dir / "checkpoints"))
    try:
        result = run(settings, source, spec, promote=promote, version=version,
                     progress=lambda msg: console.print(msg, highlight=False))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        fail(str(exc), 2)
    t = result.manifest["training"]
    console.print(f"{result.version}: {_figures(result.manifest)}; {t['epochs']} epochs in {t['seconds']:.0f} s "
                  f"(best {t['best_epoch']}, {t['stopped_by']})")
    if promote and not result.promoted:
        fail(f"{result.version} published but not promoted: {result.reason}")
    console.print("promoted to CURRENT" if result.promoted else
                  f"promote it with `slimstream rankers promote {result.version}`")
    if result.promoted and not no_publish:
        _announce(open_rankers(None), "promote", "train-ranker")


rankers_cli = typer.Typer(no_args_is_help=True, help="Trained ranker versions (<registry>/rankers): list, promote, rollback, publish.")
cli.add_typer(rankers_cli, name="rankers")


@rankers_cli.command("list")
def rankers_list(registry: Annotated[Optional[Path], typer.Option(help="ranker registry directory")] = None) -> None:
    """Every ranker version with its data and served figures; * marks CURRENT."""
    reg = open_rankers(registry)
    current = reg.current()
    for v in reg.list_versions():
        m = reg.get(v)
        console.print(f"{'*' if v == current else ' '} {v}  {m.get('name')}  data={m.get('dataset')}  {_figures(m)}")
    if current is None:
        console.print("(no CURRENT ranker: workers serve the text ranker)")


add_switch_commands(rankers_cli, open_rankers, label="CURRENT ranker", none="none (the text ranker)")
