"""The trained ranker as a worker serves it: windows of item ids (+ rationale vectors) in, top-K item ids out.

The user state is :func:`models.slim_rec.user_states`, the same function the harness scores with, over the
newest ``max_len`` items of the window, so a served recommendation is the harness's ranking of that window
(``tests/test_served_ranker.py`` checks item for item). Scores are dot products with the model's item table.

Items the model was not trained on: a model that reads item text (``items`` ``text`` or ``id+text``) gets
their representation from their text vector (:meth:`ServedRanker.add_items`; an ``id+text`` model has no ID
embedding for them, so only the text part) and can both read and recommend them. An ID-only model cannot:
it skips them in windows and never recommends them. A window with no item the model knows has no state: the
caller serves the popular fallback (:attr:`ServedRanker.popular`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.ranker_artifact import RankerArtifact
from models.sasrec import _left_pad
from models.slim_rec import user_states


@dataclass(frozen=True)
class ServedItem:
    item_id: str
    score: float


class ServedRanker:
    """A loaded ranker version (``version``: its registry name) ready to score windows, thread-compatible
    for one caller at a time (the worker calls it from one thread)."""

    def __init__(self, artifact: RankerArtifact, version: str | None = None) -> None:
        self.artifact = artifact
        self.version = version
        self.config = artifact.config
        self.max_len = artifact.config.max_len
        self.reads_text = artifact.config.items != "id"
        self.item_ids: list[str] = list(artifact.item_ids)
        self.index: dict[str, int] = {item_id: i for i, item_id in enumerate(self.item_ids) if i}
        self.n_trained = len(self.item_ids) - 1
        with torch.no_grad():
            self._table = artifact.net.item_table().detach().float().clone()  # [n + 1, d]
        self.popular: tuple[str, ...] = artifact.popular

    @property
    def rationale_dim(self) -> int | None:
        return self.artifact.rationale_dim

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    def item_matrix(self) -> np.ndarray:
        """[n_items + 1, d] the vectors recommendations are scored against (row 0: padding)."""
        return self._table.numpy()

    # -- catalogue -------------------------------------------------------------------------------------------
    def add_items(self, item_ids: Sequence[str], text_vectors: np.ndarray) -> list[str]:
        """Make items the model was not trained on servable from their text vectors (a text-reading model
        only); returns the ids added (known ones are skipped)."""
        if not self.reads_text:
            return []
        new = [(i, v) for i, v in zip(item_ids, np.asarray(text_vectors, dtype=np.float32)) if i not in self.index]
        if not new:
            return []
        with torch.no_grad():
            rows = self.artifact.net.text_proj(torch.from_numpy(np.stack([v for _, v in new])))
        self._table = torch.cat([self._table, rows.float()])
        for item_id, _ in new:
            self.index[item_id] = len(self.item_ids)
            self.item_ids.append(item_id)
        return [i for i, _ in new]

    # -- scoring ---------------------------------------------------------------------------------------------
    def indices(self, window: Sequence[str]) -> np.ndarray:
        """The window's item indices, oldest first; items the model does not know are left out."""
        return np.asarray([self.index[i] for i in window if i in self.index], dtype=np.int64)

    def states(self, histories: Sequence[np.ndarray], rationales: Sequence[np.ndarray | None] | None = None
               ) -> np.ndarray:
        """[n, d] user states of index histories (newest ``max_len`` used); ``rationales[i]`` None: the null
        vector. Rows for an empty history are zero."""
        n = len(histories)
        seq = torch.from_numpy(_left_pad(histories, self.max_len))
        r = use = None
        if self.rationale_dim is not None:
            r = torch.zeros(n, self.rationale_dim)
            use = torch.zeros(n, dtype=torch.bool)
            for row, vec in enumerate(rationales or ()):
                if vec is not None and len(vec) == self.rationale_dim and np.any(vec):
                    r[row] = torch.from_numpy(np.asarray(vec, dtype=np.float32))
                    use[row] = True
        net = self.artifact.net
        with torch.no_grad():
            # Items added after training are beyond the network's own table: read windows through the served one.
            h = user_states(net, seq, r, use, self._table if self.n_items > self.n_trained else None)
        out = h.float().numpy()
        out[[len(hh) == 0 for hh in histories]] = 0.0
        return out

    def scores(self, histories: Sequence[np.ndarray], rationales: Sequence[np.ndarray | None] | None = None
               ) -> np.ndarray:
        """[n, n_items + 1] scores (padding column: -inf)."""
        s = self.states(histories, rationales) @ self.item_matrix().T
        s[:, 0] = -np.inf
        return s

    def columns(self, item_ids: Sequence[str]) -> np.ndarray:
        """Per index of another item list (``item_ids[0]``: padding): this ranker's index of the item, 0 for one
        it does not know."""
        out = np.asarray([self.index.get(i, 0) for i in item_ids], dtype=np.int64)
        out[0] = 0
        return out

    def scores_in(self, columns: np.ndarray, histories: Sequence[np.ndarray], window_size: int) -> np.ndarray:
        """:meth:`scores` of histories given as indices of another item list (``columns``: :meth:`columns` of
        it), read as a worker reads a window: the newest ``window_size`` items, the unknown ones skipped. The
        answer is in that list's columns; unknown items and padding score -inf."""
        windows = [columns[np.asarray(h, dtype=np.int64)[-window_size:]] for h in histories]
        out = self.scores([w[w > 0] for w in windows])[:, columns]  # column 0 is the padding's -inf
        out[:, 0] = -np.inf
        return out

    def recommend(self, windows: Sequence[Sequence[str]], k: int,
                  rationales: Sequence[np.ndarray | None] | None = None,
                  exclude: Sequence[Collection[str]] | None = None) -> list[list[ServedItem] | None]:
        """Top-``k`` per window, never an item of the window (nor of ``exclude[i]``). ``None`` for a window with
        no item the model knows (the caller's fallback decides)."""
        histories = [self.indices(w) for w in windows]
        out: list[list[ServedItem] | None] = [None] * len(windows)
        live = [i for i, h in enumerate(histories) if len(h)]
        if not live:
            return out
        scores = self.scores([histories[i] for i in live], None if rationales is None else [rationales[i] for i in live])
        # Seen items masked for all rows at once: one fancy-indexed write, not one per row.
        blocked = [histories[i] if exclude is None else
                   np.concatenate([histories[i], self.indices(list(exclude[i]))]) for i in live]
        rows = np.repeat(np.arange(len(live)), [len(b) for b in blocked])
        scores[rows, np.concatenate(blocked)] = -np.inf
        top = _top_k(scores, k)
        picked = np.take_along_axis(scores, top, axis=1)
        for row, i in enumerate(live):
            out[i] = [ServedItem(self.item_ids[j], float(v)) for j, v in zip(top[row], picked[row]) if np.isfinite(v)]
        return out


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, k] indices of each row's ``k`` largest scores, best first, equal scores by index. torch's top-k is
    ~5x numpy's argpartition here; only a tie exactly at the k-th place could pick another item than a stable
    full sort would."""
    k = min(k, scores.shape[1])
    vals, part = torch.topk(torch.from_numpy(scores), k, dim=1, sorted=True)
    part, vals = part.numpy(), vals.numpy()
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=1)


__all__ = ["ServedItem", "ServedRanker"]
