"""Fixtures that start the real components: the Tansu broker, Qdrant local mode, worker processes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.registry import MANIFEST_FORMAT, ModelRegistry
from streams.broker import EmbeddedBroker, free_port
from streams.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared across the session: the ONNX export and the student cache are built once."""
    return tmp_path_factory.mktemp("slimstream-data")


@pytest.fixture(scope="module")
def indexed_qdrant(qdrant_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qdrant local-mode directory with the full ML-1M catalogue, private to the test module.

    Modules must not share one: rationale points are versioned per user (an older window version never
    overwrites a newer one), so a module replaying the same ML-1M users on a fresh broker would find the
    previous module's higher versions stored and its own rationales refused as stale.
    """
    path = tmp_path_factory.mktemp("qdrant") / "qdrant"
    shutil.copytree(qdrant_template, path)
    return path


@pytest.fixture(scope="session")
def qdrant_template(data_dir: Path) -> Path:
    """The ML-1M catalogue indexed into Qdrant local mode once per session (copied per module)."""
    from models.encoder import load_encoder
    from streams.datasets import load_items
    from vectorstore.catalogue import index_catalogue
    from vectorstore.store import VectorStore

    path = data_dir / "qdrant"
    settings = Settings.from_env(data={"data_dir": data_dir}, qdrant={"path": str(path)})
    encoder = load_encoder(settings)
    store = VectorStore(settings)
    try:
        store.ensure_collections(encoder.dim)
        index_catalogue(store, encoder, load_items("ml-1m"))
    finally:
        store.close()
    return path


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a subprocess's log file, for assertion messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


class WorkerProcess:
    """``slimstream worker`` in a subprocess, configured by env vars like in production."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.port = int(env["SLIMSTREAM_WEB_PORT"])
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 240.0) -> "WorkerProcess":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_until(lambda h: h["models_ready"] and h["recovery_completed"] and h["assigned_partitions"] > 0,
                        timeout)
        return self

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
            return json.loads(resp.read())

    def get_or_none(self, path: str) -> dict | None:
        try:
            return self.get(path)
        except Exception:
            return None

    def wait_until(self, predicate, timeout: float) -> dict:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log_tail()}")
            health = self.get_or_none("/healthz/")
            if health is not None and predicate(health):
                return health
            time.sleep(0.5)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.log_tail()}\n{self.stacks()}")

    def stacks(self) -> str:
        """Every thread's stack (SIGQUIT: faulthandler, answered even with the event loop blocked) and the asyncio
        tasks (SIGUSR1: Faust's dump, from the loop), as the worker wrote them to its log: why it is stuck."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        size = self.log_path.stat().st_size if self.log_path.exists() else 0
        for sig in (signal.SIGQUIT, signal.SIGUSR1):
            os.kill(self.proc.pid, sig)
        time.sleep(3)
        try:
            with open(self.log_path, "rb") as f:
                f.seek(size)
                dump = f.read().decode(errors="replace")
        except OSError:
            return "<no log>"
        # faulthandler's thread stacks, then only the task lists of Faust's dump (its thread stacks repeat them,
        # and its pprinted locals are noise).
        keep, in_tasks = [], False
        for ln in dump.splitlines():
            if ln.startswith("THREAD "):
                in_tasks = False
            elif ln.startswith("TASKS"):
                in_tasks = True
            if ln.startswith(("Thread 0x", "Current thread", '  File "')) or (  # a task's frames: '  File "' too
                    in_tasks and ln.startswith(("TASKS", "  TASK", "Stack for"))):
                keep.append(ln)
        return "stacks at the timeout:\n" + "\n".join(keep[:500])

    def metrics(self) -> dict:
        return self.get("/metrics/")

    def log_tail(self, n: int = 60) -> str:
        return log_tail(self.log_path, n)

    def stop(self, timeout: float = 60.0) -> int:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"worker did not stop within {timeout}s:\n{self.log_tail()}")


def private_data_dir(shared: Path, own: Path) -> Path:
    """A data dir of a worker's own (Faust's files: its RocksDB table store) that links ``shared``'s caches
    (the encoder export, the student, the registry), so one worker's state never leaks into another's."""
    own.mkdir(parents=True, exist_ok=True)
    for entry in shared.iterdir():
        if entry.name not in ("faust", "logs") and not (own / entry.name).exists():
            (own / entry.name).symlink_to(entry.resolve())
    return own


def worker_env(broker: EmbeddedBroker, data_dir: Path, qdrant_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_") and k not in (
        "KAFKA_BOOTSTRAP_SERVERS", "QDRANT_URL", "QDRANT_PATH")}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "QDRANT_PATH": str(qdrant_path),
        "SLIMSTREAM_DATA_DIR": str(data_dir),
        "SLIMSTREAM_WEB_PORT": str(free_port()),
        "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": "64",
        "SLIMSTREAM_STUDENT_BATCH_WAIT_S": "0.3",
        "SLIMSTREAM_EVENT_TIME_MODE": "replay",  # the tests replay MovieLens (2000-2003) and synthetic times
        "PYTHONUNBUFFERED": "1",
    })
    env.update(overrides)
    return env


def random_adapter_registry(data_dir: Path, root: Path) -> ModelRegistry:
    """A registry at ``root`` holding one real (random, not trained: it visibly changes the output) LoRA
    adapter of the student, ``v0001``: r=4 on q_proj and v_proj."""
    import torch
    from peft import LoraConfig, get_peft_model

    from models.student import load_base_model

    _, base, _ = load_base_model(Settings.from_env(data={"data_dir": data_dir}))
    torch.manual_seed(0)
    reg = ModelRegistry(root)
    staging = reg.staging_dir()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(staging / "adapter"))
    version = reg.publish(staging, manifest={"format": MANIFEST_FORMAT, "note": "random LoRA for tests"})
    assert version == "v0001"
    del base
    gc.collect()
    return reg


# -- HTTP servers in subprocesses (the teacher server, serve-teacher, vLLM) -----------------------------------

TEACHER_MODEL = "smollm2-test-teacher"


class ServerProcess:
    """An HTTP server started as a subprocess in its own process group: readiness (``health`` answers 200),
    JSON GETs, the log's tail, and a clean stop (SIGTERM to the group, SIGKILL after ``stop_timeout``)."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, *, env: dict[str, str] | None = None,
                 health: str = "/health") -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.health = health
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @classmethod
    def teacher(cls, data_dir: Path, log_path: Path, *extra: str) -> "ServerProcess":
        """``models.serving.api_server`` on the packaged SmolLM2 GGUF, served as :data:`TEACHER_MODEL`: one
        generation at a time and no queue, so a second concurrent request is a 503."""
        from models.student_base import default_model_dir

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
        env.update({"PYTHONUNBUFFERED": "1", "SLIMSTREAM_STUDENT_THREADS": "1"})
        cmd = [sys.executable, "-m", "models.serving.api_server", "--port", str(port),
               "--gguf-dir", str(default_model_dir()), "--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf",
               "--served-model-name", TEACHER_MODEL, "--data-dir", str(data_dir), "--max-concurrency", "1",
               "--max-queue", "0", "--retry-after", "1", "--max-tokens-limit", "512", *extra]
        return cls(cmd, port, log_path, env=env)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=5) as resp:
            return json.loads(resp.read())

    def wait_ready(self, timeout: float = 240.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"server not up after {timeout} s:\n{self.log_tail()}")

    def metrics(self) -> dict:
        return self.get("/metrics")

    def wait_idle(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m["running"] == 0 and m["waiting"] == 0:
                return m
            time.sleep(0.1)
        raise AssertionError(f"server still busy after {timeout} s: {self.metrics()}")

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def running_teacher(data_dir: Path, log_path: Path) -> Iterator[ServerProcess]:
    """The body of a module's teacher-server fixture: started, ready, stopped afterwards."""
    srv = ServerProcess.teacher(data_dir, log_path)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()
