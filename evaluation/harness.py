"""Offline evaluation harness: leave-one-out, full and sampled ranking, baselines, reports.

``run_evaluation`` loads a dataset, splits it (``streams/splits.py``), fits every method on the training data
(which never contains a test item), scores the test phase (history = training sequence + validation item),
and writes ``<out_dir>/<run>/results.json``, ``results.md`` and PNG plots.

Two populations are reported:

* ``all``: every user kept by the split — for the methods that are cheap enough (baselines);
* ``sample``: a seeded sample of ``sample_users`` users — every method, including the rationale-based SLIM
  ones that need an LLM call per user (``Method(..., sample_only=True)``). The baselines' sample numbers are
  the same rankings restricted to those users, so methods compare on identical users.

Methods are named built-ins (:data:`BUILTIN_METHODS`) or :class:`Method` objects whose ``build`` gets an
:class:`EvalContext` (training data, catalogue, item-text vectors, settings) and returns a
:class:`~models.rankers.Ranker`; that is where rationale methods plug in, e.g.
``Method("slim-rationale", lambda ctx: TextRanker(ctx.item_vectors(), MyRationaleVectors(ctx)), sample_only=True)``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.rankers import HistoryMeanVectors, Ranker, TextRanker
from models import metrics as M
from streams.splits import EvalPhase, TrainingData, leave_one_out, restrict_users, sample_user_indices
from streams.datasets import Item, item_text, load_interactions, load_items
from streams.settings import Settings

if TYPE_CHECKING:  # torch and onnxruntime load only when a method needs them
    from models.encoder import TextEncoder
    from models.sasrec import SASRecConfig

ProgressFn = Callable[[str, int, int], None]
"""``progress(message, done, total)``: ``done`` of ``total`` harness steps are finished; the message says
what is running now (SASRec also reports each epoch, with ``done`` unchanged)."""

KS = (10, 20)  # cut-offs of the table; the HR curve goes to MAX_CURVE_K
MAX_CURVE_K = 50
N_NEGATIVES = 100  # SLIM's sampled protocol


# --- methods ----------------------------------------------------------------------------------------------
@dataclass
class EvalContext:
    """What a method factory may use. Holds no test targets (see :class:`~streams.splits.TrainingData`)."""

    source: str
    data: TrainingData
    settings: Settings
    seed: int
    sasrec_epochs: int
    sasrec_config: SASRecConfig | None
    progress: ProgressFn
    encoder: TextEncoder | None = None  # loaded on first use
    sample: np.ndarray | None = None  # the seeded user sample (the LLM methods fit and score on it)
    adapter_dir: Path | None = None  # the distilled student's LoRA adapter (None: the registry's CURRENT)
    _shared: dict[str, Any] = field(default_factory=dict)
    _items: dict[str, Item] | None = None
    _item_vectors: np.ndarray | None = None
    items_without_text: int = 0

    def shared(self, key: str, build: Callable[[], Any]) -> Any:
        """One object per key and run (a fitted SASRec, a generator's rationales) shared by methods."""
        if key not in self._shared:
            self._shared[key] = build()
        return self._shared[key]

    def fitted_sasrec(self) -> Ranker:
        """The run's SASRec, fitted once: the ``sasrec`` method and every fusion use the same model."""

        def build() -> Ranker:
            ranker = _new_sasrec(self)
            ranker.fit(self.data)  # timed as part of the first method that asks for it
            return ranker

        return self.shared("sasrec", build)

    def items(self) -> dict[str, Item]:
        """The catalogue by item id (loaded on first use)."""
        if self._items is None:
            self._items = {it.item_id: it for it in load_items(self.source)}
        return self._items

    def item_texts(self) -> list[str]:
        """Text of every item index (index 0, padding, is ""). Items missing from the catalogue file are
        represented by their id (counted in ``items_without_text``)."""
        catalogue = self.items()
        texts, missing = [""], 0
        for item_id in self.data.item_ids[1:]:
            item = catalogue.get(item_id)
            if item is None:
                missing += 1
                texts.append(item_id)
            else:
                texts.append(item_text(item))
        self.items_without_text = missing
        return texts

    def item_vectors(self) -> np.ndarray:
        """(n_items + 1, dim) unit item-text vectors from the configured encoder; row 0 (padding) is zero."""
        if self._item_vectors is None:
            if self.encoder is None:
                from models.encoder import load_encoder

                self.encoder = load_encoder(self.settings)
            texts = self.item_texts()
            vecs = np.zeros((len(texts), self.encoder.dim), dtype=np.float32)
            vecs[1:] = self.encoder.encode(texts[1:])
            self._item_vectors = vecs
        return self._item_vectors


@dataclass
class Method:
    """A method under evaluation: ``build(ctx)`` returns an unfitted Ranker. ``sample_only`` methods are
    scored on the user sample only (LLM-based ones: one generation per user)."""

    key: str
    build: Callable[[EvalContext], Ranker]
    sample_only: bool = False


def _new_sasrec(ctx: EvalContext) -> Ranker:
    from models.sasrec import SASRecConfig, SASRecRanker

    cfg = ctx.sasrec_config or SASRecConfig()
    cfg = replace(cfg, epochs=ctx.sasrec_epochs, seed=ctx.seed)
    return SASRecRanker(cfg, progress=lambda msg, done, total: ctx.progress(msg, -1, -1))


class _Prefitted:
    """A ranker fitted elsewhere (the shared SASRec): ``fit`` is a no-op, everything else is delegated."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker
        self.name = ranker.name

    def fit(self, data: TrainingData) -> None:
        pass

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self.ranker.score(users, histories)

    def summary(self) -> dict[str, Any]:
        return self.ranker.summary() if hasattr(self.ranker, "summary") else {}


def _sasrec(ctx: EvalContext) -> Ranker:
    return _Prefitted(ctx.fitted_sasrec())


def _text_mean(ctx: EvalContext) -> Ranker:
    vecs = ctx.item_vectors()
    # The stream's prompt shows the newest prompt_max_items items; the no-LLM floor uses the same window.
    return TextRanker(vecs, HistoryMeanVectors(vecs, max_items=ctx.settings.student.prompt_max_items))


def _builtin_methods() -> dict[str, Method]:
    from models.baselines import ItemKNNRanker, PopularityRanker, RandomRanker
    from evaluation.slim_methods import SLIM_METHODS, build_slim_method

    methods = {
        "random": Method("random", lambda ctx: RandomRanker(ctx.seed)),
        "popularity": Method("popularity", lambda ctx: PopularityRanker()),
        "item-knn": Method("item-knn", lambda ctx: ItemKNNRanker()),
        "sasrec": Method("sasrec", _sasrec),
        "text-mean": Method("text-mean", _text_mean),
    }
    for key in SLIM_METHODS:
        methods[key] = Method(key, lambda ctx, k=key: build_slim_method(k, ctx), sample_only=True)
    return methods


BASELINE_METHODS = ("random", "popularity", "item-knn", "sasrec", "text-mean")
BUILTIN_METHODS = (*BASELINE_METHODS, "slim-base", "slim-distilled", "slim-teacher", "sasrec+slim-base",
                   "sasrec+slim-distilled", "sasrec+slim-teacher", "sasrec+text-mean")
DEFAULT_METHODS = BASELINE_METHODS


def resolve_methods(methods: Sequence[str | Method | Ranker]) -> list[Method]:
    """Names, Method objects and ready Ranker instances -> Methods (with unique keys)."""
    builtins = _builtin_methods()
    out: list[Method] = []
    for m in methods:
        if isinstance(m, Method):
            out.append(m)
        elif isinstance(m, str):
            if m not in builtins:
                raise ValueError(f"unknown method {m!r}; expected one of {', '.join(BUILTIN_METHODS)}")
            out.append(builtins[m])
        elif isinstance(m, Ranker):
            out.append(Method(_slug(m.name), lambda ctx, r=m: r))
        else:
            raise TypeError(f"not a method: {m!r}")
    keys = [m.key for m in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate method keys: {keys}")
    return out


# --- scoring ----------------------------------------------------------------------------------------------
@dataclass
class _PerUser:
    """Per-user outcomes of one method on one phase, aligned with ``users``."""

    users: np.ndarray
    full_greater: np.ndarray
    full_ties: np.ndarray
    sampled_greater: np.ndarray
    sampled_ties: np.ndarray
    top: np.ndarray  # [n, max(KS)] recommended items, best first

    def subset(self, users: np.ndarray) -> "_PerUser":
        pos = np.searchsorted(self.users, users)
        if not np.array_equal(self.users[np.minimum(pos, len(self.users) - 1)], users):
            raise ValueError("requested users were not scored")
        return _PerUser(users, self.full_greater[pos], self.full_ties[pos], self.sampled_greater[pos],
                        self.sampled_ties[pos], self.top[pos])


def _score(ranker: Ranker, users: np.ndarray, phase: EvalPhase, negatives: np.ndarray, n_items: int,
           batch_size: int) -> _PerUser:
    fg, ft, sg, st, tops = [], [], [], [], []
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        hist = [phase.histories[u] for u in batch]
        scores = np.asarray(ranker.score(batch, hist))
        if scores.shape != (len(batch), n_items + 1):
            raise ValueError(f"{ranker.name}: score returned shape {scores.shape}, expected "
                             f"({len(batch)}, {n_items + 1})")
        excluded = M.history_mask(hist, n_items + 1)
        g, t = M.full_rank_counts(scores, phase.targets[batch], excluded)
        fg.append(g), ft.append(t)
        g, t = M.sampled_rank_counts(scores, phase.targets[batch], negatives[batch])
        sg.append(g), st.append(t)
        tops.append(M.top_k(scores, excluded, max(KS)))
    return _PerUser(users, *(np.concatenate(x) for x in (fg, ft, sg, st, tops)))


def _metric_block(r: _PerUser, counts: np.ndarray, n_items: int, n_train_users: int, ci: str,
                  seed: int) -> dict[str, Any]:
    def est(values: np.ndarray) -> dict[str, Any]:
        return M.mean_ci(values, method=ci, seed=seed).as_dict()  # type: ignore[arg-type]

    full: dict[str, Any] = {}
    sampled: dict[str, Any] = {}
    for k in KS:
        full[f"HR@{k}"] = est(M.hit_at_k(r.full_greater, k, r.full_ties))
        full[f"NDCG@{k}"] = est(M.ndcg_at_k(r.full_greater, k, r.full_ties))
        sampled[f"HR@{k}"] = est(M.hit_at_k(r.sampled_greater, k, r.sampled_ties))
        sampled[f"NDCG@{k}"] = est(M.ndcg_at_k(r.sampled_greater, k, r.sampled_ties))
    for k in KS:
        lists = r.top[:, :k]
        full[f"coverage@{k}"] = M.coverage(lists, n_items)
        pop = M.average_popularity(lists, counts)
        full[f"avg_pop@{k}"] = est(pop)
        full[f"avg_pop_share@{k}"] = est(pop / n_train_users)
    full["HR_curve"] = M.hit_curve(r.full_greater, r.full_ties, MAX_CURVE_K).tolist()
    sampled["HR_curve"] = M.hit_curve(r.sampled_greater, r.sampled_ties, MAX_CURVE_K).tolist()
    return {"users": int(len(r.users)), "full": full, "sampled": sampled}


# --- the run ----------------------------------------------------------------------------------------------
def run_evaluation(
    source: str,
    methods: Sequence[str | Method | Ranker] = DEFAULT_METHODS,
    sample_users: int | None = 1000,
    seed: int = 0,
    out_dir: str | Path = "reports",
    sasrec_epochs: int = 20,
    *,
    run_name: str | None = None,
    limit_users: int | None = None,
    sasrec_config: SASRecConfig | None = None,
    ci: Literal["normal", "bootstrap"] = "normal",
    settings: Settings,
    encoder: TextEncoder | None = None,
    batch_size: int = 512,
    adapter_dir: str | Path | None = None,
    keep_going: bool = False,
    plots: bool = True,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Evaluate ``methods`` on ``source`` (``"ml-1m"``, ``"ml-100k"`` or a data directory); return the
    results dict that is also written to ``<out_dir>/<run>/results.json``.

    ``sample_users``: size of the seeded user sample (None: all users, and the sample is everyone).
    ``limit_users``: keep only this many (seeded) users before splitting — a quick slice for smoke runs.
    ``sasrec_config``: a :class:`models.sasrec.SASRecConfig`; its epochs and seed are set from
    ``sasrec_epochs`` and ``seed``. ``encoder``: a TextEncoder for the text methods (default: the configured
    MiniLM). ``keep_going``: a method that raises is recorded under ``failed`` and the run goes on (default:
    the error propagates). Deterministic for a given seed (SASRec: on the same torch thread count).
    """
    t_start = time.monotonic()
    resolved = resolve_methods(methods)
    steps = _Steps(progress, total=3 + 2 * len(resolved))
    steps.say(f"loading {source}")
    interactions = load_interactions(source)
    if limit_users is not None:
        interactions = restrict_users(interactions, limit_users, seed)
    steps.advance("splitting leave-one-out")
    split = leave_one_out(interactions)
    del interactions
    if split.n_users == 0:
        raise ValueError(f"{source}: no user has at least {split.stats.min_interactions} interactions")
    sample = sample_user_indices(split.n_users, sample_users, seed)
    negatives = M.sample_negatives([split.interacted(u) for u in range(split.n_users)], split.n_items,
                                   N_NEGATIVES, seed)
    steps.advance()
    ctx = EvalContext(source=source, data=split.training_data(), settings=settings, seed=seed,
                      sasrec_epochs=sasrec_epochs, sasrec_config=sasrec_config,
                      progress=lambda m, d, t: steps.say(m, d), encoder=encoder, sample=sample,
                      adapter_dir=None if adapter_dir is None else Path(adapter_dir))
    results, method_info, failed = _evaluate_methods(resolved, ctx, split, negatives, ci, batch_size, keep_going,
                                                     steps)
    steps.say("writing reports")
    run = run_name or f"{_slug(source)}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    out: dict[str, Any] = {
        "run": run,
        "source": source,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "args": {"sample_users": sample_users, "limit_users": limit_users, "sasrec_epochs": sasrec_epochs,
                 "ci": ci, "methods": [m.key for m in resolved]},
        "protocol": _protocol_text(ci),
        "split": split.stats.as_dict() | {"items_without_text": ctx.items_without_text},
        "populations": {"all": int(split.n_users), "sample": int(len(sample))},
        # Users with fewer never-interacted items than N_NEGATIVES are ranked against all of them.
        "negatives": {"per_user": N_NEGATIVES, "users_with_fewer": int((negatives == 0).any(axis=1).sum())},
        "methods": method_info,
        "failed": failed,
        "results": results,
    }
    run_dir = _write_reports(out, Path(out_dir) / run, plots, t_start)
    steps.advance(f"done: {run_dir}")
    return out


class _Steps:
    """Progress of one run as (message, steps done, total steps)."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def say(self, message: str, step_done: int | None = None) -> None:
        if self.progress is not None:
            self.progress(message, self.done if step_done is None or step_done < 0 else step_done, self.total)

    def advance(self, message: str | None = None) -> None:
        self.done += 1
        if message is not None:
            self.say(message)


def _evaluate_methods(resolved: Sequence[Method], ctx: EvalContext, split: Any, negatives: np.ndarray, ci: str,
                      batch_size: int, keep_going: bool,
                      steps: _Steps) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Fit and score every method (a fit and a scoring step each): metric blocks for all users and the sample,
    what each method was, and the methods that failed (``keep_going``) with why."""
    data, sample = ctx.data, ctx.sample
    counts = data.item_counts()
    test = split.phase("test")
    all_users = np.arange(split.n_users, dtype=np.int64)
    results: dict[str, dict[str, Any]] = {"all": {}, "sample": {}}
    method_info: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for method in resolved:
        steps.say(f"fitting {method.key}")
        done_before = steps.done
        try:
            t0 = time.monotonic()
            ranker = method.build(ctx)
            ranker.fit(data)
            fit_s = time.monotonic() - t0
            users = sample if method.sample_only else all_users
            steps.advance(f"scoring {ranker.name} on {len(users)} users")
            t0 = time.monotonic()
            per_user = _score(ranker, users, test, negatives, split.n_items, batch_size)
            score_s = time.monotonic() - t0
        except Exception as exc:
            if not keep_going:
                raise
            # A long run (LLM methods take an hour on a CPU) keeps what the other methods measured.
            failed[method.key] = f"{type(exc).__name__}: {exc}"
            steps.done = done_before + 2
            steps.say(f"{method.key} failed: {failed[method.key]}")
            continue
        steps.advance()
        if not method.sample_only:
            results["all"][method.key] = _metric_block(per_user, counts, split.n_items, split.n_users, ci, ctx.seed)
        results["sample"][method.key] = _metric_block(per_user.subset(sample), counts, split.n_items,
                                                      split.n_users, ci, ctx.seed)
        info: dict[str, Any] = {"key": method.key, "name": ranker.name, "sample_only": method.sample_only,
                                "fit_s": round(fit_s, 3), "score_s": round(score_s, 3)}
        if hasattr(ranker, "summary"):
            info["details"] = ranker.summary()
        method_info.append(info)
    return results, method_info, failed


def _write_reports(out: dict[str, Any], run_dir: Path, plots: bool, t_start: float) -> Path:
    """results.json, results.md and (``plots``) the figures into ``run_dir``; their names into ``out``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = ["results.json", "results.md"]
    if plots:
        files += _plots(out, run_dir)
    out["files"] = files
    out["elapsed_s"] = round(time.monotonic() - t_start, 3)
    (run_dir / "results.md").write_text(_markdown(out), encoding="utf-8")
    (run_dir / "results.json").write_text(json.dumps(_finite(out), indent=2), encoding="utf-8")
    out["run_dir"] = str(run_dir)
    return run_dir


def _protocol_text(ci: str) -> dict[str, str]:
    return {
        "split": "leave-one-out by timestamp (file order breaks ties); repeated (user, item) pairs keep the first; "
                 "users with < 3 items dropped; last item = test, previous = validation, rest = train",
        "fit": "every method fits on training sequences only; SASRec early-stops on validation NDCG@10",
        "history": "test-phase input = training sequence + validation item; the test item is never shown",
        "full": "target ranked against every item except the user's history (and padding)",
        "sampled": f"target ranked against {N_NEGATIVES} negatives drawn uniformly (seeded, shared by all "
                   "methods) from items the user never interacted with",
        "ties": "expected value under uniformly random tie-breaking",
        "avg_pop": "mean training-interaction count of recommended items (per user, then averaged); "
                   "avg_pop_share = that / number of users",
        "ci": f"95% over users, {'normal approximation' if ci == 'normal' else 'seeded percentile bootstrap'}",
    }


# --- writing ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "run"


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so results.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # an estimate
        if v["n"] == 0 or not math.isfinite(v["mean"]):
            return "–"
        if v["mean"] >= 10:
            return f"{v['mean']:.1f} ± {(v['ci_high'] - v['ci_low']) / 2:.1f}"
        return f"{v['mean']:.4f} ± {(v['ci_high'] - v['ci_low']) / 2:.4f}"
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _markdown(out: dict[str, Any]) -> str:
    names = {m["key"]: m["name"] for m in out["methods"]}
    s = out["split"]
    lines = [
        f"# Offline evaluation: {out['source']} ({out['run']})",
        "",
        f"Split: {s['users']} users, {s['items']} items, {s['train_interactions']} training interactions; "
        f"{s['users_dropped']} users with < {s['min_interactions']} items dropped, {s['repeats_dropped']} repeated "
        f"(user, item) pairs dropped. Seed {out['seed']}. Test phase; 95% CIs (± half-width) over users.",
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


def _plots(out: dict[str, Any], run_dir: Path) -> list[str]:
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
        fig.tight_layout()
        name = f"metrics_{pop}.png"
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

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
        fig.tight_layout()
        name = f"hr_curve_{pop}.png"
        fig.savefig(run_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
