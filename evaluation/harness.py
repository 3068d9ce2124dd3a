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
from evaluation.slices import cold_start_slices
from evaluation.report import KS, MAX_CURVE_K, N_NEGATIVES, finite, markdown, plots as write_plots
from streams.splits import (EvalPhase, TrainingData, leave_one_out, restrict_users, sample_user_indices,
                            withhold_items)
from streams.datasets import Item, item_text, load_interactions, load_items
from streams.settings import Settings

if TYPE_CHECKING:  # torch and onnxruntime load only when a method needs them
    from models.encoder import TextEncoder
    from models.sasrec import SASRecConfig

ProgressFn = Callable[[str, int, int], None]
"""``progress(message, done, total)``: ``done`` of ``total`` harness steps are finished; the message says
what is running now (SASRec also reports each epoch, with ``done`` unchanged)."""



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
    ranker_version: str | None = None  # the ``served`` method's ranker (None: the ranker registry's CURRENT)
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


def _sasrec_tuned(ctx: EvalContext) -> Ranker:
    """A budgeted search on the validation split (models/search.py): 4 trials, each within the SASRec
    budget, the default configuration first."""
    from models.sasrec import SASRecConfig
    from models.search import TunedSASRec

    cfg = replace(ctx.sasrec_config or SASRecConfig(), epochs=ctx.sasrec_epochs, seed=ctx.seed)
    trials = 4
    budget = trials * (cfg.time_budget_s if cfg.time_budget_s is not None else 600.0)
    return TunedSASRec(cfg, trials=trials, budget_s=budget, seed=ctx.seed,
                       progress=lambda msg, done, total: ctx.progress(f"SASRec search: {msg}", -1, -1))


def _text_mean(ctx: EvalContext) -> Ranker:
    vecs = ctx.item_vectors()
    # The stream's prompt shows the newest prompt_max_items items; the no-LLM floor uses the same window.
    return TextRanker(vecs, HistoryMeanVectors(vecs, max_items=ctx.settings.student.prompt_max_items))


def _served(ctx: EvalContext) -> Ranker:
    """The ranker registry's version (``ranker_version``, default CURRENT) scored as the worker serves it."""
    from evaluation.served import ServedRankerMethod
    from streams.registry import ModelRegistry

    registry = ModelRegistry.rankers_for_settings(ctx.settings)
    version = ctx.ranker_version or registry.current()
    if version is None:
        raise ValueError(f"served: no ranker is promoted in {registry.root} (slimstream train-ranker --promote)")
    if not registry.exists(version):
        raise ValueError(f"served: no ranker version {version!r} in {registry.root}")
    return ServedRankerMethod(registry.version_dir(version), version, ctx.settings.worker.window_size)


def _builtin_methods() -> dict[str, Method]:
    from models.baselines import ItemKNNRanker, PopularityRanker, RandomRanker
    from evaluation.slim_methods import SLIM_METHODS, TRAINED_METHODS, build_slim_method, build_trained_method

    methods = {
        "random": Method("random", lambda ctx: RandomRanker(ctx.seed)),
        "popularity": Method("popularity", lambda ctx: PopularityRanker()),
        "item-knn": Method("item-knn", lambda ctx: ItemKNNRanker()),
        "sasrec": Method("sasrec", _sasrec),
        "sasrec-tuned": Method("sasrec-tuned", _sasrec_tuned),
        "text-mean": Method("text-mean", _text_mean),
        "served": Method("served", _served),
    }
    for key in SLIM_METHODS:
        methods[key] = Method(key, lambda ctx, k=key: build_slim_method(k, ctx), sample_only=True)
    for key in TRAINED_METHODS:
        methods[key] = Method(key, lambda ctx, k=key: build_trained_method(k, ctx))
    return methods


BASELINE_METHODS = ("random", "popularity", "item-knn", "sasrec", "text-mean")
BUILTIN_METHODS = (*BASELINE_METHODS, "slim-base", "slim-distilled", "slim-teacher", "sasrec+slim-base",
                   "sasrec+slim-distilled", "sasrec+slim-teacher", "sasrec+text-mean",
                   "slim-id-base", "slim-id-distilled", "slim-id-teacher", "slim-text-base", "slim-text-distilled",
                   "slim-text-teacher", "slim-text-none", "slim-idtext-base", "slim-idtext-distilled",
                   "slim-idtext-teacher", "slim-idtext-none", "sasrec-tuned", "served")
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
    not_competing = phase.excluded()  # the history, plus any withheld items the user interacted with
    for start in range(0, len(users), batch_size):
        batch = users[start:start + batch_size]
        hist = [phase.histories[u] for u in batch]
        scores = np.asarray(ranker.score(batch, hist))
        if scores.shape != (len(batch), n_items + 1):
            raise ValueError(f"{ranker.name}: score returned shape {scores.shape}, expected "
                             f"({len(batch)}, {n_items + 1})")
        excluded = M.history_mask([not_competing[u] for u in batch], n_items + 1)
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
    ranker_version: str | None = None,
    cold_items: float | None = None,
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
    MiniLM). ``cold_items``: withhold this seeded fraction of the catalogue from training and validation
    (:func:`~streams.splits.withhold_items`): the item cold-start protocol. ``keep_going``: a method that
    raises is recorded under ``failed`` and the run goes on (default: the error propagates). Deterministic for a given seed (SASRec: on the same torch thread count).
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
    if cold_items is not None:
        split = withhold_items(split, cold_items, seed)
    if split.n_users == 0:
        raise ValueError(f"{source}: no user has at least {split.stats.min_interactions} interactions")
    sample = sample_user_indices(split.n_users, sample_users, seed)
    negatives = M.sample_negatives([split.interacted(u) for u in range(split.n_users)], split.n_items,
                                   N_NEGATIVES, seed)
    steps.advance()
    ctx = EvalContext(source=source, data=split.training_data(), settings=settings, seed=seed,
                      sasrec_epochs=sasrec_epochs, sasrec_config=sasrec_config,
                      progress=lambda m, d, t: steps.say(m, d), encoder=encoder, sample=sample,
                      adapter_dir=None if adapter_dir is None else Path(adapter_dir), ranker_version=ranker_version)
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
                 "ci": ci, "cold_items": cold_items, "methods": [m.key for m in resolved]},
        "protocol": _protocol_text(ci, cold_items),
        "split": split.stats.as_dict() | {"items_without_text": ctx.items_without_text},
        "populations": {"all": int(split.n_users), "sample": int(len(sample))},
        # Users with fewer never-interacted items than N_NEGATIVES are ranked against all of them.
        "negatives": {"per_user": N_NEGATIVES, "users_with_fewer": int((negatives == 0).any(axis=1).sum())},
        "methods": method_info,
        "failed": failed,
        "results": results,
        "checks": beats_baselines(results["all"]),
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
            results["all"][method.key]["slices"] = _slices(per_user, test, counts, ci, ctx.seed)
        in_sample = per_user.subset(sample)
        results["sample"][method.key] = _metric_block(in_sample, counts, split.n_items, split.n_users, ci, ctx.seed)
        results["sample"][method.key]["slices"] = _slices(in_sample, test, counts, ci, ctx.seed)
        info: dict[str, Any] = {"key": method.key, "name": ranker.name, "sample_only": method.sample_only,
                                "fit_s": round(fit_s, 3), "score_s": round(score_s, 3)}
        if hasattr(ranker, "summary"):
            info["details"] = ranker.summary()
        method_info.append(info)
    return results, method_info, failed


def _trained(key: str) -> bool:
    return key in ("sasrec", "sasrec-tuned", "served") or key.startswith(("slim-id-", "slim-text-", "slim-idtext-"))


def beats_baselines(block: dict[str, Any]) -> list[dict[str, Any]]:
    """For every trained model of the run: does its full-ranking NDCG@10 beat popularity's and item-kNN's
    (those that were run) on all users? What a user's own dataset must show with default settings."""
    base = {k: block[k]["full"]["NDCG@10"]["mean"] for k in ("popularity", "item-knn") if k in block}
    out = []
    for key, r in block.items():
        if not _trained(key) or not base:
            continue
        ndcg = r["full"]["NDCG@10"]["mean"]
        out.append({"method": key, "NDCG@10": ndcg, "baselines": base,
                    "beats_all": all(ndcg > v for v in base.values())})
    return out


def _slices(r: _PerUser, test: EvalPhase, counts: np.ndarray, ci: str, seed: int) -> dict[str, Any]:
    lengths = np.asarray([len(test.histories[u]) for u in r.users])
    return cold_start_slices(r.full_greater, r.full_ties, lengths, np.asarray(counts)[test.targets[r.users]],
                             ci=ci, seed=seed)


def _write_reports(out: dict[str, Any], run_dir: Path, plots: bool, t_start: float) -> Path:
    """results.json, results.md and (``plots``) the figures into ``run_dir``; their names into ``out``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    files = ["results.json", "results.md"]
    if plots:
        files += write_plots(out, run_dir)
    out["files"] = files
    out["elapsed_s"] = round(time.monotonic() - t_start, 3)
    (run_dir / "results.md").write_text(markdown(out), encoding="utf-8")
    (run_dir / "results.json").write_text(json.dumps(finite(out), indent=2), encoding="utf-8")
    out["run_dir"] = str(run_dir)
    return run_dir


def _protocol_text(ci: str, cold_items: float | None = None) -> dict[str, str]:
    text = {
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
    if cold_items is not None:
        text["cold items"] = (f"item cold start: a seeded {cold_items:.0%} of the catalogue is withheld from training "
                              "and validation (those interactions are removed from the sequences, and a withheld "
                              "validation item is replaced by the newest remaining one); test targets are kept, so "
                              "the 'item unseen' slice holds the users whose test item no model saw in training; "
                              "the removed interactions are neither input nor competitors of the target")
    return text


# --- writing ----------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "run"


