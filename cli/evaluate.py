"""``slimstream evaluate``: the offline evaluation harness."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.base import cli, console, fail, load_settings, progress_bar


# --- evaluate --------------------------------------------------------------------------------------------
@cli.command()
def evaluate(
    data: Annotated[Optional[str], typer.Option(help="ml-1m, ml-100k or a directory (default: SLIMSTREAM_DATASET)")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated: random, popularity, item-knn, sasrec, sasrec-tuned, "
                                               "text-mean, slim-{base,distilled,teacher}, "
                                               "sasrec+slim-{base,distilled,teacher}, sasrec+text-mean, "
                                               "slim-id-{base,distilled,teacher}, slim-text-{base,distilled,teacher,none}, slim-idtext-{base,distilled,teacher,none}, "
                                               "served (the ranker registry's version, scored as a worker serves it)")]
        = "random,popularity,item-knn,sasrec,text-mean",
    sample_users: Annotated[int, typer.Option(min=0, help="seeded user sample reported separately (0: all users)")] = 1000,
    limit_users: Annotated[Optional[int], typer.Option(min=1, help="keep only this many (seeded) users: a quick slice")] = None,
    seed: Annotated[int, typer.Option(help="seed of the user sample, the sampled negatives and SASRec")] = 0,
    out: Annotated[Path, typer.Option(help="reports directory; the run goes to OUT/RUN/")] = Path("reports"),
    run: Annotated[Optional[str], typer.Option(help="run name (default: <data>-<UTC time>)")] = None,
    sasrec_epochs: Annotated[int, typer.Option(min=1, help="SASRec epoch cap (early stopping on validation NDCG@10)")] = 30,
    sasrec_minutes: Annotated[float, typer.Option(min=0.05, help="SASRec training-time budget")] = 7.0,
    threads: Annotated[int, typer.Option(min=0, help="torch threads for SASRec (0: torch's default, all cores)")] = 1,
    patience: Annotated[int, typer.Option(min=1, help="SASRec: validation checks without improvement before stopping")] = 5,
    checkpoints: Annotated[Optional[Path], typer.Option(help="SASRec checkpoint directory, resumed after an interruption "
                                                             "(default: <data_dir>/checkpoints)")] = None,
    bootstrap: Annotated[bool, typer.Option(help="bootstrap confidence intervals instead of the normal approximation")] = False,
    adapter: Annotated[Optional[Path], typer.Option(help="LoRA adapter of the distilled student (default: the registry's CURRENT)")] = None,
    ranker: Annotated[Optional[str], typer.Option(help="the served method's ranker version (default: the ranker registry's CURRENT)")] = None,
    cold_items: Annotated[Optional[float], typer.Option(min=0.001, max=0.9, help="item cold start: withhold this seeded "
                                                        "fraction of the items from training and validation")] = None,
) -> None:
    """Offline evaluation: leave-one-out, full and sampled-100 ranking, HR/NDCG/coverage/popularity with 95% CIs.

    Writes OUT/RUN/results.json, results.md and PNG plots.
    """
    from models.sasrec import SASRecConfig
    from evaluation.harness import BUILTIN_METHODS, run_evaluation

    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in BUILTIN_METHODS]
    if not names or unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown) or '(none)'}; expected some of "
                                 f"{', '.join(BUILTIN_METHODS)}", param_hint="--methods")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise typer.BadParameter(f"not a LoRA adapter directory: {adapter}", param_hint="--adapter")
    settings = load_settings()
    source = data or settings.data.dataset
    config = SASRecConfig(time_budget_s=sasrec_minutes * 60, threads=threads or None, patience=patience,
                          checkpoint_dir=str(checkpoints or settings.data.data_dir / "checkpoints"))
    with progress_bar() as progress:
        task = progress.add_task("evaluating", total=None)
        try:
            result = run_evaluation(
                source, names, sample_users=sample_users or None, seed=seed, out_dir=out, sasrec_epochs=sasrec_epochs,
                run_name=run, limit_users=limit_users, sasrec_config=config,
                ci="bootstrap" if bootstrap else "normal", settings=settings, adapter_dir=adapter, ranker_version=ranker,
                cold_items=cold_items, keep_going=True,
                progress=lambda message, done, total: progress.update(task, description=message, completed=done,
                                                                      total=total))
        except (ValueError, FileNotFoundError) as exc:  # unknown source, malformed files, too few users
            fail(str(exc), 2)
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


