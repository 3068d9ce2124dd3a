"""Generation backends for the OpenAI-compatible server.

:class:`ChatBackend` is what :class:`~models.serving.serving.OpenAIServingChat` needs: a *blocking*
``complete`` that it runs in a worker thread. :class:`TransformersChatBackend` implements it over a model
loaded by :class:`models.student.TransformersStudent` (GGUF → float32 de-quantized once, cached as
safetensors), adding what the student's greedy rationale ``generate`` does not do: sampling (temperature,
top-p, ``n`` samples, a seed), stop strings, raw text and token counts, and cancellation.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from models.student import TransformersStudent


@dataclass(frozen=True)
class Generation:
    """One completion. ``finish_reason``: ``"stop"`` (end of turn or a stop string) or ``"length"`` (token
    limit, time limit or cancellation). ``completion_tokens`` counts the end-of-turn token, like vLLM."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class ChatBackend(Protocol):
    """Blocking chat completion; thread-safe; never called on the event loop."""

    model_id: str
    max_model_len: int | None

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        n: int,
        seed: int | None,
        stop: Sequence[str],
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Generation]: ...


# End-of-turn markers of the chat templates we serve; generation stops on whichever the vocabulary has.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|eot_id|>", "<end_of_turn>")


class TransformersChatBackend:
    """Chat completions from a GGUF chat model through transformers, on CPU (or wherever the model is).

    One generation at a time (a lock): sampling with a seed forks the global torch RNG, which concurrent
    generations would disturb, and on CPU torch's intra-op threads are the parallelism anyway.
    """

    def __init__(self, student: TransformersStudent, model_id: str) -> None:
        self.student = student
        self.model = student.model
        self.tokenizer = student.tokenizer
        self.model_id = model_id
        self.max_model_len: int | None = getattr(self.model.config, "max_position_embeddings", None)
        self.deadline_s = student.settings.student.deadline_s
        vocab = self.tokenizer.get_vocab()
        stops = [vocab[t] for t in STOP_TOKENS if t in vocab]
        if not stops and self.tokenizer.eos_token_id is not None:
            stops = [self.tokenizer.eos_token_id]
        if not stops:
            raise ValueError(f"{model_id}: the tokenizer has no end-of-turn token")
        self._stop_ids = stops
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        self._lock = threading.Lock()

    @classmethod
    def from_gguf(
        cls,
        gguf: str | os.PathLike[str],
        *,
        data_dir: str | os.PathLike[str],
        model_id: str | None = None,
        threads: int = 1,
        deadline_s: float = 600.0,
    ) -> TransformersChatBackend:
        """Load ``gguf`` the student's way: the de-quantized safetensors cache lives under
        ``<data_dir>/student/<gguf stem>-<key>`` and is shared with the student for the same file."""
        from models.student import TransformersStudent
        from streams.settings import Settings

        path = Path(gguf)
        settings = Settings.from_env(data={"data_dir": Path(data_dir)}, student={"model_dir": str(path.parent), "gguf_file": path.name, "threads": threads, "deadline_s": deadline_s, "model_version": model_id or path.stem})
        return cls(TransformersStudent(settings), model_id or path.stem)

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
        """``temperature == 0``: greedy (``n`` identical results); else nucleus sampling (no top-k).
        ``seed`` makes sampling reproducible without touching the global torch RNG's state. ``stop``
        strings end a completion and are not part of its text. ``cancelled`` is polled after every token."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("TransformersChatBackend.complete blocks: run it in an executor")
        if n < 1 or max_tokens < 1:
            raise ValueError("n and max_tokens must be >= 1")
        with self._lock:
            return self._complete_locked(messages, max_tokens, temperature, top_p, n, seed,
                                         [s for s in stop if s], cancelled)

    def _complete_locked(
        self,
        messages: list[dict[str, str]],
        max_tokens: int,
        temperature: float,
        top_p: float,
        n: int,
        seed: int | None,
        stop: list[str],
        cancelled: Callable[[], bool] | None,
    ) -> list[Generation]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        prompt_tokens = int(enc["input_ids"].shape[1])
        sample = temperature > 0
        kwargs: dict[str, object] = {
            "max_new_tokens": max_tokens,
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
            "max_time": self.deadline_s,
        }
        if sample:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, num_return_sequences=n)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        if cancelled is not None:

            class _Cancelled(StoppingCriteria):
                def __call__(self, input_ids, scores, **_):  # type: ignore[no-untyped-def]
                    return torch.full((input_ids.shape[0],), bool(cancelled()), dtype=torch.bool,
                                      device=input_ids.device)

            kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancelled()])

        devices = [self.model.device.index or 0] if self.model.device.type == "cuda" else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            generated = self.model.generate(**enc, **kwargs)
        rows = generated[:, prompt_tokens:].tolist()
        if not sample:
            rows = rows[:1] * n
        out = []
        for row in rows:
            end = next((i for i, t in enumerate(row) if t in self._stop_ids), None)
            tokens = row if end is None else row[:end]
            finish: Literal["stop", "length"] = "length" if end is None else "stop"
            decoded = self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            cuts = [i for i in (decoded.find(s) for s in stop) if i >= 0]
            if cuts:
                decoded, finish = decoded[: min(cuts)], "stop"
            out.append(Generation(decoded.strip(), prompt_tokens, len(tokens) + (end is not None), finish))
        return out


__all__ = ["STOP_TOKENS", "ChatBackend", "Generation", "TransformersChatBackend"]
