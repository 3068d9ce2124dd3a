"""Outcome-filtered teacher rationales: the dataset ``slimstream distill`` trains on.

For a seeded set of users of the leave-one-out split, one window each, built from **training items only**
(the validation and test items are never shown to the teacher and never used as targets):

* cut = ``len(train) - n_targets``; window = the ``worker.window_size`` training items before the cut, targets = the
  ``n_targets`` training items from the cut on (they come after every window item and before the
  validation/test items);
* the teacher writes ``samples`` rationales for the SLIM prompt of the window (one request, ``n=samples``,
  ``temperature > 0``, a per-user seed, answers cached on disk);
* outcome filter: each rationale is embedded with the encoder and scored by the mean reciprocal rank of the
  targets when every catalogue item not in the window is ranked by cosine to the rationale vector; the best
  sample is kept with its score.

Records are appended to ``<out>/<dataset_version>.jsonl`` one line at a time (flushed), so an interrupted run
resumes: users already in the file are skipped. ``<dataset_version>.meta.json`` holds the parameters, the
teacher, the encoder version and the counts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from models.prompts import PROMPT_VERSION, build_slim_messages, prompt_items, sanitize_generated_text
from models.openai_client import ChatClient
from models.teacher import teacher_id as name_teacher
from retrain.dataset import DATASET_FORMAT, RationaleRecord
from retrain.forget import ForgetLedger
from streams.splits import TrainingData, leave_one_out
from streams.datasets import Item, item_text, load_interactions, load_items

SCORE_NAME = "mrr"  # mean reciprocal rank of the targets in the full ranking of non-window items
_USER_STREAM = 0x7A71  # RNG stream of the user draw (independent of other seeded draws)

Progress = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------------------
# windows


@dataclass(frozen=True)
class RationaleWindow:
    """One user's prompt window and targets, as item indices of the split (``item_ids[i]``)."""

    user: int
    window: tuple[int, ...]  # oldest to newest
    targets: tuple[int, ...]  # the next training items after the window, in order


def make_window(train: Sequence[int], window_size: int, n_targets: int) -> tuple[list[int], list[int]] | None:
    """(window, targets) from one user's training sequence, or None when it is too short (fewer than
    ``n_targets + 1`` items). Targets are the last ``n_targets`` training items; the window is the
    ``worker.window_size`` items right before them."""
    if window_size < 1 or n_targets < 1:
        raise ValueError("window_size and n_targets must be >= 1")
    seq = [int(i) for i in train]
    cut = len(seq) - n_targets
    if cut < 1:
        return None
    return seq[max(0, cut - window_size):cut], seq[cut:]


def select_users(data: TrainingData, n_users: int | None, n_targets: int, seed: int) -> list[int]:
    """A seeded draw of ``n_users`` user indices among those with enough training items. The order is a
    fixed permutation, so the first ``n`` of a larger draw are the users of a smaller one (resume adds)."""
    eligible = np.array([u for u, t in enumerate(data.train) if len(t) >= n_targets + 1], dtype=np.int64)
    order = np.random.default_rng([seed, _USER_STREAM]).permutation(len(eligible))
    chosen = eligible[order]
    return [int(u) for u in (chosen if n_users is None else chosen[:n_users])]


def build_windows(data: TrainingData, users: Sequence[int], window_size: int, n_targets: int) -> list[RationaleWindow]:
    """Windows of ``users`` from the training sequences only (``data`` has no test items; the validation
    targets it carries are not read)."""
    out = []
    for u in users:
        wt = make_window(data.train[u], window_size, n_targets)
        if wt is not None:
            out.append(RationaleWindow(user=int(u), window=tuple(wt[0]), targets=tuple(wt[1])))
    return out


# --------------------------------------------------------------------------------------------------------
# the outcome score


def outcome_score(rationale_vec: np.ndarray, item_vecs: np.ndarray, targets: Sequence[int],
                  exclude: Sequence[int] = ()) -> float:
    """Mean reciprocal rank of ``targets`` when every item (rows of ``item_vecs``; row 0 is padding and never
    ranked) not in ``exclude`` is ranked by cosine to ``rationale_vec``. In (0, 1]; higher is better. Ties
    count against the target (its rank is 1 + the number of candidates scoring at least as high)."""
    if not len(targets):
        raise ValueError("no targets")
    v = np.asarray(rationale_vec, dtype=np.float32)
    v = v / max(float(np.linalg.norm(v)), 1e-12)
    norms = np.linalg.norm(item_vecs, axis=1)
    scores = (item_vecs @ v) / np.clip(norms, 1e-12, None)
    candidate = np.ones(len(item_vecs), dtype=bool)
    candidate[0] = False
    candidate[list(exclude)] = False
    cand_scores = scores[candidate]
    rr = []
    for t in targets:
        s = scores[t]
        rank = int(np.sum(cand_scores >= s))  # the target is a candidate: it counts itself once
        rr.append(1.0 / max(rank, 1))
    return float(np.mean(rr))


def select_best(vectors: np.ndarray, item_vecs: np.ndarray, window: RationaleWindow) -> tuple[int, list[float]]:
    """Index of the best-scoring sample, and every sample's score."""
    scores = [outcome_score(v, item_vecs, window.targets, window.window) for v in vectors]
    return int(np.argmax(scores)), scores


# --------------------------------------------------------------------------------------------------------
# item vectors (cached next to the dataset: a rerun does not re-embed the catalogue)


def item_vectors(item_ids: Sequence[str], catalogue: dict[str, Item], encoder: Any, cache_dir: Path | None) -> np.ndarray:
    """(len(item_ids), dim) unit vectors of the items' texts; row 0 (padding) is zero."""
    texts = [item_text(catalogue[i]) if i in catalogue else i for i in item_ids[1:]]
    version = getattr(encoder, "version", type(encoder).__name__)
    digest = hashlib.sha256(json.dumps([version, texts]).encode()).hexdigest()[:16]
    path = cache_dir / f".item-vectors-{digest}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
    enc = np.asarray(encoder.encode(texts), dtype=np.float32)
    vecs = np.zeros((len(item_ids), enc.shape[1]), dtype=np.float32)
    vecs[1:] = enc
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, vecs)
        os.replace(tmp, path)
    return vecs


# --------------------------------------------------------------------------------------------------------
# one window -> one outcome-filtered record (shared by the offline job and the retrain cycle)


async def teacher_record(
    w: RationaleWindow,
    *,
    user_id: str,
    item_ids: Sequence[str],
    catalogue: dict[str, Item],
    teacher: ChatClient,
    encoder: Any,
    item_vecs: Callable[[], Awaitable[np.ndarray]],
    samples: int,
    window_size: int,
    temperature: float,
    max_tokens: int | None,
    seed: int,
    teacher_id: str,
    dataset_version: str,
    messages: list[dict[str, str]] | None = None,
) -> RationaleRecord | None:
    """Ask the teacher for ``samples`` rationales of the SLIM prompt over ``w.window`` (seeded per window),
    keep the one whose embedding best retrieves ``w.targets`` (:func:`select_best`). ``item_vecs()`` gives
    the item-text vectors (rows = ``item_ids``), awaited only once the teacher has answered. ``messages``:
    the prompt to send instead of the default one over the window's titles (e.g. the stream's, with event
    types and ratings). None when every sample is empty."""
    if messages is None:
        messages = build_slim_messages(prompt_items(w.window, item_ids, catalogue), window_size)
    texts = await teacher.complete(messages, n=samples, temperature=temperature, max_tokens=max_tokens,
                                   seed=(seed * 1_000_003 + w.user) % 2**31)
    # The teacher's text becomes training data: markers and controls it echoed must not be learnt.
    texts = [c for c in (sanitize_generated_text(t) for t in texts if t) if c]
    if not texts:
        return None
    vecs = await item_vecs()
    rv = await asyncio.to_thread(encoder.encode, texts)
    best, scores = select_best(np.asarray(rv, dtype=np.float32), vecs, w)
    return RationaleRecord(
        user_id=user_id, window=[item_ids[i] for i in w.window], target_items=[item_ids[i] for i in w.targets],
        messages=messages, rationale=texts[best], teacher=teacher_id, score=scores[best],
        prompt_version=PROMPT_VERSION, dataset_version=dataset_version)


# --------------------------------------------------------------------------------------------------------
# the job


@dataclass
class RationaleJobResult:
    path: Path
    meta_path: Path
    dataset_version: str
    selected: int  # users drawn with a usable window
    skipped: int  # already in the file (resume)
    written: int  # records written by this run
    empty: int  # users whose samples were all empty (not written; a rerun retries them)
    records: int  # records in the file now
    teacher_stats: dict[str, Any] = field(default_factory=dict)


def default_dataset_version(data: str, model: str) -> str:
    name = Path(data).name if data not in ("ml-1m", "ml-100k") else data
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name}-{PROMPT_VERSION}-{model}").strip("-.")


def _existing_users(path: Path) -> set[str]:
    """User ids already in ``path``. A torn last line (a crash mid-write: no final newline) is cut off; any
    other unreadable line raises ValueError."""
    if not path.is_file():
        return set()
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with path.open("r+b") as fh:
            fh.truncate(cut)
        raw = raw[:cut]
    users: set[str] = set()
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if line.strip():
            try:
                users.add(RationaleRecord.model_validate_json(line).user_id)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a rationale record") from None
    return users


def _count_records(path: Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


async def generate_rationales(
    data: str,
    *,
    teacher: ChatClient,
    encoder: Any,
    out_dir: Path,
    dataset_version: str | None = None,
    n_users: int | None = 100,
    samples: int = 4,
    window_size: int = 20,
    n_targets: int = 3,
    seed: int = 0,
    temperature: float = 0.8,
    max_tokens: int | None = None,
    concurrency: int | None = None,
    progress: Progress | None = None,
    ledger: ForgetLedger | None = None,
) -> RationaleJobResult:
    """Write outcome-filtered rationales for ``n_users`` seeded users of ``data`` (see the module docstring).
    Raises ValueError for bad parameters or a dataset version made with other parameters, and the teacher's
    :class:`models.openai_client.ChatError` when it cannot answer."""
    if samples < 1 or window_size < 1 or n_targets < 1 or (n_users is not None and n_users < 1):
        raise ValueError("users, samples, window size and targets must be >= 1")
    if temperature <= 0:
        raise ValueError("temperature must be > 0 (the samples must differ)")
    cfg = teacher.config
    version = dataset_version or default_dataset_version(data, cfg.model)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", version):
        raise ValueError(f"bad dataset version {version!r}: letters, digits, '.', '_' and '-' only")
    teacher_id = name_teacher(cfg)
    params = {"data": data, "samples": samples, "window_size": window_size, "targets": n_targets, "seed": seed,
              "temperature": temperature, "max_tokens": max_tokens or cfg.max_tokens,
              "score": SCORE_NAME, "prompt_version": PROMPT_VERSION}
    out_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = out_dir / f"{version}.jsonl", out_dir / f"{version}.meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("parameters") != params or old.get("teacher") != teacher_id:
            raise ValueError(f"dataset version {version!r} was made with other parameters or another teacher "
                             f"({meta_path}); choose another --version")

    split = leave_one_out(load_interactions(data))
    train = split.training_data()  # never the test items; its validation targets are not read
    catalogue = {it.item_id: it for it in load_items(data)}
    users = select_users(train, n_users, n_targets, seed)
    windows = build_windows(train, users, window_size, n_targets)
    done_users = _existing_users(path)
    todo = [w for w in windows if train.user_ids[w.user] not in done_users]
    if ledger is not None:  # forgotten users never reach the teacher again (they count as skipped)
        todo = ledger.keep(todo, lambda w: train.user_ids[w.user])
    skipped = len(windows) - len(todo)
    total = len(windows)
    if progress:
        progress(skipped, total)

    def write_meta() -> None:
        meta = {"dataset_version": version, "format": DATASET_FORMAT, "parameters": params, "teacher": teacher_id,
                "encoder": getattr(encoder, "version", type(encoder).__name__),
                "counts": {"records": _count_records(path), "users_requested": n_users, "selected": total,
                           "skipped": skipped, "written": written, "empty": empty},
                "teacher_stats": teacher.stats.as_dict(),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        tmp = meta_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)

    written = empty = 0
    write_meta()  # first: a later run with other parameters is refused even if this one is interrupted
    vecs: np.ndarray | None = None  # embedded on the first answer: an unreachable teacher fails fast
    vecs_lock = asyncio.Lock()
    limit = asyncio.Semaphore(concurrency or 2 * cfg.max_concurrency)

    with path.open("a", encoding="utf-8") as fh:

        async def item_vecs() -> np.ndarray:
            nonlocal vecs
            async with vecs_lock:
                if vecs is None:
                    vecs = await asyncio.to_thread(item_vectors, train.item_ids, catalogue, encoder, out_dir)
            return vecs

        async def one(w: RationaleWindow) -> None:
            nonlocal written, empty
            async with limit:
                record = await teacher_record(
                    w, user_id=train.user_ids[w.user], item_ids=train.item_ids, catalogue=catalogue, teacher=teacher,
                    encoder=encoder, item_vecs=item_vecs, samples=samples, window_size=window_size,
                    temperature=temperature, max_tokens=max_tokens, seed=seed, teacher_id=teacher_id,
                    dataset_version=version)
                if record is None:
                    empty += 1
                    return
                fh.write(record.model_dump_json() + "\n")  # one line, no await in between: never interleaved
                fh.flush()
                written += 1
                if written % 10 == 0:
                    write_meta()  # counts stay close to the file even if the process is killed outright
                if progress:
                    progress(skipped + written + empty, total)

        tasks = [asyncio.ensure_future(one(w)) for w in todo]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            fh.flush()
            write_meta()

    records = _count_records(path)
    return RationaleJobResult(path=path, meta_path=meta_path, dataset_version=version, selected=total,
                              skipped=skipped, written=written, empty=empty, records=records,
                              teacher_stats=teacher.stats.as_dict())


__all__ = [
    "RationaleJobResult",
    "RationaleWindow",
    "build_windows",
    "default_dataset_version",
    "generate_rationales",
    "item_vectors",
    "make_window",
    "outcome_score",
    "select_best",
    "select_users",
    "teacher_record",
]
