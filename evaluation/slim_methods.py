"""The SLIM methods of ``slimstream evaluate``, by name (see :mod:`models.fusion` for what they compute).

=========================  ==========================================================================
``slim-base``              ID-agnostic: base student's rationale vs item-text vectors
``slim-distilled``         ID-agnostic: the distilled student (``--adapter`` or the registry's CURRENT)
``slim-teacher``           ID-agnostic: the teacher's own rationales (greedy), from ``teacher.url``
``sasrec+slim-<g>``        ID-based: SASRec fused with generator ``<g>``'s rationale vector (learned alpha)
``sasrec+text-mean``       control: SASRec fused with the mean item-text vector of the same window (no LLM)
``slim-id-<g>``            ID-based, trained (models/slim_rec.py): SASRec + generator ``<g>``'s rationale,
                           fused and trained end to end; ``sasrec`` is the same model without rationales
``slim-text-<g>``          ID-agnostic, trained: items as projected text vectors + the rationale
``slim-text-none``         ID-agnostic, trained, no rationale (the ablation)
``slim-idtext-<g>``        ID-based with item text beside the IDs (items = ID + projected text) + the rationale
``slim-idtext-none``       the same without rationales (its ablation)
=========================  ==========================================================================

The trained ones are scored on every user; the sample's users have a rationale (one generation each, from a
prefix of their training sequence), everyone else is served through the learned no-rationale vector.

The LLM ones run on the evaluation's user sample (one generation per user and phase). The student runs on
``student.backend`` (llamacpp is ~6x faster on CPU; both decode greedily), so the base and the distilled
student are compared on the same backend and decoding.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from models.prompts import PromptItem
from models.rankers import HistoryMeanVectors, Ranker, TextRanker

if TYPE_CHECKING:
    from models.fusion import Generate, RationaleVectors
    from evaluation.harness import EvalContext

GENERATORS = ("base", "distilled", "teacher")
SLIM_METHODS = (*(f"slim-{g}" for g in GENERATORS), *(f"sasrec+slim-{g}" for g in GENERATORS), "sasrec+text-mean")
# Trained SLIM recommenders (models/slim_rec.py), scored on every user: the users of the run's sample have a
# rationale (one generation each), the others are served through the learned no-rationale vector.
TRAINED_METHODS = (*(f"slim-id-{g}" for g in GENERATORS), *(f"slim-text-{g}" for g in GENERATORS), "slim-text-none",
                   *(f"slim-idtext-{g}" for g in GENERATORS), "slim-idtext-none")
_ITEMS = {"id": "id", "text": "text", "idtext": "id+text"}
_LABELS = {"id": "ID-based", "text": "ID-agnostic", "idtext": "ID + text"}


def _item_prompts(ctx: EvalContext) -> list[PromptItem]:
    """The prompt entry of every item index (index 0, padding, is never shown)."""
    from models.rationale_source import item_prompts

    return item_prompts(ctx.data.item_ids, ctx.items())


def _student_generator(ctx: EvalContext, distilled: bool) -> tuple[Generate, str, str]:
    from models.rationale_source import student_generator

    adapter = None
    if distilled:
        adapter = ctx.adapter_dir
        if adapter is None:
            from streams.registry import ModelRegistry

            adapter = ModelRegistry.for_settings(ctx.settings).current_adapter_dir()
            if adapter is None:
                raise ValueError("slim-distilled needs --adapter or a promoted model in the registry")
    generate, gen_id, label = student_generator(ctx.settings, adapter)
    return generate, gen_id, f"SLIM ID-agnostic, {label}"


def _teacher_generator(ctx: EvalContext) -> tuple[Generate, str, str]:
    from models.student_base import postprocess_rationale
    from models.teacher import open_teacher

    cfg = ctx.settings.teacher

    def generate(batch: list[list[dict[str, str]]]) -> list[str]:
        async def run() -> list[str]:
            async with open_teacher(ctx.settings) as client:
                answers = await asyncio.gather(*(client.complete(m, n=1, temperature=0.0) for m in batch))
            return [postprocess_rationale(a[0] if a else "") for a in answers]

        return asyncio.run(run())

    gen_id = f"teacher-{cfg.model}-{cfg.max_tokens}t"
    return generate, gen_id, f"SLIM ID-agnostic, teacher ({cfg.model})"


def rationale_vectors(ctx: EvalContext, generator: str) -> RationaleVectors:
    """One shared :class:`RationaleVectors` per generator and run (the ID-agnostic and the fused method
    reuse its rationales)."""
    from models.rationale_source import rationale_vectors as cached_rationale_vectors

    def build() -> RationaleVectors:
        if generator == "teacher":
            gen, gen_id, label = _teacher_generator(ctx)
        else:
            gen, gen_id, label = _student_generator(ctx, distilled=generator == "distilled")
        if ctx.encoder is None:
            ctx.item_vectors()  # loads the encoder
        assert ctx.encoder is not None
        return cached_rationale_vectors(ctx.settings, gen, gen_id, label, _item_prompts(ctx), ctx.encoder,
                                        progress=lambda msg: ctx.progress(msg, -1, -1))

    return ctx.shared(f"rationales:{generator}", build)


def build_trained_method(key: str, ctx: EvalContext) -> Ranker:
    """``slim-id-<g>`` / ``slim-text-<g>`` / ``slim-idtext-<g>``: the ID-based / ID-agnostic / ID + text SLIM
    model trained with generator g's rationales for the sample users; ``-none``: the same without rationales."""
    from dataclasses import asdict

    from models.sasrec import SASRecConfig
    from models.slim_rec import SLIMRecConfig, SLIMRecRanker, rationale_inputs

    kind, generator = key.removeprefix("slim-").split("-", 1)
    base = ctx.sasrec_config or SASRecConfig()
    cfg = SLIMRecConfig(**{**asdict(base), "epochs": ctx.sasrec_epochs, "seed": ctx.seed, "items": _ITEMS[kind]})
    rationales = None
    if generator != "none":
        users = ctx.sample if ctx.sample is not None else np.arange(ctx.data.n_users)
        vecs = rationale_vectors(ctx, generator)
        rationales = rationale_inputs(ctx.data, vecs, users, cfg.rationale_tail, source=vecs.generator_id)
    label = _LABELS[kind]
    name = f"SLIM {label}, trained, {generator} rationale" if rationales else f"SLIM {label}, trained, no rationale"
    return SLIMRecRanker(cfg, item_text=ctx.item_vectors(), rationales=rationales, name=name,
                         progress=lambda msg, done, total: ctx.progress(f"{name}: {msg}", -1, -1))


def build_slim_method(key: str, ctx: EvalContext) -> Ranker:
    from models.fusion import FusionRanker

    if key.startswith("slim-"):
        vecs = rationale_vectors(ctx, key.removeprefix("slim-"))
        return TextRanker(ctx.item_vectors(), vecs, name=vecs.name)
    if key == "sasrec+text-mean":
        item_vecs = ctx.item_vectors()
        uv = HistoryMeanVectors(item_vecs, max_items=ctx.settings.student.prompt_max_items)
        return FusionRanker(ctx.fitted_sasrec(), uv, item_vecs, name="SASRec + item-text mean (control)",
                            fit_users=ctx.sample, base_fitted=True)
    if key.startswith("sasrec+slim-"):
        generator = key.removeprefix("sasrec+slim-")
        vecs = rationale_vectors(ctx, generator)
        return FusionRanker(ctx.fitted_sasrec(), vecs, ctx.item_vectors(),
                            name=f"SLIM ID-based: SASRec + {generator} rationale", fit_users=ctx.sample,
                            base_fitted=True)
    raise ValueError(f"unknown SLIM method {key!r}")


__all__ = ["GENERATORS", "SLIM_METHODS", "TRAINED_METHODS", "build_slim_method", "build_trained_method",
           "rationale_vectors"]
