"""The student as a source of rationale vectors for training prefixes: what the harness's SLIM methods and
``train-ranker --rationale-users`` share, so both name a generator the same way and read one cache
(``<data_dir>/eval-rationales/<generator id>.jsonl``).

The prompt is the stream's own (:func:`models.prompts.build_slim_messages` over the newest
``student.prompt_max_items`` items), the decoding the stream's, so a rationale a model is trained on is the
kind a worker will feed it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.prompts import PromptItem, prompt_items
from streams.datasets import Item
from streams.settings import Settings

if TYPE_CHECKING:
    from models.encoder import TextEncoder
    from models.fusion import Generate, RationaleVectors


def item_prompts(item_ids: Sequence[str], catalogue: Mapping[str, Item]) -> list[PromptItem]:
    """The prompt entry of every item index (index 0, padding, is never shown)."""
    return [PromptItem(title="", year=None, genres=())] + prompt_items(range(1, len(item_ids)), item_ids, catalogue)


def student_generator(settings: Settings, adapter_dir: Path | None = None) -> tuple[Generate, str, str]:
    """(generate, generator id, label) of the base student, or of the distilled one at ``adapter_dir``."""
    from models.student_factory import load_student

    kwargs: dict[str, Any] = {}
    if adapter_dir is not None:
        kwargs["adapter_dir"] = adapter_dir
    elif settings.student.backend == "llamacpp":
        kwargs["requantize"] = True  # the same export and quantization as a distilled student
    student = load_student(settings, **kwargs)
    gen_id = f"student-{settings.student.backend}-{student.model_version}-{settings.student.max_new_tokens}t"
    if adapter_dir is not None:  # the adapter's content, not only its name, identifies the generator
        from models.student_base import adapter_digest

        gen_id += "-" + adapter_digest(adapter_dir)[:10]
    label = f"{'distilled' if adapter_dir is not None else 'base'} student ({student.model_version})"
    return student.generate, gen_id, label


def rationale_vectors(settings: Settings, generate: Generate, generator_id: str, name: str,
                      item_prompt: Sequence[PromptItem], encoder: TextEncoder,
                      progress: Callable[[str], None] | None = None) -> RationaleVectors:
    """A :class:`~models.fusion.RationaleVectors` over ``generate``'s rationales with the stream's prompt window,
    cached under ``<data_dir>/eval-rationales/<generator_id>.jsonl``."""
    from models.fusion import RationaleVectors

    return RationaleVectors(generate, encoder, item_prompt, max_items=settings.student.prompt_max_items, name=name,
                            generator_id=generator_id, cache_dir=settings.data.data_dir / "eval-rationales",
                            progress=progress)


def student_rationale_vectors(settings: Settings, item_ids: Sequence[str], catalogue: Mapping[str, Item],
                              encoder: TextEncoder, *, adapter_dir: Path | None = None,
                              progress: Callable[[str], None] | None = None) -> RationaleVectors:
    """:func:`rationale_vectors` of the base student (or the distilled one at ``adapter_dir``)."""
    generate, gen_id, label = student_generator(settings, adapter_dir)
    return rationale_vectors(settings, generate, gen_id, f"SLIM ID-agnostic, {label}", item_prompts(item_ids, catalogue),
                             encoder, progress)


__all__ = ["item_prompts", "rationale_vectors", "student_generator", "student_rationale_vectors"]
