"""The `openai` student backend against a real vLLM server (vLLM's CPU build, scripts/install-vllm.sh).

The server serves `slimstream export-student`'s model directory with --enable-lora and runtime LoRA updating,
as docker-compose.yml's `vllm` service does on a GPU. The student's greedy rationales equal the in-process
transformers student's, for the base model and for a registry adapter that the student loads into the server
at run time; a server that forgot the adapter (restarted) gets it again; refusals are clear errors. A worker
on this backend hot-swaps to a promoted version, and back, with every event reflected.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.openai_student import LoraAdapterError, OpenAIStudent, local_vllm_server
from models.prompts import PromptItem, build_slim_messages
from models.student_base import StudentError
from models.student import TransformersStudent
from streams.registry import ModelRegistry
from streams.broker import EmbeddedBroker, free_port
from streams.settings import Settings
from tests.conftest import ROOT, ServerProcess, WorkerProcess, random_adapter_registry, worker_env

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BASE = Settings.from_env().student.model_version


@pytest.fixture(scope="module")
def exported(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slimstream export-student` (the compose `student-export` service's command), run twice."""
    out = tmp_path_factory.mktemp("models") / "student"
    env = {**os.environ, "SLIMSTREAM_DATA_DIR": str(data_dir)}
    for attempt in range(2):
        proc = subprocess.run([sys.executable, "-m", "cli", "export-student", str(out), "--if-missing"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert ("nothing to do" in " ".join(proc.stdout.split())) == (attempt == 1), proc.stdout
    return out


@pytest.fixture(scope="module")
def registry(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return random_adapter_registry(data_dir, tmp_path_factory.mktemp("vllm-registry"))


@pytest.fixture(scope="module")
def vllm(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A vLLM OpenAI-compatible server (float32, runtime LoRA loading); yields its base URL (…/v1)."""
    if not VLLM_PYTHON.is_file():
        pytest.fail("vLLM's CPU build is missing: run scripts/install-vllm.sh (scripts/test.sh does)")
    port = free_port()
    cmd, env = local_vllm_server(VLLM_PYTHON, exported, BASE, port, dtype="float32")
    server = ServerProcess(cmd, port, tmp_path_factory.mktemp("vllm") / "vllm.log", env=env)
    try:
        server.wait_ready(420)
        yield f"{server.url}/v1"
    finally:
        server.stop()


def _settings(data_dir: Path, registry: ModelRegistry, url: str, **student: object) -> Settings:
    return Settings.from_env(data={"data_dir": data_dir, "registry_dir": registry.root},
                             student={"backend": "openai", "url": url, "max_new_tokens": 40, "batch_size": 1,
                                      "deadline_s": 120, **student})


PROMPTS = [
    build_slim_messages([PromptItem("Toy Story", 1995, ("Animation", "Children's", "Comedy")),
                         PromptItem("Aladdin", 1992, ("Animation", "Children's", "Comedy", "Musical")),
                         PromptItem("Lion King, The", 1994, ("Animation", "Children's", "Musical"))], 20),
    build_slim_messages([PromptItem("Heat", 1995, ("Action", "Crime", "Thriller")),
                         PromptItem("Godfather, The", 1972, ("Action", "Crime", "Drama")),
                         PromptItem("Fargo", 1996, ("Crime", "Drama", "Thriller"))], 20),
]


@pytest.fixture(scope="module")
def reference(data_dir: Path, registry: ModelRegistry) -> dict[str, list[str]]:
    """The in-process transformers student's greedy rationales: base, and with the adapter merged."""
    s = Settings.from_env(data={"data_dir": data_dir}, student={"max_new_tokens": 40, "batch_size": 1})
    out = {"base": TransformersStudent(s).generate(PROMPTS)}
    out["v0001"] = TransformersStudent(s, adapter_dir=registry.adapter_dir("v0001")).generate(PROMPTS)
    return out


def test_export_names_the_end_of_turn_token_as_eos(exported: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(str(exported))
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") in GenerationConfig.from_pretrained(str(exported)).eos_token_id


def test_base_student_on_vllm_writes_what_the_in_process_student_writes(
        vllm: str, data_dir: Path, registry: ModelRegistry, reference: dict[str, list[str]]) -> None:
    student = OpenAIStudent(_settings(data_dir, registry, vllm))
    assert student.model_version == BASE and student.lora_name is None
    texts = student.generate(PROMPTS)
    assert texts == reference["base"]
    assert all(t.strip() for t in texts)


def test_a_registry_adapter_is_loaded_into_vllm_and_served(
        vllm: str, data_dir: Path, registry: ModelRegistry, reference: dict[str, list[str]]) -> None:
    settings = _settings(data_dir, registry, vllm)
    student = OpenAIStudent(settings, adapter_dir=registry.adapter_dir("v0001"))
    assert student.model_version == f"{BASE}+v0001"
    assert student.lora_name is not None and student.lora_name.startswith("v0001-")
    assert student.lora_name in student.served_models()
    texts = student.generate(PROMPTS)
    assert texts == reference["v0001"]
    assert texts != reference["base"], "the random adapter changes the rationales"
    # A second worker asking for the same adapter: vLLM says "already loaded", which is fine.
    again = OpenAIStudent(settings, adapter_dir=registry.adapter_dir("v0001"))
    assert again.generate(PROMPTS[:1]) == reference["v0001"][:1]


def test_a_server_that_forgot_the_adapter_is_given_it_again(
        vllm: str, data_dir: Path, registry: ModelRegistry, reference: dict[str, list[str]]) -> None:
    student = OpenAIStudent(_settings(data_dir, registry, vllm), adapter_dir=registry.adapter_dir("v0001"))
    r = httpx.post(f"{vllm}/unload_lora_adapter", json={"lora_name": student.lora_name}, timeout=30)
    assert r.status_code == 200, r.text  # what a restarted server looks like to the worker
    assert student.lora_name not in student.served_models()
    assert student.generate(PROMPTS[:1]) == reference["v0001"][:1]
    assert student.lora_name in student.served_models()


def test_refusals_are_clear_errors(vllm: str, data_dir: Path, registry: ModelRegistry) -> None:
    # The server cannot see the adapter at the path it is told (a wrong SLIMSTREAM_STUDENT_LORA_ROOT). The
    # adapter must be one the server has not loaded yet: for a known name+digest the weights are already there.
    other = registry.root.parent / "other-registry"
    shutil.copytree(registry.root / "v0001", other / "v0002")
    config = json.loads((other / "v0002/adapter/adapter_config.json").read_text())
    (other / "v0002/adapter/adapter_config.json").write_text(json.dumps({**config, "revision": "other"}))
    wrong_root = _settings(data_dir, ModelRegistry(other), vllm, lora_root="/nonexistent/registry")
    with pytest.raises(LoraAdapterError, match=r"HTTP 404.*No adapter found"):
        OpenAIStudent(wrong_root, adapter_dir=other / "v0002/adapter")
    # No server at all.
    down = _settings(data_dir, registry, f"http://127.0.0.1:{free_port()}/v1", connect_timeout_s=2)
    with pytest.raises(StudentError, match="cannot list models"):
        OpenAIStudent(down)
    # A base model name the server does not serve.
    with pytest.raises(StudentError, match="does not serve 'no-such-model'"):
        OpenAIStudent(_settings(data_dir, registry, vllm, served_model="no-such-model"))


def test_server_paths_are_re_rooted_under_the_servers_mount(data_dir: Path, registry: ModelRegistry) -> None:
    s = _settings(data_dir, registry, "http://127.0.0.1:1/v1", lora_root="/srv/slimstream/registry/")
    student = OpenAIStudent.__new__(OpenAIStudent)
    student.settings = s
    assert student.server_path(registry.adapter_dir("v0001")) == "/srv/slimstream/registry/v0001/adapter"
    assert student.server_path(Path("/elsewhere/adapter")) == "/elsewhere/adapter"
    student.settings = s.updated(student={"lora_root": None})
    assert student.server_path(registry.adapter_dir("v0001")) == str(registry.adapter_dir("v0001").resolve())


@pytest.mark.slow
def test_a_worker_on_vllm_hot_swaps_to_the_promoted_adapter_and_back(
        vllm: str, data_dir: Path, registry: ModelRegistry, indexed_qdrant: Path, tmp_path: Path) -> None:
    from tests.test_hot_swap import Feed, all_explained, ml_histories, recs_by_user, send_and_check, switch_with_cli

    histories = ml_histories()
    new = f"{BASE}+v0001"
    users = list(histories)[:3]
    with EmbeddedBroker() as broker:
        env = worker_env(broker, data_dir, indexed_qdrant, SLIMSTREAM_REGISTRY_DIR=str(registry.root),
                         SLIMSTREAM_STUDENT_BACKEND="openai", SLIMSTREAM_STUDENT_URL=vllm,
                         SLIMSTREAM_STUDENT_MAX_NEW_TOKENS="24", SLIMSTREAM_STUDENT_CONCURRENCY="1")
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            assert worker.get("/healthz/")["model_version"] == BASE
            feed = Feed(broker.bootstrap_servers, histories)
            feed.send(users, 2)
            recs_by_user(broker.bootstrap_servers, all_explained(feed, users, BASE))

            switch_with_cli(worker, env, new, "promote", "v0001")
            send_and_check(feed, users, 2, new)
            metrics = worker.metrics()
            assert metrics["model_swaps"] == 1 and metrics["model_swap_failures"] == 0
            assert metrics.get("student_errors", 0) == 0
            served = httpx.get(f"{vllm}/models", timeout=10).json()["data"]
            assert any(m["id"].startswith("v0001-") for m in served), "the swap loaded the adapter into vLLM"

            switch_with_cli(worker, env, BASE, "rollback")
            send_and_check(feed, users, 1, BASE)
        finally:
            assert worker.stop() == 0, worker.log_tail()
