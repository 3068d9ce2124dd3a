"""The student LLM: the real SmolLM2-135M-Instruct GGUF, loaded once per module (no mocks)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from models.prompts import PromptItem, build_slim_messages
from models.student_base import StudentBackend, postprocess_rationale
from models.student_factory import load_student
from models.student import TransformersStudent
from streams.settings import Settings

ANIMATION = [
    PromptItem("Toy Story", 1995, ["Animation", "Children's", "Comedy"], "rating", 5.0),
    PromptItem("Aladdin", 1992, ["Animation", "Children's", "Musical"], "rating", 4.0),
    PromptItem("Lion King, The", 1994, ["Animation", "Children's", "Musical"], "rating", 5.0),
]
CRIME = [
    PromptItem("Heat", 1995, ["Action", "Crime", "Thriller"], "rating", 4.0),
    PromptItem("Godfather, The", 1972, ["Action", "Crime", "Drama"], "rating", 5.0),
    PromptItem("Pulp Fiction", 1994, ["Crime", "Drama"], "rating", 5.0),
]
BATCH = [build_slim_messages(ANIMATION, 20), build_slim_messages(CRIME, 20)]


# ---- postprocess_rationale (pure) -------------------------------------------------------------------------


def test_postprocess_drops_the_incomplete_last_sentence() -> None:
    text = "Step 1: Likes animation. Step 2: Musicals.\nStep 3: Recommend Mulan and Hercules, which are"
    assert postprocess_rationale(text, truncated=True) == "Step 1: Likes animation. Step 2: Musicals."
    assert postprocess_rationale(text) == text  # ended on its own: the last line is complete


def test_postprocess_drops_the_cut_line_of_a_list() -> None:
    text = "1. Heat (1995) — Crime\n2. Casino (1995) — Drama\n3. Ronin (19"
    assert postprocess_rationale(text, truncated=True) == "1. Heat (1995) — Crime\n2. Casino (1995) — Drama"
    assert postprocess_rationale("1. Heat\n2.", truncated=True) == "1. Heat"  # a list number is no full stop


def test_postprocess_keeps_steps_only() -> None:
    text = (
        "Sure! Here it is.\nStep 1: Crime films.\nStep 2: Thrillers.\nStep 3: Casino.\n"
        "Step 4: Something else.\nStep 1: Crime films again."
    )
    assert postprocess_rationale(text) == "Step 1: Crime films.\nStep 2: Thrillers.\nStep 3: Casino."
    assert postprocess_rationale("**Step 1:** a.\n**Step 2:** b.\nStep 2: b.") == "**Step 1:** a.\n**Step 2:** b."


def test_postprocess_never_empties_content() -> None:
    assert postprocess_rationale("  ") == ""
    for truncated in (False, True):
        assert postprocess_rationale("no full stop at all", truncated=truncated) == "no full stop at all"
        assert postprocess_rationale("Step 4: only a later step", truncated=truncated) == "Step 4: only a later step"
        assert postprocess_rationale("Rated 4.5 by", truncated=truncated) == "Rated 4.5 by"


# ---- the real model ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # One intra-op thread: on a 2-core box shared with other processes, two OpenMP threads spin-wait on
    # each other and a 48-token batch takes 10-100 s instead of ~6 s.
    return Settings.from_env(data={"data_dir": tmp_path_factory.mktemp("student-data")}, student={"max_new_tokens": 48, "threads": 1})


@pytest.fixture(scope="module")
def from_gguf(settings: Settings) -> TransformersStudent:
    """First construction on an empty data_dir: de-quantizes the GGUF and writes the cache."""
    return TransformersStudent(settings)


@pytest.fixture(scope="module")
def from_cache(settings: Settings, from_gguf: TransformersStudent) -> StudentBackend:
    return load_student(settings)


@pytest.fixture(scope="module")
def batch_output(from_cache: TransformersStudent) -> list[str]:
    return from_cache.generate(BATCH)


@pytest.mark.slow
def test_second_load_uses_the_cache(settings: Settings, from_gguf: TransformersStudent, from_cache: TransformersStudent) -> None:
    assert from_gguf.loaded_from == "gguf"
    assert from_cache.loaded_from == "cache"
    assert isinstance(from_cache, StudentBackend)
    caches = [p for p in (Path(settings.data.data_dir) / "student").iterdir() if p.is_dir()]
    assert len(caches) == 1 and (caches[0] / "model.safetensors").is_file()
    assert not any(p.name.startswith(".") for p in caches[0].parent.iterdir())  # no temp dir left behind
    assert from_cache.load_seconds < from_gguf.load_seconds
    assert from_cache.model_version == settings.student.model_version


@pytest.mark.slow
def test_batch_gives_one_rationale_per_window(batch_output: list[str]) -> None:
    assert len(batch_output) == 2
    assert all(r.strip() for r in batch_output)
    assert batch_output[0] != batch_output[1]
    assert [postprocess_rationale(r) for r in batch_output] == batch_output  # already post-processed


@pytest.mark.slow
def test_greedy_generation_is_deterministic(
    from_gguf: TransformersStudent, from_cache: TransformersStudent, batch_output: list[str]
) -> None:
    # A second call with the same input, on the GGUF-loaded instance: same text (cache weights are bit-exact).
    assert from_gguf.generate(BATCH) == batch_output


@pytest.mark.slow
def test_concurrent_calls_from_two_threads(from_cache: TransformersStudent) -> None:
    windows = {"animation": [BATCH[0]], "crime": [BATCH[1]]}
    results: dict[str, list[str]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(windows))

    def call(name: str) -> None:
        try:
            barrier.wait()
            results[name] = from_cache.generate(windows[name])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(name,)) for name in windows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert set(results) == set(windows)
    assert all(len(r) == 1 and r[0].strip() for r in results.values())
    assert results["animation"] != results["crime"]  # no cross-talk between the threads' calls


@pytest.mark.slow
def test_generate_refuses_the_event_loop(from_cache: TransformersStudent) -> None:
    async def on_loop() -> None:
        from_cache.generate(BATCH)

    with pytest.raises(RuntimeError, match="executor"):
        asyncio.run(on_loop())

    async def in_executor() -> list[str]:  # how the agent calls it: fine
        return await asyncio.get_running_loop().run_in_executor(None, from_cache.generate, [])

    assert asyncio.run(in_executor()) == []


@pytest.mark.slow
def test_lora_adapter_is_merged_and_versioned(
    settings: Settings, from_cache: TransformersStudent, tmp_path: Path
) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cache = next(p for p in (Path(settings.data.data_dir) / "student").iterdir() if p.is_dir())
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapter_dir = tmp_path / "slim-lora-test"
    get_peft_model(base, config).save_pretrained(str(adapter_dir))

    tuned = TransformersStudent(settings, adapter_dir=adapter_dir)
    assert tuned.loaded_from == "cache"
    assert tuned.model_version == f"{settings.student.model_version}+slim-lora-test"
    assert not any("lora" in name for name, _ in tuned.model.named_parameters())  # merged, plain model
    q_tuned = tuned.model.model.layers[0].self_attn.q_proj.weight
    q_base = from_cache.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q_tuned, q_base)
