"""Distillation and the model registry, on the real SmolLM2-135M-Instruct (no mocks).

The training data are 12 real ML-100k windows (3 items each) with the SLIM prompt; the rationales are
written here from each window's genres, deterministically: a pattern a few LoRA steps can pick up, which
is all a test of the mechanics needs. One training run (8 steps) is shared by the module.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from models.prompts import PROMPT_VERSION, PromptItem, build_slim_messages
from models.student import TransformersStudent
from retrain.dataset import RationaleRecord, write_records
from streams.registry import ModelRegistry
from streams.settings import Settings

N_RECORDS = 12
WINDOW = 3
STEPS = 8


def genre_rationale(items: list[PromptItem]) -> str:
    counts = Counter(g for it in items for g in it.genres)
    top = [g for g, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:2]] or ["popular"]
    liked = " and ".join(top)
    return (f"Step 1: The user likes {liked} movies.\n"
            f"Step 2: Recommend {liked} movies.\n"
            f"Step 3: Recommend more {top[0]} movies not in the history.")


def ml100k_records() -> list[RationaleRecord]:
    from streams.datasets import load_interactions, load_items

    items = {it.item_id: it for it in load_items("ml-100k")}
    by_user = defaultdict(list)
    for x in load_interactions("ml-100k"):
        by_user[x.user_id].append(x)
    records = []
    for user in sorted(by_user)[:N_RECORDS]:
        events = sorted(by_user[user], key=lambda x: (x.timestamp, x.item_id))
        window, target = events[:WINDOW], events[WINDOW : WINDOW + 2]
        prompt_items = [PromptItem(items[e.item_id].title, items[e.item_id].year, items[e.item_id].genres,
                                   "rating", e.rating) for e in window]
        records.append(RationaleRecord(
            user_id=user, window=[e.item_id for e in window], target_items=[e.item_id for e in target],
            messages=build_slim_messages(prompt_items, 20), rationale=genre_rationale(prompt_items),
            teacher="test:genre-template", prompt_version=PROMPT_VERSION, dataset_version="ml-100k-test",
        ))
    return records


@pytest.fixture(scope="module")
def settings(data_dir: Path) -> Settings:
    return Settings.from_env(data={"data_dir": data_dir}, student={"threads": 1, "max_new_tokens": 24})


@pytest.fixture(scope="module")
def records_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("distill") / "rationales.jsonl"
    write_records(path, ml100k_records(), append=False)
    return path


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def base(settings: Settings):  # type: ignore[no-untyped-def]
    import torch

    from models.student import load_base_model

    torch.set_num_threads(settings.student.threads)  # two threads spin-wait against each other on a busy box
    tokenizer, model, _ = load_base_model(settings)
    model.eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def distilled(settings: Settings, records_path: Path, registry: ModelRegistry):  # type: ignore[no-untyped-def]
    from retrain.distill import DistillConfig, distill

    config = DistillConfig(max_steps=STEPS, batch_size=2, lr=2e-3, scheduler="constant", max_seq_len=256,
                           lora_r=8, lora_alpha=16, lora_dropout=0.0, val_fraction=0.17, seed=0)
    return distill(records_path, settings, registry=registry, config=config)


# ---- examples and the loss (tokenizer, base model) --------------------------------------------------------


@pytest.mark.slow
def test_labels_mask_the_prompt_and_padding(base, records_path: Path) -> None:  # type: ignore[no-untyped-def]
    from retrain.dataset import read_records
    from retrain.distill import IGNORE_INDEX, collate, encode_record, end_of_turn_id

    tokenizer, _ = base
    records = list(read_records(records_path))[:2]
    examples = [encode_record(tokenizer, r, 256) for r in records]
    assert all(e is not None and not e.truncated for e in examples)
    batch = collate(examples, pad_token_id=0)
    width = batch["input_ids"].shape[1]
    for row, (record, e) in enumerate(zip(records, examples)):
        prompt = tokenizer.apply_chat_template(record.messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert e.prompt_len == len(prompt_ids) and e.input_ids[: e.prompt_len] == prompt_ids
        labels = batch["labels"][row].tolist()
        n = len(e.input_ids)
        assert all(t == IGNORE_INDEX for t in labels[: e.prompt_len])  # every prompt token masked
        assert labels[e.prompt_len : n] == e.input_ids[e.prompt_len :]  # every rationale token labelled
        assert labels[n - 1] == end_of_turn_id(tokenizer)  # and the end of the turn
        assert tokenizer.decode(labels[e.prompt_len : n - 1]) == record.rationale
        assert all(t == IGNORE_INDEX for t in labels[n:]) and batch["attention_mask"][row, n:].sum() == 0
        assert batch["attention_mask"][row, :n].all() and n <= width
    # A prompt that does not fit is skipped; a long rationale is cut (and then has no end-of-turn token).
    assert encode_record(tokenizer, records[0], examples[0].prompt_len) is None
    cut = encode_record(tokenizer, records[0], examples[0].prompt_len + 10)
    assert cut is not None and cut.truncated and len(cut.input_ids) == examples[0].prompt_len + 10


@pytest.mark.slow
def test_rationale_nll_equals_the_causal_lm_loss(base, records_path: Path) -> None:  # type: ignore[no-untyped-def]
    import torch

    from retrain.dataset import read_records
    from retrain.distill import collate, encode_record, rationale_nll

    tokenizer, model = base
    examples = [encode_record(tokenizer, r, 256) for r in list(read_records(records_path))[:2]]
    batch = collate(examples, pad_token_id=0)
    with torch.inference_mode():
        nll, n = rationale_nll(model, batch)
        reference = model(**batch).loss  # transformers' own shifted, masked mean
    assert n == sum(len(e.input_ids) - e.prompt_len for e in examples)
    assert float(nll) / n == pytest.approx(float(reference), rel=1e-4)


# ---- a training run ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distillation_lowers_train_loss_and_val_nll(distilled, records_path: Path) -> None:  # type: ignore[no-untyped-def]
    losses = distilled.train_losses
    assert len(losses) == STEPS and distilled.steps == STEPS
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    assert distilled.val_examples == 2 and distilled.train_examples == N_RECORDS - 2
    assert distilled.val_nll_after < 0.7 * distilled.val_nll_before
    print(f"\ndistill: {STEPS} steps at {distilled.steps_per_s:.2f} steps/s; losses {[round(x, 3) for x in losses]}; "
          f"val NLL {distilled.val_nll_before:.3f} -> {distilled.val_nll_after:.3f}")


@pytest.mark.slow
def test_manifest_records_the_run(distilled, registry: ModelRegistry, records_path: Path,  # type: ignore[no-untyped-def]
                                  settings: Settings) -> None:
    import hashlib

    assert registry.list_versions() == [distilled.version] == ["v0001"]
    manifest = registry.get(distilled.version)
    assert manifest["version"] == "v0001" and manifest["parent_version"] is None
    assert manifest["base_model"]["model_version"] == settings.student.model_version
    assert manifest["base_model"]["gguf_file"] == settings.student.gguf_file
    assert len(manifest["base_model"]["gguf_sha256"]) == 64
    assert manifest["data"]["sha256"] == hashlib.sha256(records_path.read_bytes()).hexdigest()
    assert manifest["data"]["version"] == "ml-100k-test" and manifest["data"]["records"] == N_RECORDS
    hp = manifest["hyperparameters"]
    assert hp["max_steps"] == STEPS and hp["batch_size"] == 2 and hp["lora"]["r"] == 8
    assert hp["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    m = manifest["metrics"]
    assert m["train_loss_first"] == distilled.train_losses[0] and m["steps"] == STEPS
    assert m["val_nll_after"] < m["val_nll_before"] and m["examples"] == N_RECORDS - 2
    assert m["wall_seconds"] > 0 and manifest["created_at"]
    log_lines = (distilled.version_dir / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log_lines] == list(range(1, STEPS + 1))
    assert (distilled.adapter_dir / "adapter_config.json").is_file()
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".staging")]  # nothing half-written


@pytest.mark.slow
def test_adapter_serves_through_the_student(distilled, base, settings: Settings,  # type: ignore[no-untyped-def]
                                            records_path: Path, registry: ModelRegistry) -> None:
    from retrain.dataset import read_records
    from retrain.distill import encode_record, mean_nll, pad_id

    tokenizer, base_model = base
    registry.promote(distilled.version)
    student = TransformersStudent(settings, adapter_dir=registry.adapter_dir(registry.current()))
    assert student.model_version == f"{settings.student.model_version}+v0001" == distilled.model_version
    train_record = next(r for r in read_records(records_path)
                        if r.user_id not in {u for u in _val_users(distilled)})
    example = [encode_record(tokenizer, train_record, 256)]
    tuned_nll = mean_nll(student.model, example, 1, pad_id(tokenizer))
    base_nll = mean_nll(base_model, example, 1, pad_id(tokenizer))
    assert tuned_nll < 0.7 * base_nll
    out = student.generate([train_record.messages])[0]
    assert out.startswith("Step 1: The user likes "), out  # the trained pattern (the base model writes its own)
    print(f"\ntuned student on {train_record.user_id}: {out!r}")


def _val_users(distilled) -> set[str]:  # type: ignore[no-untyped-def]
    from retrain.dataset import read_records
    from retrain.distill import split_records

    records = list(read_records(Path(distilled.manifest["data"]["path"])))
    hp = distilled.manifest["hyperparameters"]
    _, val = split_records(records, hp["val_fraction"], hp["max_val_records"], hp["seed"])
    return {r.user_id for r in val}


@pytest.mark.slow
def test_resume_continues_the_adapter(distilled, settings: Settings, records_path: Path,  # type: ignore[no-untyped-def]
                                      registry: ModelRegistry) -> None:
    from retrain.distill import DistillConfig, distill

    config = DistillConfig(max_steps=2, batch_size=2, lr=2e-3, scheduler="constant", max_seq_len=256,
                           lora_r=4, val_fraction=0.17, seed=0)  # r=4 is overridden by the adapter's r=8
    resumed = distill(records_path, settings, registry=registry, config=config, resume_from=distilled.version,
                      version="v0001-resumed")
    assert resumed.parent_version == distilled.version
    manifest = registry.get("v0001-resumed")
    assert manifest["parent_version"] == "v0001" and manifest["hyperparameters"]["lora"]["r"] == 8
    # It starts where the parent ended, far below the base model's loss.
    assert resumed.train_losses[0] < 0.7 * distilled.train_losses[0]
    assert resumed.val_nll_before == pytest.approx(distilled.val_nll_after, rel=0.05)
    with pytest.raises(FileExistsError):
        distill(records_path, settings, registry=registry, config=config, version="v0001-resumed")


# ---- registry (pure filesystem) -----------------------------------------------------------------------------


def _fake_version(registry: ModelRegistry, name: str | None = None) -> str:
    staging = registry.staging_dir()
    (staging / "adapter").mkdir()
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    return registry.publish(staging, name, {"format": 1})


def test_registry_promote_and_rollback_round_trip(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.list_versions() == [] and reg.current() is None and reg.latest() is None
    a, b, c = _fake_version(reg), _fake_version(reg), _fake_version(reg, "hotfix")
    assert (a, b) == ("v0001", "v0002") and reg.list_versions() == ["v0001", "v0002", "hotfix"]
    assert reg.get(b)["version"] == "v0002"
    with pytest.raises(KeyError):
        reg.promote("v0009")
    with pytest.raises(LookupError):
        reg.rollback()
    reg.promote(a)
    reg.promote(b)
    reg.promote(b)  # already current: no history entry
    reg.promote(c, reason="manual")
    assert reg.current() == "hotfix" and reg.current_adapter_dir() == tmp_path / "reg" / "hotfix" / "adapter"
    assert reg.rollback() == "v0002" and reg.current() == "v0002"
    assert reg.rollback() == "v0001" and reg.current() == "v0001"
    reg.promote(c)
    assert reg.rollback() == "v0001"
    assert reg.rollback() is None and reg.current() is None  # back to the base model
    with pytest.raises(LookupError):
        reg.rollback()
    actions = [(e["action"], e["version"], e["previous"]) for e in reg.history()]
    assert actions == [("promote", "v0001", None), ("promote", "v0002", "v0001"), ("promote", "hotfix", "v0002"),
                       ("rollback", "v0002", "hotfix"), ("rollback", "v0001", "v0002"),
                       ("promote", "hotfix", "v0001"), ("rollback", "v0001", "hotfix"), ("rollback", None, "v0001")]
    settings = Settings.from_env(data={"data_dir": tmp_path})
    assert reg.model_version("v0002", settings) == f"{settings.student.model_version}+v0002"
    assert ModelRegistry.for_settings(settings).root == tmp_path / "registry"


def test_registry_refuses_bad_or_taken_names(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    _fake_version(reg, "v0005")
    assert _fake_version(reg) == "v0006"  # the next number after the highest
    with pytest.raises(FileExistsError):
        _fake_version(reg, "v0005")
    for bad in ("../x", "a/b", "", "adapter", ".hidden"):
        with pytest.raises(ValueError):
            _fake_version(reg, bad) if bad else reg.version_dir(bad)
    assert reg.list_versions() == ["v0005", "v0006"]


def test_adapter_name_uses_the_registry_version(tmp_path: Path) -> None:
    from models.student_base import adapter_name

    reg = ModelRegistry(tmp_path)
    version = _fake_version(reg)
    assert adapter_name(reg.adapter_dir(version)) == version
    assert adapter_name(tmp_path / "slim-lora-test") == "slim-lora-test"
    (tmp_path / "plain" / "adapter").mkdir(parents=True)
    assert adapter_name(tmp_path / "plain" / "adapter") == "adapter"  # no manifest: the directory name
