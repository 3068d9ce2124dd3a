"""The evaluation report: ``results.md`` (tables per population, cold-start slices, methods, protocol) and the
PNG plots, from the results dict :func:`evaluation.harness.run_evaluation` builds."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

KS = (10, 20)
MAX_CURVE_K = 50
N_NEGATIVES = 100


def finite(obj: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # an estimate
        if v["n"] == 0 or not math.isfinite(v["mean"]):
            return "–"
        if v["mean"] >= 10:
            return f"{v['mean']:.1f} ± {(v['ci_high'] - v['ci_low']) / 2:.1f}"
        return f"{v['mean']:.4f} ± {(v['ci_high'] - v['ci_low']) / 2:.4f}"
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


def markdown(out: dict[str, Any]) -> str:
    names = {m["key"]: m["name"] for m in out["methods"]}
    s = out["split"]
    lines = [
        f"# Offline evaluation: {out['source']} ({out['run']})",
        "",
        f"Split: {s['users']} users, {s['items']} items, {s['train_interactions']} training interactions; "
        f"{s['users_dropped']} users with < {s['min_interactions']} items dropped, {s['repeats_dropped']} repeated "
        f"(user, item) pairs dropped. Seed {out['seed']}. Test phase; 95% CIs (± half-width) over users.",
        *(["", f"**Item cold start**: {s['items_withheld']} items withheld from training and validation "
              f"({s['interactions_withheld']} interactions removed); {s['targets_withheld']} test users' target "
              "is one of them (the 'item unseen' slice)."] if s.get("items_withheld") else []),
        "",
        "Full = ranked against the whole catalogue minus the user's history; sampled-100 = against 100 "
        "seeded negatives the user never interacted with (SLIM's protocol). Pop@10 = mean training "
        "interactions of the recommended items; Cov@10 = share of the catalogue recommended to anyone.",
    ]
    if out["negatives"]["users_with_fewer"]:
        lines += ["", f"Note: {out['negatives']['users_with_fewer']} users have fewer than {N_NEGATIVES} items they "
                  "never interacted with; they are ranked against all of those."]
    header = ("| method | HR@10 | HR@20 | NDCG@10 | NDCG@20 | Cov@10 | Pop@10 | "
              "HR@10 (s100) | HR@20 (s100) | NDCG@10 (s100) | NDCG@20 (s100) |")
    for pop, title in (("all", "All users"), ("sample", "Seeded user sample")):
        block = out["results"][pop]
        if not block:
            continue
        n = out["populations"][pop]
        lines += ["", f"## {title} ({n} users)", "", header, "|" + "---|" * 11]
        for key, r in block.items():
            f, sm = r["full"], r["sampled"]
            cells = [names[key], _fmt(f["HR@10"]), _fmt(f["HR@20"]), _fmt(f["NDCG@10"]), _fmt(f["NDCG@20"]),
                     _fmt(f["coverage@10"]), _fmt(f["avg_pop@10"]), _fmt(sm["HR@10"]), _fmt(sm["HR@20"]),
                     _fmt(sm["NDCG@10"]), _fmt(sm["NDCG@20"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _slice_tables(out, names)
    if out.get("checks"):
        lines += ["", "## Trained models vs the baselines (all users, full-ranking NDCG@10)", ""]
        for c in out["checks"]:
            vs = ", ".join(f"{names.get(k, k)} {v:.4f}" for k, v in c["baselines"].items())
            lines.append(f"- {names[c['method']]}: {c['NDCG@10']:.4f} vs {vs}: "
                         f"{'beats them' if c['beats_all'] else '**does not beat them all**'}")
    if out.get("failed"):
        lines += ["", "## Failed methods", ""] + [f"- `{k}`: {v}" for k, v in out["failed"].items()]
    lines += ["", "## Methods", "", "| method | users | fit (s) | score (s) | notes |", "|---|---|---|---|---|"]
    for m in out["methods"]:
        note = ""
        d = m.get("details")
        if d and "best_epoch" in d:
            ep = d["epochs"]
            note = (f"best epoch {d['best_epoch']} of {len(ep)} run (max {d['config']['epochs']}, stopped by "
                    f"{d['stopped_by']}), max_len {d['config']['max_len']}, dim {d['config']['dim']}")
        elif d and "alpha" in d:
            note = f"alpha {d['alpha']:g} learned on the validation phase of {d['fit_users']} users"
            if "rationales" in d:
                note += f"; rationales by {d['rationales']['generator']}"
        elif d and "generator" in d:
            note = f"rationales by {d['generator']} ({d['generated']} generated, {d['cached']} cached)"
        lines.append(f"| {m['name']} | {'sample' if m['sample_only'] else 'all'} | {m['fit_s']:.1f} | "
                     f"{m['score_s']:.1f} | {note} |")
    if out.get("files"):
        pngs = [f for f in out["files"] if f.endswith(".png")]
        if pngs:
            lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    lines += ["", "## Protocol", ""] + [f"- **{k}**: {v}" for k, v in out["protocol"].items()]
    return "\n".join(lines) + "\n"


def _slice_tables(out: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Cold start: full-ranking NDCG@10 per slice of test users (history length) and test items (training count)."""
    lines: list[str] = []
    for pop in ("all", "sample"):
        block = {k: r for k, r in out["results"][pop].items() if "slices" in r}
        if not block:
            continue
        counts = next(iter(block.values()))["slices"]  # the same users per slice for every method
        slices = list(counts)
        lines += ["", f"## Cold start, {pop} (full-ranking NDCG@10; users per slice in the header)", "",
                  "| method | " + " | ".join(f"{s} ({counts[s]['users']})" for s in slices) + " |",
                  "|" + "---|" * (len(slices) + 1)]
        for key, r in block.items():
            lines.append(f"| {names[key]} | " + " | ".join(_fmt(r["slices"][s]["NDCG@10"]) for s in slices) + " |")
    return lines


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plots(out: dict[str, Any], run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    names = {m["key"]: m["name"] for m in out["methods"]}
    written: list[str] = []
    for pop, block in out["results"].items():
        if not block:
            continue
        keys = list(block)
        width = 0.8 / len(keys)
        # Bar chart: accuracy under both protocols, and the two beyond-accuracy measures.
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [4, 4, 2]})
        panels = [("full", ["HR@10", "HR@20", "NDCG@10", "NDCG@20"], "full ranking"),
                  ("sampled", ["HR@10", "HR@20", "NDCG@10", "NDCG@20"], f"sampled ({N_NEGATIVES} negatives)"),
                  ("full", ["coverage@10", "avg_pop_share@10"], "coverage / popularity share")]
        for ax, (proto, metric_names, title) in zip(axes, panels):
            x = np.arange(len(metric_names))
            for i, key in enumerate(keys):
                vals, errs = [], [[], []]
                for mn in metric_names:
                    v = block[key][proto][mn]
                    if isinstance(v, dict):
                        vals.append(v["mean"])
                        errs[0].append(v["mean"] - v["ci_low"])
                        errs[1].append(v["ci_high"] - v["mean"])
                    else:
                        vals.append(v)
                        errs[0].append(0.0)
                        errs[1].append(0.0)
                ax.bar(x + (i - (len(keys) - 1) / 2) * width, vals, width, yerr=errs, capsize=2, label=names[key])
            ax.set_xticks(x, metric_names)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{out['source']} — {pop} ({out['populations'][pop]} users), 95% CI")
        written.append(_save(fig, run_dir / f"metrics_{pop}.png"))

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        ks = np.arange(1, MAX_CURVE_K + 1)
        for ax, proto, title in ((axes[0], "full", "full ranking"), (axes[1], "sampled", f"sampled ({N_NEGATIVES})")):
            for key in keys:
                ax.plot(ks, block[key][proto]["HR_curve"], label=names[key])
            ax.set_xlabel("K")
            ax.set_ylabel("HR@K")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{out['source']} — HR@K, {pop} ({out['populations'][pop]} users)")
        written.append(_save(fig, run_dir / f"hr_curve_{pop}.png"))
    return written


__all__ = ["KS", "MAX_CURVE_K", "N_NEGATIVES", "finite", "markdown", "plots"]
