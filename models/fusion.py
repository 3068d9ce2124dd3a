"""The rationale-based SLIM methods of the offline evaluation.

* :class:`RationaleVectors` — a :class:`~models.rankers.UserVectors`: the SLIM prompt over the newest
  ``max_items`` items of the history the user is judged on, a rationale from a generator (the base or the
  distilled student, or the teacher), embedded by the item-text encoder. With
  :class:`~models.rankers.TextRanker` this is **ID-agnostic SLIM**: no item id, no interaction count.
  Rationales are cached on disk per (generator, prompt), so the ID-agnostic and the fused method of one
  generator pay for each prompt once, and a rerun pays nothing.
* :class:`FusionRanker` — **ID-based SLIM**: a fitted sequential model's scores plus ``alpha`` times the
  rationale-to-item-text cosine, both standardised per user. ``alpha`` is *learned* on the validation
  phase of the fit users (history = training sequence, target = validation item; the validation-phase
  rationale is written from that history, so the test item is never seen), by maximising validation
  NDCG@10 over a grid that includes 0: fusion can only be chosen if it helped on held-out data.

SLIM trains a projection of the rationale embedding into the backbone end to end on every training user;
that needs one LLM generation per training sequence, which a 2-core CPU cannot afford for ML-1M's 6,040
users. The late fusion here keeps the backbone fixed and learns the one mixing weight, which needs
rationales only for the evaluated users; the report states this.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.prompts import PROMPT_VERSION, PromptItem, build_slim_messages
from models.rankers import Ranker, UserVectors

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from streams.splits import TrainingData

Generate = Callable[[list[list[dict[str, str]]]], list[str]]
"""Blocking: one rationale per chat-message list, in order."""
Progress = Callable[[str], None]


class RationaleCache:
    """Append-only JSONL of ``{"key", "rationale"}`` per generator: crash-safe (one flushed line per answer)
    and readable by hand; ``key`` = sha256 of (prompt version, messages)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.data: dict[str, str] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.data[row["key"]] = row["rationale"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash: that prompt is simply generated again

    @staticmethod
    def key(messages: list[dict[str, str]]) -> str:
        blob = json.dumps([PROMPT_VERSION, messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def put(self, key: str, rationale: str) -> None:
        with self._lock:
            self.data[key] = rationale
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"key": key, "rationale": rationale}, ensure_ascii=False) + "\n")


class RationaleVectors:
    """Per-user query vectors from LLM rationales (see the module docstring).

    ``item_prompt``: the prompt entry of every item index (index 0 unused). ``generator_id`` names the cache
    file, so it must change whenever the generator does (model, adapter, decoding).
    """

    def __init__(self, generate: Generate, encoder: TextEncoder, item_prompt: Sequence[PromptItem], *,
                 max_items: int, name: str, generator_id: str, cache_dir: Path | None = None,
                 batch_size: int = 8, progress: Progress | None = None) -> None:
        self.generate = generate
        self.encoder = encoder
        self.item_prompt = list(item_prompt)
        self.max_items = max_items
        self.name = name
        self.generator_id = generator_id
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in generator_id)
        self.cache = RationaleCache(None if cache_dir is None else cache_dir / f"{safe}.jsonl")
        self.batch_size = batch_size
        self.progress = progress
        self.generated = 0
        self.cached = 0
        self.empty = 0
        self.examples: list[dict[str, Any]] = []

    def fit(self, data: TrainingData) -> None:
        """Nothing to learn: the generator is fixed."""

    def messages(self, history: np.ndarray) -> list[dict[str, str]]:
        recent = [int(i) for i in history[-self.max_items:]]
        return build_slim_messages([self.item_prompt[i] for i in recent], self.max_items)

    def rationales(self, histories: Sequence[np.ndarray]) -> list[str]:
        prompts = [self.messages(h) for h in histories]
        keys = [RationaleCache.key(m) for m in prompts]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if self.cache.get(k) is None:
                first.setdefault(k, i)  # the same window twice in one call is generated once
        todo = list(first.values())
        self.cached += len(prompts) - len(todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            texts = self.generate([prompts[i] for i in chunk])
            for i, text in zip(chunk, texts):
                self.cache.put(keys[i], text)
            self.generated += len(chunk)
            if self.progress is not None:
                self.progress(f"{self.name}: {self.generated} rationales generated, {self.cached} cached")
        out = [self.cache.get(k) or "" for k in keys]
        if len(self.examples) < 3:
            for h, text in zip(histories, out):
                if len(self.examples) < 3:
                    self.examples.append({"window": self.messages(h)[1]["content"], "rationale": text})
        return out

    def __call__(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        texts = self.rationales(histories)
        vecs = np.zeros((len(texts), self.encoder.dim), dtype=np.float32)
        nonempty = [i for i, t in enumerate(texts) if t.strip()]
        self.empty += len(texts) - len(nonempty)
        if nonempty:
            enc = np.asarray(self.encoder.encode([texts[i] for i in nonempty]), dtype=np.float32)
            enc /= np.clip(np.linalg.norm(enc, axis=1, keepdims=True), 1e-12, None)
            vecs[nonempty] = enc
        return vecs

    def summary(self) -> dict[str, Any]:
        return {"generator": self.generator_id, "prompt_version": PROMPT_VERSION, "max_items": self.max_items,
                "generated": self.generated, "cached": self.cached, "empty": self.empty,
                "examples": self.examples}


def _standardise(scores: np.ndarray) -> np.ndarray:
    """Per-row z-scores over real items (column 0, padding, excluded from the statistics)."""
    body = scores[:, 1:]
    mu = body.mean(axis=1, keepdims=True)
    sd = body.std(axis=1, keepdims=True)
    return (scores - mu) / np.clip(sd, 1e-6, None)


ALPHA_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)


class FusionRanker:
    """ID-based SLIM as late fusion: ``z(base) + alpha * z(cos(user vector, item text))`` (module docstring).

    ``base``: a Ranker, fitted here unless ``base_fitted`` (one fitted SASRec can serve several fusions).
    ``fit_users``: the users whose validation phase learns ``alpha`` (default: all users; the evaluation
    passes its user sample, since each needs an LLM call).
    """

    def __init__(self, base: Ranker, user_vectors: UserVectors, item_vectors: np.ndarray, *, name: str,
                 fit_users: np.ndarray | None = None, base_fitted: bool = False,
                 alpha_grid: Sequence[float] = ALPHA_GRID) -> None:
        self.base = base
        self.user_vectors = user_vectors
        self.item_vectors = np.asarray(item_vectors, dtype=np.float32)
        self.name = name
        self.fit_users = fit_users
        self.base_fitted = base_fitted
        self.alpha_grid = tuple(alpha_grid)
        self.alpha: float | None = None
        self.validation: dict[str, float] = {}

    def _parts(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        base = _standardise(np.asarray(self.base.score(users, histories), dtype=np.float32))
        q = np.asarray(self.user_vectors(users, histories), dtype=np.float32)
        return base, _standardise(q @ self.item_vectors.T)

    def fit(self, data: TrainingData) -> None:
        from models import metrics as M

        if not self.base_fitted:
            self.base.fit(data)
            self.base_fitted = True
        self.user_vectors.fit(data)
        users = np.arange(data.n_users) if self.fit_users is None else np.asarray(self.fit_users)
        hist = [np.asarray(data.train[u]) for u in users]  # validation phase: the training sequence only
        targets = np.asarray(data.valid_targets)[users]
        base, text = self._parts(users, hist)
        excluded = M.history_mask(hist, data.n_items + 1)
        # A user whose rationale came back empty has a zero text row (z-scores of a constant: 0).
        for alpha in self.alpha_grid:
            g, t = M.full_rank_counts(base + alpha * text, targets, excluded)
            self.validation[f"{alpha:g}"] = float(np.mean(M.ndcg_at_k(g, 10, t)))
        best = max(self.validation.values())
        # The smallest alpha within 1e-9 of the best: no fusion unless it strictly helps.
        self.alpha = next(a for a in self.alpha_grid if self.validation[f"{a:g}"] >= best - 1e-9)

    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.alpha is None:
            raise RuntimeError("FusionRanker.score called before fit")
        base, text = self._parts(users, histories)
        return base + self.alpha * text

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "valid_ndcg10_by_alpha": self.validation,
                               "fit_users": None if self.fit_users is None else int(len(self.fit_users))}
        if hasattr(self.user_vectors, "summary"):
            out["rationales"] = self.user_vectors.summary()
        return out


__all__ = ["ALPHA_GRID", "FusionRanker", "RationaleCache", "RationaleVectors"]
