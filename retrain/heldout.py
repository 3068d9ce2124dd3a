"""Stage 5 of a retrain cycle, *evaluate*: the serving and the candidate student on the held-out users.

For each held-out user: window = the ``window`` events before their last ``holdout`` events, targets = those
last events. Each student writes one greedy rationale per window on the configured backend; its embedding ranks
every catalogue item outside the window by cosine. Each target is ranked with the other targets removed from
the candidates (leave-one-out per target, :mod:`models.metrics`); NDCG@10 and HR@10 are averaged over a user's
targets, then over users.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import metrics as M
from retrain.context import K, CycleContext
from retrain.selection import Selection
from retrain.teaching import NewDataset, stream_messages
from retrain.training import Candidate
from streams.registry import ADAPTER
from streams.settings import Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.student_base import StudentBackend


def heldout_metrics(rationale_vecs: np.ndarray, item_vecs: np.ndarray, windows: Sequence[Sequence[int]],
                    targets: Sequence[Sequence[int]], k: int = K) -> dict[str, float]:
    """Mean over users of the mean over each user's targets of NDCG@k / HR@k, every catalogue item outside
    the window (and outside the user's other targets) ranked by cosine to the user's rationale vector. A zero
    vector (empty rationale) ties every item: it scores like a random ranking."""
    v = np.asarray(rationale_vecs, dtype=np.float32)
    v = v / np.clip(np.linalg.norm(v, axis=1, keepdims=True), 1e-12, None)
    iv = np.asarray(item_vecs, dtype=np.float32)
    iv = iv / np.clip(np.linalg.norm(iv, axis=1, keepdims=True), 1e-12, None)
    scores = v @ iv.T
    rows, hist, tgt = [], [], []
    for u, (w, ts) in enumerate(zip(windows, targets)):
        for t in ts:
            rows.append(u)
            hist.append(np.asarray(list(w) + [x for x in ts if x != t], dtype=np.int64))
            tgt.append(int(t))
    if not rows:
        return {f"ndcg@{k}": float("nan"), f"hr@{k}": float("nan"), "users": 0, "targets": 0}
    s = scores[np.asarray(rows)]
    greater, ties = M.full_rank_counts(s, np.asarray(tgt), M.history_mask(hist, s.shape[1]))
    ndcg, hit = M.ndcg_at_k(greater, k, ties), M.hit_at_k(greater, k, ties)
    per_user_ndcg = defaultdict(list)
    per_user_hit = defaultdict(list)
    for r, n_, h in zip(rows, ndcg, hit):
        per_user_ndcg[r].append(float(n_))
        per_user_hit[r].append(float(h))
    return {f"ndcg@{k}": float(np.mean([np.mean(x) for x in per_user_ndcg.values()])),
            f"hr@{k}": float(np.mean([np.mean(x) for x in per_user_hit.values()])),
            "users": len(per_user_ndcg), "targets": len(rows)}


def _embed(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    out = np.zeros((len(texts), encoder.dim), dtype=np.float32)
    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    if nonempty:
        enc = np.asarray(encoder.encode([texts[i] for i in nonempty]), dtype=np.float32)
        out[nonempty] = enc / np.clip(np.linalg.norm(enc, axis=1, keepdims=True), 1e-12, None)
    return out


def _generate(settings: Settings, adapter_dir: Path | None, prompts: list[list[dict[str, str]]]) -> list[str]:
    """Greedy rationales of the student with ``adapter_dir`` (None: the base model), on the configured backend
    (``SLIMSTREAM_STUDENT_BACKEND``), so the gate judges the weights the workers will serve: the Q8_0 export
    under llama.cpp, the LoRA adapter loaded into vLLM under ``openai``. Freed afterwards."""
    from models.student_factory import load_student

    student: StudentBackend = load_student(settings, adapter_dir=adapter_dir)
    try:
        return student.generate(prompts)
    finally:
        del student
        gc.collect()



@dataclass(frozen=True)
class HeldoutEvaluation:
    current: dict[str, float]  # the serving version's metrics
    measured: dict[str, float]  # the candidate's, as measured
    candidate: dict[str, float]  # what the gate compares: measured, or an operator's override
    overridden: bool
    current_texts: list[str]
    candidate_texts: list[str]
    candidate_vecs: np.ndarray  # the candidate's held-out rationale embeddings (the new drift centroid)

    def protocol(self, ctx: CycleContext) -> str:
        return (f"held-out users: window = {ctx.window} events before their last {ctx.holdout}, targets = those "
                f"{ctx.holdout}; greedy rationale, cosine vs every catalogue item outside the window (other "
                "targets removed per target); mean over targets, then users")


def evaluate_heldout(ctx: CycleContext, selection: Selection, data: NewDataset, candidate: Candidate,
                     encoder: TextEncoder, override: Mapping[str, float] | None = None) -> HeldoutEvaluation:
    """Both students on ``selection.heldout_users``; ``override``: the candidate's metrics as the gate sees
    them (an operator's or a test's; the manifest says so)."""
    windows, targets, prompts = [], [], []
    for user in selection.heldout_users:
        seq = selection.sequences[user].events
        win = seq[:-ctx.holdout][-ctx.window:]
        windows.append([ctx.index[e.item_id] for e in win])
        targets.append([ctx.index[e.item_id] for e in seq[-ctx.holdout:]])
        prompts.append(stream_messages(win, ctx.catalogue, ctx.settings))
    ctx.say(f"evaluating {ctx.parent or 'the base model'} and the candidate on {len(selection.heldout_users)} "
            "held-out users")
    serving = ctx.registry.adapter_dir(ctx.parent) if ctx.parent else None
    current_texts = _generate(ctx.settings, serving, prompts)
    current = heldout_metrics(_embed(encoder, current_texts), data.item_vecs, windows, targets)
    candidate_texts = _generate(ctx.settings, candidate.version_dir / ADAPTER, prompts)
    candidate_vecs = _embed(encoder, candidate_texts)
    measured = heldout_metrics(candidate_vecs, data.item_vecs, windows, targets)
    return HeldoutEvaluation(current, measured, dict(override) if override is not None else measured,
                             override is not None, current_texts, candidate_texts, candidate_vecs)


__all__ = ["HeldoutEvaluation", "evaluate_heldout", "heldout_metrics"]
