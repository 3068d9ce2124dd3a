"""SASRec (Kang & McAuley, ICDM 2018) in PyTorch: the ID-based sequential baseline SLIM is compared with and fused into.

Architecture: item embeddings (padding = 0) scaled by √d plus learned positional embeddings, dropout, a stack
of pre-LayerNorm causal self-attention blocks, a final LayerNorm; the score of item i after a prefix is the dot
product of the last hidden state with item i's (tied) embedding.

Training differs from the 2018 paper in one deliberate way: the loss is cross-entropy over the **full
catalogue** at every position (as in Klenitskiy & Vasilev, RecSys 2023, "Turning Dross Into Gold Loss: is BERT4Rec
really better than SASRec?"), not binary cross-entropy with one sampled negative; it is markedly stronger
and converges in far fewer epochs, which is what makes a CPU budget workable.

Sequences are left-padded so the newest item is always at the last position: position embeddings then mean
"k steps before now", which is what matters for next-item prediction. Each user's training sequence is cut
into consecutive windows of ``max_len + 1`` items from the newest backwards, so every training transition is
seen once per epoch (the original keeps only the newest ``max_len``). Early stopping on validation NDCG@10
(full ranking, history excluded) keeps the best epoch's weights. Seeded: same seed, same threads -> same model.
"""

from __future__ import annotations

import copy
import ctypes
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from models.metrics import full_rank_counts, history_mask, ndcg_at_k
from streams.splits import TrainingData


@dataclass(frozen=True)
class SASRecConfig:
    """Defaults are the paper's ML-1M settings where they exist (max_len 200, 2 blocks, dropout 0.2) and
    otherwise what trained fastest on ML-1M on 2 CPU cores."""

    max_len: int = 200  # items of history the model attends to
    dim: int = 64
    heads: int = 2
    blocks: int = 2
    dropout: float = 0.2
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 64  # windows (of up to max_len + 1 items) per step
    epochs: int = 20  # upper bound; early stopping usually ends sooner
    patience: int = 3  # validation checks without improvement before stopping
    eval_every: int = 1  # epochs between validation checks
    eval_batch_size: int = 512
    seed: int = 0
    # torch intra-op threads. 1 by default: on a small machine shared with other work, OpenMP threads
    # spin-wait for each other and 2 threads measured 2.5x *slower* per step than 1 on a busy 2-core box.
    # None leaves torch's default (all cores), the better choice on an idle multi-core machine.
    threads: int | None = 1
    time_budget_s: float | None = None  # stop before an epoch that would end past this much training time
    # Keep freed memory in the heap (glibc only; process-wide, so meant for evaluation processes): the
    # logits of every step are a ~100 MB tensor that glibc would otherwise mmap and unmap each time, and
    # the page faults measured 35% of the step time.
    reuse_memory: bool = True
    device: str = "cpu"


@dataclass
class EpochLog:
    epoch: int
    loss: float
    valid_ndcg10: float | None
    seconds: float


class _SASRecNet(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.dim, cfg.heads, dim_feedforward=cfg.dim * 2, dropout=cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        nn.init.normal_(self.item_emb.weight, std=cfg.dim ** -0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded item indices -> [B, L, d] hidden states (row t sees items 0..t)."""
        b, length = seq.shape
        pos = torch.arange(length, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.cfg.dim) + self.pos_emb(pos)[None]
        pad = seq == 0
        x = self.drop(x) * (~pad)[..., None]
        # Causal mask plus "never attend to padding" - except a position always sees itself, so the all-padding
        # rows at the start of a left-padded sequence have one finite score instead of a NaN softmax.
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)[None]
        blocked = blocked | pad[:, None, :]
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seq.device)[None]
        mask = blocked.repeat_interleave(self.cfg.heads, dim=0)
        return self.norm(self.blocks(x, mask=mask))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.item_emb.weight.T
        out[..., 0] = float("-inf")  # padding is never a prediction
        return out


def _keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds so large freed blocks are reused, not returned to the OS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, limit)) and bool(libc.mallopt(m_trim_threshold, limit))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


def _left_pad(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if len(s):
            out[row, length - len(s):] = s
    return out


def _training_windows(train: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """[n_windows, max_len + 1] left-padded windows covering every transition of every sequence once."""
    windows: list[np.ndarray] = []
    for seq in train:
        end = len(seq)
        while end >= 2:  # a window needs an input and a target
            start = max(0, end - (max_len + 1))
            windows.append(seq[start:end])
            end = start + 1  # the next window's target stream ends where this one's input began
    return _left_pad(windows, max_len + 1) if windows else np.zeros((0, max_len + 1), dtype=np.int64)


class SASRecRanker:
    """SASRec as a :class:`~models.rankers.Ranker`. ``history`` holds one :class:`EpochLog` per epoch."""

    name = "SASRec"

    def __init__(self, config: SASRecConfig | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.cfg = config or SASRecConfig()
        self.progress = progress
        self.net: _SASRecNet | None = None
        self.history: list[EpochLog] = []
        self.best_epoch: int | None = None
        self.stopped_by: str | None = None
        self.n_items = 0

    # -- training ----------------------------------------------------------------------------------------------
    def fit(self, data: TrainingData) -> None:
        cfg = self.cfg
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if cfg.reuse_memory and cfg.device == "cpu":
            _keep_freed_memory()
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng([cfg.seed, 0x5A5])
        device = torch.device(cfg.device)
        self.n_items = data.n_items
        net = _SASRecNet(data.n_items, cfg).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        windows = torch.from_numpy(_training_windows(data.train, cfg.max_len))
        if len(windows) == 0:
            raise ValueError("no training transitions: every training sequence is shorter than 2 items")
        valid_users = np.arange(data.n_users)
        valid_mask = history_mask(data.train, data.n_items + 1)
        self.history, best, best_state, stale = [], -1.0, None, 0
        self.stopped_by = "max epochs"
        self.net = net
        started = time.monotonic()
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.monotonic()
            if cfg.time_budget_s is not None and self.history and \
                    t0 - started + self.history[-1].seconds > cfg.time_budget_s:
                self.stopped_by = "time budget"
                break
            net.train()
            total, count = 0.0, 0
            order = torch.from_numpy(rng.permutation(len(windows)))
            for start in range(0, len(order), cfg.batch_size):
                batch = windows[order[start:start + cfg.batch_size]].to(device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                keep = targets != 0
                h = net.hidden(inputs)[keep]  # only positions with a real next item cost logits
                loss = nn.functional.cross_entropy(net.logits(h), targets[keep])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * int(keep.sum())
                count += int(keep.sum())
            ndcg = None
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                scores = self.score(valid_users, data.train)
                g, t = full_rank_counts(scores, data.valid_targets, valid_mask)
                ndcg = float(ndcg_at_k(g, 10, t).mean())
            self.history.append(EpochLog(epoch, total / max(count, 1), ndcg, time.monotonic() - t0))
            if self.progress:
                shown = "-" if ndcg is None else f"{ndcg:.4f}"
                self.progress(f"SASRec epoch {epoch}: loss {total / max(count, 1):.3f}, valid NDCG@10 {shown}",
                              epoch, cfg.epochs)
            if ndcg is not None:
                if ndcg > best:
                    best, best_state, stale, self.best_epoch = ndcg, copy.deepcopy(net.state_dict()), 0, epoch
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        self.stopped_by = "early stopping"
                        break
        if best_state is not None:
            net.load_state_dict(best_state)

    # -- scoring -----------------------------------------------------------------------------------------------
    def score(self, users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.net is None:
            raise RuntimeError("SASRecRanker.score called before fit")
        net, cfg = self.net, self.cfg
        was_training = net.training
        net.eval()
        out = np.empty((len(histories), self.n_items + 1), dtype=np.float32)
        device = next(net.parameters()).device
        with torch.no_grad():
            for start in range(0, len(histories), cfg.eval_batch_size):
                seq = torch.from_numpy(_left_pad(histories[start:start + cfg.eval_batch_size], cfg.max_len))
                h = net.hidden(seq.to(device))[:, -1]  # the newest position summarises the whole history
                out[start:start + len(seq)] = net.logits(h).float().cpu().numpy()
        net.train(was_training)
        return out

    def summary(self) -> dict:
        """Config and training curve, for the results file."""
        return {"config": asdict(self.cfg), "best_epoch": self.best_epoch, "stopped_by": self.stopped_by,
                "epochs": [asdict(e) for e in self.history]}
