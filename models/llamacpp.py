"""llama.cpp backends (optional extra ``slimstream[llamacpp]``): the fast CPU path for GGUF chat models.

llama.cpp runs the quantized GGUF directly (no de-quantization), about 6x the tokens/s of transformers on
these CPUs, which is what makes a teacher run or a student evaluation over hundreds of users fit a session.

* :class:`LlamaCppStudent` — the student (:class:`models.student_base.StudentBackend`), greedy, one rationale per
  prompt; for a distilled student the LoRA adapter is merged and exported to GGUF first
  (:func:`export_student_gguf`: float32 export, then llama.cpp's quantizer), since the adapter is in PEFT
  format.
* :class:`LlamaCppChatBackend` — :class:`models.serving.backend.ChatBackend` for ``serve-teacher
  --backend llamacpp``: sampling, ``n`` samples (the prompt's KV cache is reused between them), stop strings,
  token counts, cancellation.

The export copies every metadata field (architecture, tokenizer, chat template) of the base GGUF and writes
the merged weights in float32 (or float16) under the base file's tensor names, re-applying the rotary
row-permutation of the Q/K projections that transformers undoes when it reads a llama GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from models.serving.backend import STOP_TOKENS, Generation
from models.student_base import adapter_digest, adapter_name, postprocess_rationale, student_gguf_path
from streams.settings import Settings

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

def _require_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:  # an optional extra: say how to get it
        raise RuntimeError("the llama.cpp backend needs llama-cpp-python: pip install 'slimstream[llamacpp]' "
                           "(compiles llama.cpp, ~6 min on 2 cores)") from exc
    return llama_cpp


class _NoRedirect:
    """Stands in for llama-cpp-python's ``suppress_stdout_stderr``, which with ``verbose=False`` dup2()s
    /dev/null over file descriptors 1 and 2 while a model loads. Descriptors are process-wide: in a worker
    every other thread's output vanished meanwhile (Faust's shutdown log of a SIGTERM during the student's
    load, found by the recovery benchmark). llama.cpp's own messages go through the log callback that
    ``verbose=False`` already filters at ERROR, so nothing is lost by not redirecting."""

    def __init__(self, disable: bool = True) -> None:
        pass

    def __enter__(self) -> "_NoRedirect":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _keep_process_streams() -> None:
    import importlib

    for name in ("llama_cpp.llama", "llama_cpp._internals", "llama_cpp.llama_chat_format"):
        module = importlib.import_module(name)
        if hasattr(module, "suppress_stdout_stderr"):
            module.suppress_stdout_stderr = _NoRedirect


def load_llama(gguf: str | os.PathLike[str], *, threads: int, n_ctx: int = 4096, seed: int = 0) -> Llama:
    llama_cpp = _require_llama_cpp()
    _keep_process_streams()  # the redirect happens while a model loads: here, not on every generation
    return llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                           seed=seed, verbose=False)


def _stop_strings(llm: Llama) -> list[str]:
    """End-of-turn markers the vocabulary has. SmolLM2's GGUF names the wrong EOS token, so generation must
    stop on ``<|im_end|>`` explicitly, not on the model's EOS alone."""
    out = []
    for s in STOP_TOKENS:
        toks = llm.tokenize(s.encode(), add_bos=False, special=True)
        if len(toks) == 1:
            out.append(s)
    return out


def _chat_formatter(llm: Llama) -> Any:
    """The GGUF's own chat template (``tokenizer.chat_template``), rendered with jinja2 by llama-cpp-python."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF has no chat template (tokenizer.chat_template)")

    def token_text(key: str) -> str:
        tid = llm.metadata.get(key)
        return llm.detokenize([int(tid)], special=True).decode("utf-8", "replace") if tid is not None else ""

    return Jinja2ChatFormatter(template=template, eos_token=token_text("tokenizer.ggml.eos_token_id"),
                               bos_token=token_text("tokenizer.ggml.bos_token_id"))


class _Deadline:
    """llama.cpp stopping criterion: true once ``cancelled()`` or the deadline has passed."""

    def __init__(self, deadline_s: float, cancelled: Callable[[], bool] | None) -> None:
        self.until = time.monotonic() + deadline_s
        self.cancelled = cancelled
        self.fired = False

    def __call__(self, input_ids: Any, logits: Any) -> bool:
        if time.monotonic() > self.until or (self.cancelled is not None and self.cancelled()):
            self.fired = True
        return self.fired


class LlamaCppChatBackend:
    """Chat completions through llama.cpp; one generation at a time (the model's KV cache is shared)."""

    def __init__(self, gguf: str | os.PathLike[str], *, model_id: str | None = None, threads: int = 1,
                 deadline_s: float = 600.0, n_ctx: int = 4096) -> None:
        self.llm = load_llama(gguf, threads=threads, n_ctx=n_ctx)
        self.model_id = model_id or Path(gguf).stem
        self.max_model_len: int | None = n_ctx
        self.deadline_s = deadline_s
        self._stops = _stop_strings(self.llm)
        self._formatter = _chat_formatter(self.llm)
        self._lock = threading.Lock()

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Generation]:
        """``temperature == 0``: greedy (one generation, repeated ``n`` times); else ``n`` samples with seeds
        ``seed, seed + 1, ...`` (reproducible). Stop strings are not part of the text."""
        llama_cpp = _require_llama_cpp()
        if n < 1 or max_tokens < 1:
            raise ValueError("n and max_tokens must be >= 1")
        greedy = temperature <= 0
        stops = list(dict.fromkeys([*self._stops, *[s for s in stop if s]]))
        out: list[Generation] = []
        # The chat template is rendered here and sent as a plain completion: llama-cpp-python's chat API
        # takes no stopping criteria, which cancellation and the deadline need.
        prompt = self._formatter(messages=list(messages)).prompt
        with self._lock:
            for i in range(1 if greedy else n):
                deadline = _Deadline(self.deadline_s, cancelled)
                resp = self.llm.create_completion(
                    prompt, max_tokens=max_tokens, temperature=max(temperature, 0.0), top_p=top_p,
                    top_k=0 if not greedy else 40, min_p=0.0, repeat_penalty=1.0,
                    seed=None if seed is None else seed + i, stop=stops,
                    stopping_criteria=llama_cpp.StoppingCriteriaList([deadline]),
                )
                choice = resp["choices"][0]
                usage = resp.get("usage") or {}
                finish: Literal["stop", "length"] = (
                    "length" if deadline.fired or choice.get("finish_reason") == "length" else "stop")
                out.append(Generation((choice.get("text") or "").strip(), int(usage.get("prompt_tokens", 0)),
                                      int(usage.get("completion_tokens", 0)), finish))
        return out * n if greedy else out


class LlamaCppStudent:
    """The student through llama.cpp: greedy rationales, the same post-processing as the transformers one.

    ``gguf``: the file to run (default: the packaged SmolLM2 GGUF); ``adapter_dir``: a PEFT LoRA adapter,
    merged into the base and exported (:func:`export_student_gguf`, once per adapter); ``requantize``: run
    the base through that same export too (for a like-for-like comparison with a distilled student).
    """

    def __init__(self, settings: Settings, *, adapter_dir: str | os.PathLike[str] | None = None,
                 gguf: str | os.PathLike[str] | None = None, requantize: bool = False) -> None:
        self.settings = settings
        started = time.perf_counter()
        if adapter_dir is not None or requantize:
            path = export_student_gguf(self.settings, adapter_dir)
            self.model_version = (self.settings.student.model_version if adapter_dir is None
                                  else f"{self.settings.student.model_version}+{adapter_name(adapter_dir)}")
        else:
            path = Path(gguf) if gguf is not None else student_gguf_path(self.settings)
            self.model_version = self.settings.student.model_version
        self.gguf = path
        self.chat = LlamaCppChatBackend(path, model_id=self.model_version, threads=self.settings.student.threads,
                                        deadline_s=self.settings.student.deadline_s)
        self.load_seconds = time.perf_counter() - started

    def generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]:
        out = []
        for messages in batch:
            g = self.chat.complete(messages, max_tokens=self.settings.student.max_new_tokens)[0]
            out.append(postprocess_rationale(g.text, truncated=g.finish_reason == "length"))
        return out


# --------------------------------------------------------------------------------------------------------
# exporting a merged (base + LoRA) student to GGUF


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The rotary row order llama.cpp expects (convert_hf_to_gguf's ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensor_name(hf_name: str) -> str | None:
    import re

    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if not m:
        return None
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
            "post_attention_layernorm": "ffn_norm"}.get(m.group(2))
    return None if part is None else f"blk.{m.group(1)}.{part}.weight"


def write_gguf_like(base_gguf: str | os.PathLike[str], state_dict: dict[str, Any], out: str | os.PathLike[str],
                    *, n_head: int, n_kv_head: int, dtype: Literal["f32", "f16"] = "f32") -> Path:
    """Write ``state_dict`` (a transformers Llama model's tensors) as a GGUF with ``base_gguf``'s metadata.

    Every tensor of the base file must be present (same names after mapping, same shapes); the file is
    written to a temporary name and renamed, so a crash never leaves a half file behind.
    """
    import gguf

    reader = gguf.GGUFReader(str(base_gguf))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    if arch != "llama":
        raise ValueError(f"export supports llama-architecture GGUFs, not {arch!r}")
    by_name = {}
    for hf_name, t in state_dict.items():
        name = _gguf_tensor_name(hf_name)
        if name is not None:
            by_name[name] = t.detach().to("cpu").float().numpy()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # written by the writer itself
        if field.name == "general.file_type":
            writer.add_file_type(0 if dtype == "f32" else 1)
            continue
        ftype = field.types[0]
        if ftype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value = [str(bytes(field.parts[i]), "utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            writer.add_key_value(field.name, value, ftype, sub_type=sub)
        elif ftype == gguf.GGUFValueType.STRING:
            writer.add_key_value(field.name, str(bytes(field.parts[-1]), "utf-8"), ftype)
        else:
            writer.add_key_value(field.name, field.parts[-1].tolist()[0], ftype)
    for t in reader.tensors:
        name = t.name
        if name not in by_name:
            if name == "output.weight" and "token_embd.weight" in by_name:  # tied embeddings
                arr = by_name["token_embd.weight"]
            else:
                raise ValueError(f"the merged model has no tensor for {name}")
        else:
            arr = by_name[name]
        if name.endswith("attn_q.weight"):
            arr = _permute_qk(arr, n_head)
        elif name.endswith("attn_k.weight"):
            arr = _permute_qk(arr, n_kv_head)
        expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        if arr.shape != expected:
            raise ValueError(f"{name}: shape {arr.shape}, base GGUF has {expected}")
        keep_f32 = arr.ndim == 1 or dtype == "f32"  # norms stay float32, as llama.cpp's converter does
        writer.add_tensor(name, arr.astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def quantize_gguf(src: Path, dst: Path, quant: Literal["q8_0", "q4_1", "f16"], threads: int = 2) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``), written to a temporary name then renamed."""
    import ctypes

    llama_cpp = _require_llama_cpp()
    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
             "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16}[quant]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    tmp = dst.with_name(dst.name + ".tmp")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {quant}) failed with {rc}")
    os.replace(tmp, dst)
    return dst


def export_student_gguf(settings: Settings, adapter_dir: str | os.PathLike[str] | None = None, *,
                        quant: Literal["q8_0", "q4_1", "f16"] = "q8_0") -> Path:
    """The student (base, or base + LoRA adapter merged) as a llama.cpp GGUF in ``quant``, cached under
    ``<data_dir>/student-gguf/`` by the adapter's content hash (a changed adapter is re-exported).

    The base goes through the same path when compared with a distilled student, so both run with the same
    quantization: the packaged file is Q4_1, and merged LoRA deltas are off its grid, which Q8_0 keeps.
    """
    from filelock import FileLock

    from models.student import load_base_model

    base_gguf = student_gguf_path(settings)
    h = hashlib.sha256(f"{base_gguf.name}:{base_gguf.stat().st_size}".encode())
    if adapter_dir is not None:
        h.update(adapter_digest(adapter_dir).encode())
        name = adapter_name(adapter_dir)
    else:
        name = "base"
    out_dir = Path(settings.data.data_dir) / "student-gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}-{h.hexdigest()[:12]}-{quant}.gguf"
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        _, model, _ = load_base_model(settings)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        cfg = model.config
        f32 = out.with_name(out.stem + "-f32.gguf")
        write_gguf_like(base_gguf, model.state_dict(), f32, n_head=cfg.num_attention_heads,
                        n_kv_head=cfg.num_key_value_heads)
        try:
            quantize_gguf(f32, out, quant, threads=max(1, settings.student.threads))
        finally:
            f32.unlink(missing_ok=True)
        out.with_suffix(".json").write_text(
            json.dumps({"base": str(base_gguf), "adapter": None if adapter_dir is None else str(adapter_dir),
                        "quant": quant}), "utf-8")
        log.info("exported %s%s as %s", base_gguf.name, f" + {adapter_dir}" if adapter_dir else "", out)
    return out


__all__ = ["LlamaCppChatBackend", "LlamaCppStudent", "export_student_gguf", "load_llama", "quantize_gguf",
           "write_gguf_like"]
