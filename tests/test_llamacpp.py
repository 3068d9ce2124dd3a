"""The llama.cpp backends on the real SmolLM2 GGUF: chat completions (greedy, seeded samples, stops,
cancellation), the student, serve-teacher --backend llamacpp over real HTTP, and the GGUF export of a merged
LoRA student (llama.cpp's logits must match transformers' for the same weights)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the slimstream[llamacpp] extra is not installed")

from models.llamacpp import LlamaCppChatBackend, LlamaCppStudent, export_student_gguf, write_gguf_like  # noqa: E402
from models.student_base import student_gguf_path  # noqa: E402
from models.student import load_base_model
from streams.settings import Settings  # noqa: E402
from tests.conftest import ServerProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASK = [{"role": "system", "content": "You are a film critic. Answer briefly."},
       {"role": "user", "content": "Which animated film from 1995 should a child watch?"}]


@pytest.fixture(scope="module")
def chat() -> LlamaCppChatBackend:
    return LlamaCppChatBackend(student_gguf_path(Settings.from_env()), threads=1, n_ctx=1024)


def test_greedy_is_deterministic_and_counts_tokens(chat: LlamaCppChatBackend) -> None:
    a = chat.complete(ASK, max_tokens=24)
    b = chat.complete(ASK, max_tokens=24, n=2)
    assert a[0].text and a[0].text == b[0].text == b[1].text
    assert a[0].prompt_tokens > 20 and 0 < a[0].completion_tokens <= 24
    assert "<|im_end|>" not in a[0].text and "<|im_start|>" not in a[0].text


def test_seeded_samples_are_reproducible_and_differ(chat: LlamaCppChatBackend) -> None:
    first = chat.complete(ASK, max_tokens=24, temperature=1.0, n=3, seed=11)
    again = chat.complete(ASK, max_tokens=24, temperature=1.0, n=3, seed=11)
    assert [g.text for g in first] == [g.text for g in again]
    assert len({g.text for g in first}) > 1


def test_stop_string_and_cancellation(chat: LlamaCppChatBackend) -> None:
    full = chat.complete(ASK, max_tokens=32)[0].text
    word = full.split()[2]
    stopped = chat.complete(ASK, max_tokens=32, stop=[word])[0]
    assert word not in stopped.text and full.startswith(stopped.text.rstrip())
    t0 = time.monotonic()
    cancelled = chat.complete(ASK, max_tokens=400, cancelled=lambda: True)[0]
    assert cancelled.finish_reason == "length" and cancelled.completion_tokens <= 2
    assert time.monotonic() - t0 < 10


def test_student_backend_writes_rationales() -> None:
    from models.prompts import PromptItem, build_slim_messages
    from models.student_factory import load_student

    settings = Settings.from_env(student={"backend": "llamacpp", "max_new_tokens": 40, "threads": 1})
    student = load_student(settings)
    assert isinstance(student, LlamaCppStudent) and student.model_version == settings.student.model_version
    window = [PromptItem(title="Toy Story", year=1995, genres=("Animation", "Comedy")),
              PromptItem(title="Aladdin", year=1992, genres=("Animation", "Musical"))]
    out = student.generate([build_slim_messages(window, 20)] * 2)
    assert len(out) == 2 and out[0] == out[1] and out[0].strip()


@pytest.mark.slow
def test_serve_teacher_llamacpp_over_http(tmp_path: Path) -> None:
    from models.openai_client import ChatClient
    from streams.settings import TeacherSettings
    from streams.broker import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    srv = ServerProcess(
        [sys.executable, "-m", "cli", "serve-teacher", "--backend", "llamacpp", "--port", str(port),
         "--gguf", str(student_gguf_path(Settings.from_env())), "--served-model-name", "smol-llamacpp", "--threads", "1"],
        port, tmp_path / "server.log", env=env)
    try:
        srv.wait_ready(120)
        cfg = TeacherSettings(url=srv.url + "/v1", model="smol-llamacpp", max_tokens=16)

        async def ask() -> list[str]:
            async with ChatClient(cfg) as client:
                return await client.complete(ASK, n=2, temperature=0.9, seed=5)

        texts = asyncio.run(ask())
        assert len(texts) == 2 and all(t.strip() for t in texts)
        assert srv.get("/v1/models")["data"][0]["id"] == "smol-llamacpp"
    finally:
        srv.stop()


def _logits_llamacpp(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1])


@pytest.mark.slow
def test_merged_lora_export_matches_transformers(tmp_path: Path) -> None:
    """A LoRA adapter with random (non-zero) weights, merged and exported: llama.cpp's next-token logits
    on the float32 export equal transformers' on the merged model; the Q8_0 export is close."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    settings = Settings.from_env(data={"data_dir": tmp_path / "data"}, student={"threads": 1})
    tok, base, _ = load_base_model(settings)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    adapter = tmp_path / "lora-x"
    get_peft_model(base, cfg).save_pretrained(str(adapter))
    _, fresh, _ = load_base_model(settings)
    merged = PeftModel.from_pretrained(fresh, str(adapter)).merge_and_unload().eval()
    ids = tok("<|im_start|>user\nName a film.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0, -1].numpy()
        _, plain, _ = load_base_model(settings)
        base_logits = plain(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(ref - base_logits).max() > 0.5  # the adapter really changes the model

    f32 = write_gguf_like(student_gguf_path(settings), merged.state_dict(), tmp_path / "m.gguf",
                          n_head=merged.config.num_attention_heads, n_kv_head=merged.config.num_key_value_heads)
    got = _logits_llamacpp(f32, ids)
    assert np.abs(got - ref).max() < 0.05 and np.corrcoef(got, ref)[0, 1] > 0.99999

    q8 = export_student_gguf(settings, adapter)
    assert q8.name.startswith("lora-x-") and q8.name.endswith("-q8_0.gguf")
    assert export_student_gguf(settings, adapter) == q8  # cached
    assert np.corrcoef(_logits_llamacpp(q8, ids), ref)[0, 1] > 0.99
    student = LlamaCppStudent(settings, adapter_dir=adapter)
    assert student.model_version == f"{settings.student.model_version}+lora-x" and student.gguf == q8


def test_loading_a_model_does_not_silence_the_process() -> None:
    """llama-cpp-python's quiet mode points descriptors 1 and 2 at /dev/null while a model loads; in a worker
    that swallowed every other thread's output meanwhile (Faust's log of a SIGTERM during the student's load).
    A thread writes to stderr throughout two loads: every line must arrive."""
    import subprocess

    code = (
        "import os, sys, threading, time\n"
        "from models.llamacpp import load_llama\n"
        "from models.student_base import student_gguf_path\n"
        "from streams.settings import Settings\n"
        "stop = threading.Event(); sent = []\n"
        "def tick():\n"
        "    while not stop.is_set():\n"
        "        os.write(2, b'tick %d\\n' % len(sent)); sent.append(1); time.sleep(0.002)\n"
        "t = threading.Thread(target=tick); t.start()\n"
        "for _ in range(2):\n"
        "    load_llama(student_gguf_path(Settings.from_env()), threads=1, n_ctx=256)\n"
        "stop.set(); t.join()\n"
        "os.write(2, b'sent %d\\n' % len(sent))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300, check=True)
    lines = out.stderr.decode().splitlines()
    sent = int(next(line for line in lines if line.startswith("sent ")).split()[1])
    ticks = [line for line in lines if line.startswith("tick ")]
    assert sent > 20, "the loads were too quick to tell"
    assert len(ticks) == sent, f"{sent - len(ticks)} of {sent} lines written during the loads were lost"
