"""Step-by-step distillation: LoRA fine-tuning of the student on the teacher's rationales (SLIM, Sec. 3.2).

Each :class:`~retrain.dataset.RationaleRecord` becomes one (prompt -> rationale) example. The input is the
student's chat template over the record's messages with the generation prompt (exactly what the stream
sends at inference), followed by the rationale and ``<|im_end|>``; the loss is the token-level negative
log-likelihood of the rationale (and the end-of-turn token) only: every prompt and padding position is
labelled ``-100``.

The base model is the de-quantized float32 SmolLM2 loaded through the same GGUF / cache path as
:class:`~models.student.TransformersStudent`; peft wraps it with LoRA; a plain PyTorch loop trains it on CPU
(AdamW, gradient accumulation, clipping, linear or constant schedule). A seeded validation split (held out
by user) gives the validation NLL before and after. The adapter is published to the
:class:`~streams.registry.ModelRegistry` as a new version with a ``manifest.json``; ``resume_from``
continues training an existing adapter (its version becomes the new one's parent).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.serving.backend import STOP_TOKENS
from retrain.dataset import RationaleRecord, read_records
from streams.packaged import sha256_file
from streams.registry import ADAPTER, MANIFEST, MANIFEST_FORMAT, ModelRegistry, utc_now, validate_version
from streams.settings import Settings

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
END_OF_TURN = STOP_TOKENS[0]  # "<|im_end|>": the token a ChatML turn ends with, what the student learns to write
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
_MIN_RATIONALE_TOKENS = 8  # a record whose prompt leaves less room than this is skipped


class DistillConfig(BaseModel):
    """Hyper-parameters of one distillation run (recorded in the manifest)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(ATTENTION_MODULES, min_length=1,
                                            description="Llama projections; add MLP_MODULES for the MLP too.")
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    scheduler: Literal["linear", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0, description="Used when max_steps is not set.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(1024, ge=32, description="Prompt + rationale tokens; longer rationales are cut.")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    max_val_records: int = Field(64, ge=0)
    seed: int = 0


class DistillResult(BaseModel):
    version: str
    version_dir: Path
    adapter_dir: Path
    model_version: str = Field(description="What the stream reports when serving this version.")
    parent_version: str | None
    steps: int
    train_examples: int
    val_examples: int
    train_losses: list[float]
    val_nll_before: float | None
    val_nll_after: float | None
    wall_s: float
    steps_per_s: float
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------------------
# examples


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on the prompt; the token id on the rationale and the end-of-turn token
    prompt_len: int
    truncated: bool  # the rationale was cut to fit max_seq_len (no end-of-turn token then)


def end_of_turn_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab:
        return vocab[END_OF_TURN]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an EOS token")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return vocab["<|endoftext|>"]
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def encode_record(tokenizer: Any, record: RationaleRecord, max_seq_len: int) -> EncodedExample | None:
    """Prompt ids (chat template + generation prompt, as at inference) then rationale ids + ``<|im_end|>``.

    The prompt and the rationale are tokenized separately, so the prompt's ids are exactly those the
    student sees when generating. Returns ``None`` when the prompt leaves no room for the rationale.
    """
    prompt_text = tokenizer.apply_chat_template(list(record.messages), add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer = tokenizer(record.rationale.strip(), add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
    room = max_seq_len - len(prompt)
    if room < min(_MIN_RATIONALE_TOKENS, len(answer)):
        return None
    truncated = len(answer) > room
    answer = answer[:room]
    return EncodedExample(
        input_ids=prompt + answer,
        labels=[IGNORE_INDEX] * len(prompt) + answer,
        prompt_len=len(prompt),
        truncated=truncated,
    )


def collate(examples: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (padding labelled ``IGNORE_INDEX``)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --------------------------------------------------------------------------------------------------------
# loss


def rationale_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum of token NLLs, number of labelled tokens)`` of the batch's labelled (rationale) tokens.

    Runs the decoder once and the LM head only on the positions that predict a labelled token (the
    vocabulary projection of every prompt position is most of the memory and a good part of the compute
    otherwise). Equal to the causal-LM loss transformers computes from ``labels`` (times the token count).
    """
    import torch.nn.functional as F

    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    n_tokens = int(keep.sum())
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else None
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None or getattr(causal_lm.config, "final_logit_softcapping", None):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    else:
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), n_tokens


def mean_nll(model: Any, examples: Sequence[EncodedExample], batch_size: int, pad_token_id: int) -> float | None:
    """Mean per-token NLL of the rationales of ``examples`` (eval mode, no gradients)."""
    import torch

    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for i in range(0, len(examples), batch_size):
                nll, n = rationale_nll(model, collate(examples[i : i + batch_size], pad_token_id))
                total += float(nll)
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# --------------------------------------------------------------------------------------------------------
# data


@lru_cache(maxsize=8)
def _gguf_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def base_model_info(settings: Settings) -> dict[str, Any]:
    from models.student_base import student_gguf_path

    gguf = student_gguf_path(settings)
    st = gguf.stat()
    return {"model_version": settings.student.model_version, "gguf_file": gguf.name, "gguf_size": st.st_size,
            "gguf_sha256": _gguf_sha256(str(gguf.resolve()), st.st_size, st.st_mtime_ns)}


def split_records(records: Sequence[RationaleRecord], val_fraction: float, max_val: int,
                  seed: int) -> tuple[list[RationaleRecord], list[RationaleRecord]]:
    """Seeded (train, val) split that holds out whole users (no window of a validation user is trained on);
    falls back to a record-level split when there are too few users."""
    if val_fraction <= 0 or max_val <= 0 or len(records) < 2:
        return list(records), []
    target = min(max_val, max(1, round(val_fraction * len(records))))
    rng = random.Random(seed)
    per_user = Counter(r.user_id for r in records)
    users = sorted(per_user)
    rng.shuffle(users)
    val_users: set[str] = set()
    n_val = 0
    for user in users:
        if n_val >= target:
            break
        val_users.add(user)
        n_val += per_user[user]
    if len(val_users) < len(users) and n_val <= 2 * target:
        return ([r for r in records if r.user_id not in val_users], [r for r in records if r.user_id in val_users])
    order = list(range(len(records)))
    rng.shuffle(order)
    val_idx = set(order[:target])
    return ([r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx])


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """An endless stream of index batches: a fresh seeded shuffle every epoch."""
    rng = random.Random(seed)
    carry: list[int] = []
    while True:
        order = list(range(n))
        rng.shuffle(order)
        carry.extend(order)
        while len(carry) >= batch_size:
            yield carry[:batch_size]
            carry = carry[batch_size:]
        if n < batch_size:  # tiny data set: one batch per epoch, as large as there is
            yield carry
            carry = []


def _lr_factor(step: int, total: int, config: DistillConfig) -> float:
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    if config.scheduler == "constant":
        return 1.0
    span = max(1, total - config.warmup_steps)
    return max(0.0, 1.0 - (step - config.warmup_steps) / span)


# --------------------------------------------------------------------------------------------------------
# resume


def _resolve_resume(resume_from: str | os.PathLike[str], registry: ModelRegistry) -> tuple[Path, str, dict | None]:
    """(adapter directory, parent version or path, parent manifest) for a version id or an adapter path."""
    as_str = str(resume_from)
    if registry.exists(as_str):
        return registry.adapter_dir(as_str), as_str, registry.get(as_str)
    path = Path(resume_from)
    if (path / ADAPTER / "adapter_config.json").is_file():  # a version directory
        path = path / ADAPTER
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"resume_from: {resume_from} is neither a version in {registry.root} "
                                "nor an adapter directory")
    manifest_path = path.parent / MANIFEST
    if path.name == ADAPTER and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return path, str(manifest.get("version") or path.parent.name), manifest
    return path, str(path.resolve()), None


# --------------------------------------------------------------------------------------------------------
# the run


def distill(
    records_path: str | os.PathLike[str],
    settings: Settings,
    *,
    registry: ModelRegistry | str | os.PathLike[str] | None = None,
    config: DistillConfig | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    version: str | None = None,
    data_version: str | None = None,
    promote: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> DistillResult:
    """LoRA-distil the teacher rationales in ``records_path`` into the student; publish a registry version.

    ``registry``: a :class:`ModelRegistry` or its root (default ``<data_dir>/registry``). ``resume_from``: a
    registry version or an adapter directory to continue training (its LoRA shape wins over ``config``'s;
    the optimizer starts fresh). ``version``: the new version's name (default: the next ``v<NNNN>``).
    ``data_version``: a label for the data (default: the records' ``dataset_version`` values).
    ``promote``: make the new version current. ``on_step(step, total_steps, loss)`` after every step.
    Uses ``settings.student.threads`` torch threads and seeds torch's global RNG with ``config.seed``.
    """
    import torch

    started = time.perf_counter()
    config = config or DistillConfig()
    if not isinstance(registry, ModelRegistry):
        registry = ModelRegistry(registry) if registry is not None else ModelRegistry.for_settings(settings)
    if version is not None and registry.exists(validate_version(version)):
        raise FileExistsError(f"model version {version!r} already exists in {registry.root}")
    records_path = Path(records_path)
    records = list(read_records(records_path))
    if not records:
        raise ValueError(f"{records_path}: no rationale records")
    base_info = base_model_info(settings)
    resume = _resolve_parent(resume_from, registry, base_info)

    torch.set_num_threads(settings.student.threads)
    torch.manual_seed(config.seed)
    tokenizer, model, loaded_from, lora = _lora_model(settings, config, resume)
    examples = _examples(tokenizer, records, config, records_path)
    run = _train(model, examples, config, pad_id(tokenizer), on_step)
    manifest = _manifest(settings, config, records, records_path, data_version, base_info, loaded_from, resume,
                         lora, model, examples, run)
    published = _save(registry, model, manifest, run.step_log, version, started)
    if promote:
        registry.promote(published, reason="distill --promote")
    log.info("distilled %s: loss %.4f -> %.4f, val NLL %s -> %s, %d steps in %.1f s", published, run.losses[0],
             run.losses[-1], run.val_before, run.val_after, run.steps, run.seconds)
    return DistillResult(
        version=published,
        version_dir=registry.version_dir(published),
        adapter_dir=registry.adapter_dir(published),
        model_version=registry.model_version(published, settings),
        parent_version=resume[1] if resume else None,
        steps=run.steps,
        train_examples=len(examples.train),
        val_examples=len(examples.val),
        train_losses=run.losses,
        val_nll_before=run.val_before,
        val_nll_after=run.val_after,
        wall_s=manifest["metrics"]["wall_seconds"],
        steps_per_s=manifest["metrics"]["steps_per_s"] or 0.0,
        manifest=manifest,
    )


# -- the stages of a run ------------------------------------------------------------------------------------


def _resolve_parent(resume_from: str | os.PathLike[str] | None, registry: ModelRegistry,
                    base_info: dict[str, Any]) -> tuple[Path, str] | None:
    """``(adapter dir, parent name)`` to continue from, checked to be trained on the same base model."""
    if resume_from is None:
        return None
    adapter, parent, parent_manifest = _resolve_resume(resume_from, registry)
    parent_base = (parent_manifest or {}).get("base_model", {})
    if parent_base.get("gguf_sha256") not in (None, base_info["gguf_sha256"]):
        raise ValueError(f"resume_from {parent}: trained on another base model ({parent_base.get('gguf_file')})")
    return adapter, parent


def _lora_model(settings: Settings, config: DistillConfig,
                resume: tuple[Path, str] | None) -> tuple[Any, Any, str, dict[str, Any]]:
    """The base student with a trainable LoRA adapter (the parent's, or a fresh one of ``config``'s shape)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from models.student import load_base_model

    tokenizer, model, loaded_from = load_base_model(settings)
    # A GGUF-loaded model carries the quantizer and its config; peft cannot save an adapter over it.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.config.use_cache = False
    asked = {"r": config.lora_r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
             "target_modules": sorted(config.target_modules)}
    if resume is not None:
        model = PeftModel.from_pretrained(model, str(resume[0]), is_trainable=True)
        loaded = model.peft_config["default"]
        lora = {"r": loaded.r, "lora_alpha": loaded.lora_alpha, "lora_dropout": loaded.lora_dropout,
                "target_modules": sorted(loaded.target_modules)}
        if lora != asked:
            log.warning("resume_from %s: keeping the adapter's LoRA shape %s (asked for %s)", resume[1], lora, asked)
    else:
        lora_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                 target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora_config)
        lora = asked
    model.peft_config["default"].base_model_name_or_path = settings.student.model_version
    return tokenizer, model, loaded_from, lora


@dataclass
class _Examples:
    train_records: list[RationaleRecord]
    val_records: list[RationaleRecord]
    train: list[EncodedExample]
    val: list[EncodedExample]
    skipped: int  # records whose prompt alone exceeds max_seq_len


def _examples(tokenizer: Any, records: Sequence[RationaleRecord], config: DistillConfig, source: Path) -> _Examples:
    train_records, val_records = split_records(records, config.val_fraction, config.max_val_records, config.seed)
    skipped = 0

    def encode(rs: Sequence[RationaleRecord]) -> list[EncodedExample]:
        nonlocal skipped
        out = []
        for r in rs:
            e = encode_record(tokenizer, r, config.max_seq_len)
            if e is None:
                skipped += 1
            else:
                out.append(e)
        return out

    train, val = encode(train_records), encode(val_records)
    if skipped:
        log.warning("%d records skipped: the prompt alone is longer than max_seq_len=%d", skipped, config.max_seq_len)
    if not train:
        raise ValueError(f"no trainable example in {source} (max_seq_len={config.max_seq_len})")
    return _Examples(train_records, val_records, train, val, skipped)


@dataclass
class _Run:
    steps: int
    losses: list[float]
    step_log: list[dict[str, Any]]
    tokens: int
    seconds: float
    val_before: float | None
    val_after: float | None


def _train(model: Any, examples: _Examples, config: DistillConfig, pad: int,
           on_step: Callable[[int, int, float], None] | None) -> _Run:
    """AdamW with warm-up and decay over ``config.max_steps`` (or ``epochs``) steps of rationale-token NLL."""
    import torch

    train = examples.train
    per_step = config.batch_size * config.grad_accum
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * len(train) / per_step))
    val_before = mean_nll(model, examples.val, config.batch_size, pad)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total_steps, config))
    batches = _batches(len(train), config.batch_size, config.seed)
    model.train()
    losses: list[float] = []
    step_log: list[dict[str, Any]] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(total_steps):
        t0 = time.perf_counter()
        collated = [collate([train[i] for i in next(batches)], pad) for _ in range(config.grad_accum)]
        step_tokens = sum(int((c["labels"][:, 1:] != IGNORE_INDEX).sum()) for c in collated)
        step_nll = 0.0
        for c in collated:
            nll, _ = rationale_nll(model, c)
            (nll / step_tokens).backward()
            step_nll += float(nll.detach())
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = step_nll / step_tokens
        losses.append(loss)
        tokens += step_tokens
        entry = {"step": step + 1, "loss": round(loss, 5), "lr": lr, "tokens": step_tokens,
                 "grad_norm": None if grad_norm is None else round(grad_norm, 4),
                 "seconds": round(time.perf_counter() - t0, 3)}
        step_log.append(entry)
        log.info("distill step %d/%d loss %.4f lr %.2e tokens %d (%.1f s)", step + 1, total_steps, loss, lr,
                 step_tokens, entry["seconds"])
        if on_step is not None:
            on_step(step + 1, total_steps, loss)
    seconds = time.perf_counter() - started
    val_after = mean_nll(model, examples.val, config.batch_size, pad)
    return _Run(total_steps, losses, step_log, tokens, seconds, val_before, val_after)


def _manifest(settings: Settings, config: DistillConfig, records: Sequence[RationaleRecord], records_path: Path,
              data_version: str | None, base_info: dict[str, Any], loaded_from: str,
              resume: tuple[Path, str] | None, lora: dict[str, Any], model: Any, examples: _Examples,
              run: _Run) -> dict[str, Any]:
    tail = run.losses[-min(3, len(run.losses)):]
    s = run.seconds
    return {
        "format": MANIFEST_FORMAT,
        "version": None,  # set by the registry when published
        "created_at": utc_now(),
        "base_model": {**base_info, "loaded_from": loaded_from},
        "parent_version": resume[1] if resume else None,
        "data": {
            "version": data_version or "+".join(sorted({r.dataset_version for r in records})),
            "path": str(records_path.resolve()),
            "sha256": sha256_file(records_path),
            "records": len(records),
            "train_records": len(examples.train_records),
            "val_records": len(examples.val_records),
            "skipped_too_long": examples.skipped,
            "truncated_rationales": sum(e.truncated for e in examples.train + examples.val),
            "prompt_versions": sorted({r.prompt_version for r in records}),
            "teachers": sorted({r.teacher for r in records}),
        },
        "hyperparameters": {**config.model_dump(mode="json"), "lora": lora,
                            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                            "torch_threads": settings.student.threads},
        "metrics": {
            "train_loss_first": run.losses[0],
            "train_loss_last": run.losses[-1],
            "train_loss_last_mean": sum(tail) / len(tail),
            "val_nll_before": run.val_before,
            "val_nll_after": run.val_after,
            "steps": run.steps,
            "examples": len(examples.train),
            "val_examples": len(examples.val),
            "train_tokens": run.tokens,
            "train_seconds": round(s, 3),
            "steps_per_s": run.steps / s if s > 0 else None,
            "tokens_per_s": run.tokens / s if s > 0 else None,
            "wall_seconds": None,  # set by _save
        },
    }


def _save(registry: ModelRegistry, model: Any, manifest: dict[str, Any], step_log: list[dict[str, Any]],
          version: str | None, started: float) -> str:
    """Write the adapter and the step log to a staging directory and publish it as a registry version."""
    base = model.get_base_model()
    base.hf_quantizer = None  # again: nothing above may have put it back, but peft refuses to save with it
    if getattr(base.config, "quantization_config", None) is not None:
        del base.config.quantization_config
    staging = registry.staging_dir()
    try:
        model.save_pretrained(str(staging / ADAPTER), save_embedding_layers=False)
        with (staging / "train_log.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in step_log)
        manifest["metrics"]["wall_seconds"] = round(time.perf_counter() - started, 3)
        return registry.publish(staging, version, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "ATTENTION_MODULES",
    "DistillConfig",
    "DistillResult",
    "EncodedExample",
    "IGNORE_INDEX",
    "MLP_MODULES",
    "collate",
    "distill",
    "encode_record",
    "mean_nll",
    "rationale_nll",
    "split_records",
]
