"""Pick the student backend named by ``SLIMSTREAM_STUDENT_BACKEND`` (after peft's one-layout-per-method tuners:
each backend its own module, this one the only place that knows all of them)."""

from __future__ import annotations

from models.student_base import StudentBackend
from streams.settings import Settings


def load_student(settings: Settings, **kwargs: object) -> StudentBackend:
    """The student backend named by ``settings.student.backend``."""
    if settings.student.backend == "transformers":
        from models.student import TransformersStudent

        return TransformersStudent(settings, **kwargs)  # type: ignore[arg-type]
    if settings.student.backend == "llamacpp":
        from models.llamacpp import LlamaCppStudent  # optional extra: slimstream[llamacpp]

        return LlamaCppStudent(settings, **kwargs)  # type: ignore[arg-type]
    if settings.student.backend == "openai":
        from models.openai_student import OpenAIStudent  # vLLM / any OpenAI-compatible server

        return OpenAIStudent(settings, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown student backend: {settings.student.backend!r}")


__all__ = ["load_student"]
