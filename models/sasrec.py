"""SASRec (Kang & McAuley, ICDM 2018) in PyTorch: the ID-based sequential baseline SLIM is compared with and fused into.

Architecture: item embeddings (padding = 0) scaled by √d plus learned positional embeddings, dropout, a stack
of pre-LayerNorm causal self-attention blocks, a final LayerNorm; the score of item i after a prefix is the dot
product of the last hidden state with item i's (tied) embedding.

Training differs from the 2018 paper in one deliberate way: the loss is cross-entropy over the **full
catalogue** at every position (as in Klenitskiy & Vasilev, RecSys 2023, "Turning Dross Into Gold Loss: is BERT4Rec
really better than SASRec?"), not binary cross-entropy with one sampled negative; it is markedly stronger
and converges in far fewer epochs, which is what makes a CPU budget workable.

Speed on a CPU (``benchmarks/sasrec_convergence.py`` measures it): the forward pass and the loss run under
bf16 autocast where the CPU supports it (``bf16``; scores for ranking are computed in fp32 so ranks do not tie
on rounding), optionally against ``negatives`` uniformly sampled items shared by the batch instead of the full
catalogue (sampled softmax, as in gSASRec / SASRec+3000: a large catalogue costs what ``negatives`` items do),
and ``checkpoint_dir`` keeps one checkpoint per training run (weights, optimiser, RNG states, curve, best
weights) written after every epoch, so an interrupted run resumes exactly where it stopped.

Sequences are left-padded so the newest item is always at the last position: position embeddings then mean
"k steps before now", which is what matters for next-item prediction. Each user's training sequence is cut
into consecutive windows of ``max_len + 1`` items from the newest backwards, so every training transition is
seen once per epoch (the original keeps only the newest ``max_len``). Early stopping on validation NDCG@10
(full ranking, history excluded) keeps the best epoch's weights. Seeded: same seed, same threads -> same model.
"""

from __future__ import annotations

import copy
import ctypes
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.metrics import full_rank_counts, history_mask, ndcg_at_k
from streams.splits import TrainingData

log = logging.getLogger(__name__)


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
    patience: int = 5  # validation checks without improvement before stopping (validation NDCG is noisy)
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
    bf16: bool = True  # autocast the training forward pass to bfloat16 where the CPU has native support
    negatives: int | None = None  # None: full cross-entropy; n: sampled softmax over n shared uniform negatives
    checkpoint_dir: str | None = None  # where a run's checkpoint lives (None: no checkpoints)


# Fields that do not change what a run computes: a checkpoint written under other values still resumes.
_RUN_NEUTRAL = frozenset({"epochs", "eval_batch_size", "time_budget_s", "reuse_memory", "checkpoint_dir", "patience",
                          "threads"})  # threads: the same computation up to float summation order


ROW_BUCKET = 512
IGNORE = -100


def _bucket_rows(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h`` and ``targets`` padded with zero rows / padding targets to a multiple of ROW_BUCKET rows, and
    which rows are real."""
    n = h.shape[0]
    pad = (-n) % ROW_BUCKET
    real = torch.ones(n + pad, dtype=torch.bool, device=h.device)
    if pad:
        h = torch.cat([h, h.new_zeros(pad, h.shape[1])])
        targets = torch.cat([targets, targets.new_zeros(pad)])
        real[n:] = False
    return h, targets, real


def bf16_supported() -> bool:
    """Native bfloat16 matmuls on this CPU (AVX512-BF16 / AMX); elsewhere autocast would emulate and be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


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

    def hidden(self, seq: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] left-padded item indices -> [B, L, d] hidden states (row t sees items 0..t). ``table``: the
        input item vectors to use instead of the trained ones (a served table extended with new items)."""
        b, length = seq.shape
        pos = torch.arange(length, device=seq.device)
        emb = self.embed(seq) if table is None else nn.functional.embedding(seq, table)
        x = emb * math.sqrt(self.cfg.dim) + self.pos_emb(pos)[None]
        pad = seq == 0
        x = self.drop(x) * (~pad)[..., None]
        # Causal mask plus "never attend to padding" - except a position always sees itself, so the all-padding
        # rows at the start of a left-padded sequence have one finite score instead of a NaN softmax.
        blocked = torch.triu(torch.ones(length, length, dtype=torch.bool, device=seq.device), 1)[None]
        blocked = blocked | pad[:, None, :]
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=seq.device)[None]
        mask = blocked.repeat_interleave(self.cfg.heads, dim=0)
        return self.norm(self.blocks(x, mask=mask))

    def item_table(self) -> torch.Tensor:
        """[n_items + 1, d] output item vectors (tied with the input embedding)."""
        return self.item_emb.weight

    def embed(self, seq: torch.Tensor) -> torch.Tensor:
        return self.item_emb(seq)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        out = h @ self.item_table().T
        out[..., 0] = float("-inf")  # padding is never a prediction
        return out

    def sampled_logits(self, h: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """[N, 1 + n] logits of each row's target (column 0) and the batch's shared negatives; a negative that
        is the row's own target is masked out (it would be scored as a wrong answer)."""
        table = self.item_table()
        pos = (h * table[targets]).sum(-1, keepdim=True)
        neg = h @ table[negatives].T
        neg = neg.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
        return torch.cat([pos, neg], dim=1)


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


@dataclass
class _RunState:
    """Where a training run is: written after every epoch so that a resumed run continues exactly."""

    epoch: int = 0
    history: list[EpochLog] | None = None
    best: float = -1.0
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped_by: str | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        if self.history is None:
            self.history = []

    def save(self, path: Path, net: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"format": 1, "epoch": self.epoch, "history": [asdict(e) for e in self.history or []],
                    "best": self.best, "best_epoch": self.best_epoch, "best_state": self.best_state,
                    "stale": self.stale, "stopped_by": self.stopped_by, "finished": self.finished,
                    "net": net.state_dict(), "opt": opt.state_dict(), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": rng.bit_generator.state}, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous epoch's checkpoint

    @classmethod
    def load(cls, path: Path, net: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator) -> _RunState:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        net.load_state_dict(ck["net"])
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["torch_rng"])
        rng.bit_generator.state = ck["numpy_rng"]
        return cls(epoch=ck["epoch"], history=[EpochLog(**e) for e in ck["history"]], best=ck["best"],
                   best_epoch=ck["best_epoch"], best_state=ck["best_state"], stale=ck["stale"],
                   stopped_by=ck["stopped_by"], finished=ck["finished"])


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
        self._unknown: torch.Tensor | None = None  # items unknown at training time (TrainingData.unknown_items)
        self._known: np.ndarray | None = None

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
        # Items not in the catalogue yet (the item cold-start protocol): no logit, no negative, no competitor.
        self._unknown = (None if data.unknown_items is None or len(data.unknown_items) == 0
                         else torch.from_numpy(np.asarray(data.unknown_items, dtype=np.int64)).to(device))
        self._known = (None if self._unknown is None
                       else np.setdiff1d(np.arange(1, data.n_items + 1), data.unknown_items))
        net = self._make_net(data).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        windows = self._windows(data)
        if len(windows["seq"]) == 0:
            raise ValueError("no training transitions: every training sequence is shorter than 2 items")
        self.net = net
        state = _RunState()
        checkpoint = self._checkpoint_path(data)
        if checkpoint is not None and checkpoint.is_file():
            state = _RunState.load(checkpoint, net, opt, rng)
            log.info("SASRec: resumed %s after epoch %d", checkpoint, state.epoch)
        self.history = state.history
        use_bf16 = cfg.bf16 and cfg.device == "cpu" and bf16_supported()
        # A fresh autocast context per batch, weight-cast cache off: one reused context with its cache grew the
        # process by ~150 MB per ML-100k epoch (measured) until the OOM killer ended an ML-1M run at 21 GB.
        autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)) if use_bf16
                    else nullcontext)
        started = time.monotonic() - sum(e.seconds for e in state.history)
        while not state.finished and state.epoch < cfg.epochs:
            t0 = time.monotonic()
            if cfg.time_budget_s is not None and self.history and \
                    t0 - started + self.history[-1].seconds > cfg.time_budget_s:
                state.stopped_by = "time budget"
                break
            epoch = state.epoch + 1
            loss = self._train_epoch(net, opt, windows, rng, autocast, device)
            ndcg = self._validate(data) if epoch % cfg.eval_every == 0 or epoch == cfg.epochs else None
            self.history.append(EpochLog(epoch, loss, ndcg, time.monotonic() - t0))
            if self.progress:
                shown = "-" if ndcg is None else f"{ndcg:.4f}"
                self.progress(f"SASRec epoch {epoch}: loss {loss:.3f}, valid NDCG@10 {shown}", epoch, cfg.epochs)
            state.epoch = epoch
            if ndcg is not None:
                if ndcg > state.best:
                    state.best, state.best_epoch, state.stale = ndcg, epoch, 0
                    state.best_state = copy.deepcopy(net.state_dict())
                else:
                    state.stale += 1
                    if state.stale >= cfg.patience:
                        state.stopped_by, state.finished = "early stopping", True
            if checkpoint is not None:
                state.save(checkpoint, net, opt, rng)
        if not state.finished and state.stopped_by is None:
            state.stopped_by = "max epochs"
        self.best_epoch, self.stopped_by = state.best_epoch, state.stopped_by
        if state.best_state is not None:
            net.load_state_dict(state.best_state)

    # -- what a subclass changes (models/slim_rec.py): the network, the training windows, the user states ------
    def _make_net(self, data: TrainingData) -> nn.Module:
        return _SASRecNet(data.n_items, self.cfg)

    def _windows(self, data: TrainingData) -> dict[str, torch.Tensor]:
        """Training tensors aligned by window; ``seq``: [n_windows, max_len + 1] left-padded item indices."""
        return {"seq": torch.from_numpy(_training_windows(data.train, self.cfg.max_len))}

    def _hidden(self, net: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, L, d] states of a training batch (inputs = ``seq[:, :-1]``)."""
        return net.hidden(batch["seq"][:, :-1])

    def _fingerprint(self, h: Any) -> None:
        """Add what else makes a run (beyond config and data) to the checkpoint hash ``h``."""

    def _train_epoch(self, net: Any, opt: torch.optim.Optimizer, windows: dict[str, torch.Tensor],
                     rng: np.random.Generator, autocast: Any, device: torch.device) -> float:
        cfg = self.cfg
        net.train()
        total, count = 0.0, 0
        order = torch.from_numpy(rng.permutation(len(windows["seq"])))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            batch = {k: v[idx].to(device) for k, v in windows.items()}
            targets = batch["seq"][:, 1:]
            keep = targets != 0
            with autocast():
                h = self._hidden(net, batch)[keep]  # only positions with a real next item cost logits
                # Rows padded up to a multiple of ROW_BUCKET (ignored by the loss): oneDNN caches a kernel per
                # matmul shape, and one shape per batch made a bf16 ML-1M run grow to 21 GB.
                h, tgt, real = _bucket_rows(h, targets[keep])
                if cfg.negatives is not None and cfg.negatives < self.n_items:
                    draw = (rng.integers(1, self.n_items + 1, cfg.negatives) if self._known is None
                            else self._known[rng.integers(0, len(self._known), cfg.negatives)])
                    negs = torch.from_numpy(draw).to(device)
                    labels = torch.where(real, 0, IGNORE)
                    loss = nn.functional.cross_entropy(net.sampled_logits(h, tgt, negs).float(), labels,
                                                       ignore_index=IGNORE)
                else:
                    logits = net.logits(h)
                    if self._unknown is not None:
                        logits = logits.index_fill(-1, self._unknown, float("-inf"))
                    loss = nn.functional.cross_entropy(logits.float(), torch.where(real, tgt, IGNORE),
                                                       ignore_index=IGNORE)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n = int(keep.sum())
            total += float(loss.detach()) * n
            count += n
        return total / max(count, 1)

    def _validate(self, data: TrainingData) -> float:
        """Validation NDCG@10: full ranking, history excluded, history = the training sequence."""
        scores = self.score(np.arange(data.n_users), data.train)
        excluded = history_mask(data.train, data.n_items + 1)
        if data.unknown_items is not None:
            excluded[:, data.unknown_items] = True  # not in the catalogue yet: not a competitor
        g, t = full_rank_counts(scores, data.valid_targets, excluded)
        return float(ndcg_at_k(g, 10, t).mean())

    def _checkpoint_path(self, data: TrainingData) -> Path | None:
        """One file per (config that matters, training data): a changed setting or dataset starts afresh."""
        if self.cfg.checkpoint_dir is None:
            return None
        h = hashlib.sha256()
        h.update(json.dumps({f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)
                             if f.name not in _RUN_NEUTRAL}, sort_keys=True, default=str).encode())
        h.update(f"{data.n_users}:{data.n_items}".encode())
        for seq in data.train:
            h.update(np.asarray(seq, dtype=np.int64).tobytes())
            h.update(b"|")
        h.update(np.asarray(data.valid_targets, dtype=np.int64).tobytes())
        if data.unknown_items is not None:  # only then: the checkpoints of ordinary runs keep their names
            h.update(b"unknown:" + np.asarray(data.unknown_items, dtype=np.int64).tobytes())
        self._fingerprint(h)
        return Path(self.cfg.checkpoint_dir) / f"sasrec-{h.hexdigest()[:16]}.pt"

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
                h = self._user_state(net, users[start:start + len(seq)], seq.to(device))
                out[start:start + len(seq)] = net.logits(h).float().cpu().numpy()
        net.train(was_training)
        return out

    def _user_state(self, net: Any, users: np.ndarray, seq: torch.Tensor) -> torch.Tensor:
        """[B, d]: the newest position summarises the whole history."""
        return net.hidden(seq)[:, -1]

    def summary(self) -> dict:
        """Config and training curve, for the results file."""
        return {"config": asdict(self.cfg), "best_epoch": self.best_epoch, "stopped_by": self.stopped_by,
                "epochs": [asdict(e) for e in self.history]}
