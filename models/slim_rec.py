"""SLIM's two trained recommenders on the SASRec backbone (Wang et al., WWW 2024, section 3.3).

* **ID-based** (``items="id"``): SASRec's item-ID embeddings; the user's rationale embedding (a sentence vector of
  the student's rationale) is projected to the model width, concatenated with the sequence state and projected
  back (a residual: ``u = LN(h + W [h ; P r])``), trained end to end with the backbone.
* **ID-agnostic** (``items="text"``): no ID embedding at all; an item is the projection of its (frozen) text
  embedding, in the input sequence and as the output table, so an item no one has interacted with is scored
  from its text alone. The same rationale fusion. ``items="id+text"`` sums both representations.

Rationales and leakage. A user's rationale is written from a *prefix* of their training sequence,
``train[:cut]`` with ``cut = len(train) - rationale_tail``; during training the rationale is the input only of
positions whose target comes after that prefix (the others get the learned **no-rationale** vector), so the
model learns to use a rationale for what happens after it, as at serving time. Users without a rationale (not
generated, or empty) get the no-rationale vector everywhere: a model trained with rationales for part of the
users serves everyone. At validation and test time the user's rationale is the same prefix's; no validation or
test item is ever in a prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from models.sasrec import SASRecConfig, SASRecRanker, _left_pad, _SASRecNet
from streams.splits import TrainingData

RationaleFn = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]
"""``(users, prefixes) -> [n, dim]`` unit rationale vectors (a zero row: no rationale)."""


@dataclass(frozen=True)
class SLIMRecConfig(SASRecConfig):
    items: Literal["id", "text", "id+text"] = "id"
    rationale_tail: int = 10  # training targets after the rationale's prefix (the rest see the null vector)
    # Width of the text adapter's hidden layer (0: one linear map). MiniLM puts "Star Wars" next to "Star Kid";
    # a linear projection cannot pull apart what the sentence space put together, a small MLP can.
    text_hidden: int = 256


def _text_adapter(text_dim: int, dim: int, hidden: int) -> nn.Module:
    """Frozen text vector -> item representation; bias-free, so the padding row (a zero vector) stays zero."""
    if hidden <= 0:
        proj = nn.Linear(text_dim, dim, bias=False)
        nn.init.normal_(proj.weight, std=text_dim ** -0.5 * dim ** -0.5)
        return proj
    return nn.Sequential(nn.Linear(text_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, dim, bias=False))


class _SLIMNet(_SASRecNet):
    def __init__(self, n_items: int, cfg: SLIMRecConfig, item_text: torch.Tensor | None,
                 rationale_dim: int | None) -> None:
        super().__init__(n_items, cfg)
        self.mode = cfg.items
        if self.mode != "id":
            assert item_text is not None
            self.register_buffer("item_text", item_text, persistent=False)
            self.text_proj = _text_adapter(item_text.shape[1], cfg.dim, cfg.text_hidden)
        if self.mode == "text":
            self.item_emb.weight.requires_grad_(False)
            with torch.no_grad():
                self.item_emb.weight.zero_()
        self.rationale_dim = rationale_dim
        if rationale_dim is not None:
            self.null_rationale = nn.Parameter(torch.zeros(rationale_dim))
            self.rationale_proj = nn.Linear(rationale_dim, cfg.dim)
            self.fuse = nn.Linear(2 * cfg.dim, cfg.dim)
            nn.init.zeros_(self.fuse.weight)  # starts as the backbone: the rationale must earn its weight
            nn.init.zeros_(self.fuse.bias)
            self.fuse_norm = nn.LayerNorm(cfg.dim)

    def item_table(self) -> torch.Tensor:
        if self.mode == "id":
            return self.item_emb.weight
        text = self.text_proj(self.item_text)  # padding row: a zero text vector -> zero
        return text if self.mode == "text" else text + self.item_emb.weight

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        if self.mode == "id":
            return self.item_emb(seq)
        return nn.functional.embedding(seq, self.item_table())

    def with_rationale(self, h: torch.Tensor, r: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
        """``h`` [..., d] fused with rationale ``r`` [..., rdim] where ``use``, else with the null vector."""
        if self.rationale_dim is None:
            return h
        r = torch.where(use[..., None], r, self.null_rationale.to(r.dtype))
        return self.fuse_norm(h + self.fuse(torch.cat([h, self.rationale_proj(r)], dim=-1)))


def user_states(net: Any, seq: torch.Tensor, rationale: torch.Tensor | None = None,
                use: torch.Tensor | None = None, table: torch.Tensor | None = None) -> torch.Tensor:
    """[B, d] user states of left-padded histories ``seq`` [B, L]: the newest position, fused with the rationale
    ``rationale`` [B, rdim] where ``use``, else the null vector. The one function the harness (through
    :meth:`SLIMRecRanker.score`) and the worker (:mod:`models.served_ranker`) both call. ``table``: see
    :meth:`models.sasrec._SASRecNet.hidden`."""
    h = net.hidden(seq, table)[:, -1]
    if getattr(net, "rationale_dim", None) is None:
        return h
    if rationale is None or use is None:
        rationale = torch.zeros(len(h), net.rationale_dim)
        use = torch.zeros(len(h), dtype=torch.bool)
    return net.with_rationale(h, rationale.to(h.device, h.dtype), use.to(h.device))


@dataclass
class RationaleInputs:
    """Per user: the rationale vector (zero row: none) and where its prefix ends in the training sequence."""

    vectors: np.ndarray  # [n_users, rdim] float32
    cuts: np.ndarray  # [n_users] int64: rationale written from train[:cut]; -1: no rationale
    source: str = ""
    counts: dict[str, int] = field(default_factory=dict)


def rationale_cuts(train: Sequence[np.ndarray], tail: int) -> np.ndarray:
    return np.asarray([max(1, len(s) - tail) for s in train], dtype=np.int64)


def rationale_inputs(data: TrainingData, rationale: RationaleFn, users: np.ndarray, tail: int,
                     source: str = "") -> RationaleInputs:
    """Ask ``rationale`` for ``users``' prefixes (everyone else: no rationale)."""
    cuts_all = rationale_cuts(data.train, tail)
    users = np.asarray(users, dtype=np.int64)
    prefixes = [np.asarray(data.train[u][:cuts_all[u]]) for u in users]
    vecs = np.asarray(rationale(users, prefixes), dtype=np.float32)
    out = np.zeros((data.n_users, vecs.shape[1]), dtype=np.float32)
    cuts = np.full(data.n_users, -1, dtype=np.int64)
    has = np.linalg.norm(vecs, axis=1) > 0
    out[users[has]] = vecs[has]
    cuts[users[has]] = cuts_all[users[has]]
    return RationaleInputs(out, cuts, source, {"asked": int(len(users)), "with_rationale": int(has.sum()),
                                                "empty": int((~has).sum())})


def _user_windows(train: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec's windows plus, per window, its user and the training-sequence index of every target slot
    (-1 where the target is padding)."""
    rows, users, target_idx = [], [], []
    for u, seq in enumerate(train):
        end = len(seq)
        while end >= 2:
            start = max(0, end - (max_len + 1))
            rows.append(seq[start:end])
            users.append(u)
            idx = np.full(max_len, -1, dtype=np.int64)
            n = end - start - 1  # targets seq[start+1 .. end-1], right-aligned
            idx[max_len - n:] = np.arange(start + 1, end)
            target_idx.append(idx)
            end = start + 1
    if not rows:
        return np.zeros((0, max_len + 1), np.int64), np.zeros(0, np.int64), np.zeros((0, max_len), np.int64)
    return _left_pad(rows, max_len + 1), np.asarray(users, np.int64), np.stack(target_idx)


class SLIMRecRanker(SASRecRanker):
    """A trained SLIM recommender (module docstring); ``rationales``: None for the same model without them
    (the ablation). ``item_text``: [n_items + 1, dim] item-text vectors, needed unless ``items="id"``."""

    def __init__(self, config: SLIMRecConfig | None = None, *, item_text: np.ndarray | None = None,
                 rationales: RationaleInputs | None = None, name: str | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        cfg = config or SLIMRecConfig()
        super().__init__(cfg, progress)
        if cfg.items != "id" and item_text is None:
            raise ValueError(f"items={cfg.items!r} needs item-text vectors")
        self.item_text = None if item_text is None else np.asarray(item_text, dtype=np.float32)
        self.rationales = rationales
        label = {"id": "ID-based", "text": "ID-agnostic", "id+text": "ID + text"}[cfg.items]
        self.name = name or f"SLIM {label} ({'with' if rationales is not None else 'no'} rationale)"

    def _make_net(self, data: TrainingData) -> nn.Module:
        text = None if self.item_text is None else torch.from_numpy(self.item_text)
        rdim = None if self.rationales is None else int(self.rationales.vectors.shape[1])
        return _SLIMNet(data.n_items, self.cfg, text, rdim)  # type: ignore[arg-type]

    def fit(self, data: TrainingData) -> None:
        super().fit(data)
        if self.cfg.items == "id+text" and data.unknown_items is not None and self.net is not None:
            # An item unknown at training time has no ID evidence, only its never-trained initial embedding:
            # zeroed, its text alone represents it (as in the ID-agnostic model) instead of text plus noise.
            with torch.no_grad():
                self.net.item_emb.weight[torch.from_numpy(np.asarray(data.unknown_items, dtype=np.int64))] = 0.0

    def _windows(self, data: TrainingData) -> dict[str, torch.Tensor]:
        seq, users, target_idx = _user_windows(data.train, self.cfg.max_len)
        out = {"seq": torch.from_numpy(seq), "user": torch.from_numpy(users)}
        if self.rationales is not None:
            cuts = self.rationales.cuts[users]
            # The rationale describes train[:cut]: it may inform the prediction of train[cut] and later only.
            out["use"] = torch.from_numpy((cuts[:, None] >= 0) & (target_idx >= cuts[:, None]))
        return out

    def _hidden(self, net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = net.hidden(batch["seq"][:, :-1])
        if self.rationales is None:
            return h
        r = torch.from_numpy(self.rationales.vectors)[batch["user"].cpu()].to(h.device)
        return net.with_rationale(h, r[:, None, :].expand(-1, h.shape[1], -1).to(h.dtype), batch["use"])

    def _user_state(self, net: Any, users: np.ndarray, seq: torch.Tensor) -> torch.Tensor:
        if self.rationales is None:
            return user_states(net, seq)
        users = np.asarray(users, dtype=np.int64)
        return user_states(net, seq, torch.from_numpy(self.rationales.vectors[users]),
                           torch.from_numpy(self.rationales.cuts[users] >= 0))

    def _fingerprint(self, h: Any) -> None:
        if self.item_text is not None:
            h.update(self.item_text.tobytes())
        if self.rationales is not None:
            h.update(self.rationales.vectors.tobytes())
            h.update(self.rationales.cuts.tobytes())

    def summary(self) -> dict:
        out = super().summary()  # its config is this model's (asdict of the SLIMRecConfig)
        if self.rationales is not None:
            out["rationales"] = {"source": self.rationales.source, **self.rationales.counts}
        return out


__all__ = ["RationaleInputs", "SLIMRecConfig", "SLIMRecRanker", "rationale_cuts", "rationale_inputs", "user_states"]
