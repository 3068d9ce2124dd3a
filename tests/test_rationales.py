"""Outcome-filtered teacher rationales: windows without leakage, the outcome score, the job (stand-in teacher
and encoder) and the CLI against the real local teacher server on SmolLM2 (slow)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.openai_client import ChatClient
from streams.settings import TeacherSettings
from retrain.dataset import read_records
from retrain.rationales import (
    _existing_users,
    build_windows,
    generate_rationales,
    make_window,
    outcome_score,
    select_users,
)
from streams.splits import leave_one_out
from streams.broker import free_port
from streams.datasets import Interaction, load_interactions
from tests.conftest import ROOT
from tests.conftest import TEACHER_MODEL as MODEL
from tests.conftest import ServerProcess as Server
from tests.conftest import running_teacher


# ---- windows --------------------------------------------------------------------------------------------


def test_window_is_the_items_before_the_last_training_targets() -> None:
    assert make_window([1, 2, 3, 4, 5, 6], window_size=3, n_targets=2) == ([2, 3, 4], [5, 6])
    assert make_window([1, 2, 3], window_size=10, n_targets=2) == ([1], [2, 3])
    assert make_window([1, 2], window_size=10, n_targets=2) is None  # no item left for the window
    with pytest.raises(ValueError):
        make_window([1, 2, 3], window_size=0, n_targets=1)


def test_windows_never_contain_validation_or_test_items() -> None:
    split = leave_one_out(load_interactions("ml-100k"))
    data = split.training_data()
    users = select_users(data, None, 3, seed=0)
    windows = build_windows(data, users, window_size=20, n_targets=3)
    assert len(windows) == len(users) > 900
    for w in windows:
        held_out = {int(split.valid[w.user]), int(split.test[w.user])}
        train = [int(i) for i in split.train[w.user]]
        assert not held_out & set(w.window) and not held_out & set(w.targets)
        assert len(w.targets) == 3 and 1 <= len(w.window) <= 20
        positions = {item: pos for pos, item in enumerate(train)}
        assert max(positions[i] for i in w.window) < min(positions[i] for i in w.targets)  # strictly after
        assert list(w.targets) == train[-3:] and list(w.window) == train[-3 - len(w.window):-3]


def test_a_larger_user_draw_extends_a_smaller_one() -> None:
    inter = [Interaction(f"u{u}", f"i{(u * 7 + k) % 40}", None, float(k)) for u in range(30) for k in range(4 + u % 5)]
    data = leave_one_out(inter).training_data()
    small, large = select_users(data, 5, 2, seed=3), select_users(data, 9, 2, seed=3)
    assert large[:5] == small and len(set(large)) == 9
    assert all(len(data.train[u]) >= 3 for u in large)
    assert select_users(data, 5, 2, seed=4) != small


# ---- the outcome score ----------------------------------------------------------------------------------


def test_rationale_equal_to_a_target_vector_scores_higher_than_a_random_one() -> None:
    rng = np.random.default_rng(0)
    items = rng.normal(size=(201, 16)).astype(np.float32)
    items[0] = 0  # padding
    window, targets = [3, 4, 5], [10, 11]
    hit = outcome_score(items[10], items, targets, window)
    randoms = [outcome_score(rng.normal(size=16), items, targets, window) for _ in range(50)]
    assert hit >= 0.5 and hit > np.percentile(randoms, 95) and hit > 10 * np.mean(randoms)
    assert outcome_score(items[10], items, [10], window) == 1.0
    # Window items are not ranked: a rationale equal to a window item still puts the target first.
    items[4] = items[10] * 2
    assert outcome_score(items[10], items, [10], window) == 1.0
    assert 0 < min(randoms) and max(randoms) <= 1


def test_torn_last_line_is_cut_and_other_bad_lines_raise(tmp_path: Path) -> None:
    rec = {"user_id": "7", "window": ["a"], "messages": [], "rationale": "r", "teacher": "t",
           "prompt_version": "p", "dataset_version": "v"}
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "user_id": "8"})[:30])
    assert _existing_users(path) == {"7"}
    assert path.read_text() == json.dumps(rec) + "\n"
    path.write_text("{broken\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="v.jsonl:1"):
        _existing_users(path)


# ---- the job with a stand-in teacher and encoder ----------------------------------------------------------


class HashEncoder:
    version = "hash-1"
    dim = 8

    def encode(self, texts):  # type: ignore[no-untyped-def]
        out = np.array([np.frombuffer(hashlib.sha256(t.encode()).digest()[:32], dtype=np.int32)[:8]
                        for t in texts], dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def fake_teacher(requests: list[dict]) -> ChatClient:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        choices = [{"index": k, "message": {"role": "assistant", "content": f"sample {k} seed {body['seed']}"},
                    "finish_reason": "stop"} for k in range(body["n"])]
        return httpx.Response(200, json={"model": body["model"], "choices": choices,
                                         "usage": {"prompt_tokens": 10, "completion_tokens": 5}})

    return ChatClient(TeacherSettings(url="http://fake/v1", model="fake"),
                         transport=httpx.MockTransport(handler))


async def test_job_writes_best_samples_and_resumes(tmp_path: Path) -> None:
    requests: list[dict] = []
    seen: list[tuple[int, int]] = []
    async with fake_teacher(requests) as teacher:
        first = await generate_rationales("ml-100k", teacher=teacher, encoder=HashEncoder(), out_dir=tmp_path,
                                          dataset_version="t1", n_users=3, samples=3, window_size=5, n_targets=2,
                                          progress=lambda d, t: seen.append((d, t)))
    assert (first.written, first.skipped, first.records) == (3, 0, 3) and seen[-1] == (3, 3)
    assert len(requests) == 3 and all(r["n"] == 3 and r["temperature"] > 0 for r in requests)
    records = list(read_records(first.path))
    split = leave_one_out(load_interactions("ml-100k"))
    for r in records:
        u = split.user_ids.index(r.user_id)
        held_out = {split.item_ids[split.valid[u]], split.item_ids[split.test[u]]}
        assert not held_out & set(r.window + r.target_items) and len(r.window) == 5 and len(r.target_items) == 2
        assert r.rationale.startswith("sample ") and 0 < r.score <= 1 and r.teacher == "fake@http://fake/v1"
        assert r.dataset_version == "t1" and r.messages[1]["content"].count("\n1. ") == 1
    meta = json.loads(first.meta_path.read_text())
    assert meta["counts"]["records"] == 3 and meta["parameters"]["samples"] == 3 and meta["encoder"] == "hash-1"

    async with fake_teacher(requests) as teacher:
        more = await generate_rationales("ml-100k", teacher=teacher, encoder=HashEncoder(), out_dir=tmp_path,
                                         dataset_version="t1", n_users=5, samples=3, window_size=5, n_targets=2)
        assert (more.written, more.skipped, more.records) == (2, 3, 5) and len(requests) == 5
        with pytest.raises(ValueError, match="other parameters"):
            await generate_rationales("ml-100k", teacher=teacher, encoder=HashEncoder(), out_dir=tmp_path,
                                      dataset_version="t1", n_users=5, samples=2, window_size=5, n_targets=2)
    assert [r.user_id for r in read_records(more.path)][:3] == [r.user_id for r in records]
    assert len({r.user_id for r in read_records(more.path)}) == 5


def test_cli_refuses_bad_arguments() -> None:
    for args in (["--users", "0"], ["--samples", "0"], ["--temperature", "0"], ["--version", "../x"]):
        proc = subprocess.run([sys.executable, "-m", "cli", "teacher-rationales", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, (args, proc.stderr)
        assert proc.stderr.startswith("slimstream: error:")


# ---- the CLI against the real local teacher --------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running_teacher(data_dir, tmp_path_factory.mktemp("rationale-teacher") / "server.log")


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", "teacher-rationales", "--data", "ml-100k",
                           "--samples", "2", "--window-size", "5", "--targets", "2", "--max-tokens", "32", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_cli_writes_resumes_and_reruns_from_the_cache(teacher_server: Server, data_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env.update({"SLIMSTREAM_DATA_DIR": str(data_dir), "SLIMSTREAM_TEACHER_URL": teacher_server.url + "/v1",
                "SLIMSTREAM_TEACHER_MODEL": MODEL, "SLIMSTREAM_TEACHER_MAX_CONCURRENCY": "1",
                "SLIMSTREAM_TEACHER_TIMEOUT_S": "60", "SLIMSTREAM_TEACHER_BACKOFF_BASE_S": "0.2"})
    out = tmp_path / "out"
    before = teacher_server.metrics()["requests_total"]
    proc = _cli(env, "--users", "2", "--out", str(out), "--version", "r1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    path = out / "r1.jsonl"
    first = list(read_records(path))
    assert len(first) == 2 and all(r.rationale.strip() and 0 < r.score <= 1 for r in first)
    assert all(r.teacher == f"{MODEL}@{teacher_server.url}/v1" and len(r.target_items) == 2 for r in first)
    assert teacher_server.metrics()["requests_total"] == before + 2  # one request (n=2) per user

    proc = _cli(env, "--users", "3", "--out", str(out), "--version", "r1")  # resume: only the missing user
    assert proc.returncode == 0, proc.stderr + proc.stdout
    second = list(read_records(path))
    assert second[:2] == first and len(second) == 3 and second[2].user_id not in {r.user_id for r in first}
    assert teacher_server.metrics()["requests_total"] == before + 3
    meta = json.loads((out / "r1.meta.json").read_text())
    assert meta["counts"] == {"records": 3, "users_requested": 3, "selected": 3, "skipped": 2, "written": 1,
                              "empty": 0}

    path.unlink()  # a full rerun is answered by the teacher cache: nothing reaches the server
    proc = _cli(env, "--users", "3", "--out", str(out), "--version", "r1")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    # Users finish in any order when requests run concurrently: compare per user.
    assert {r.user_id: r.rationale for r in read_records(path)} == {r.user_id: r.rationale for r in second}
    assert teacher_server.metrics()["requests_total"] == before + 3
    assert json.loads((out / "r1.meta.json").read_text())["teacher_stats"]["cache_hits"] == 3


@pytest.mark.slow
def test_sigterm_mid_run_leaves_meta_counts_that_match_the_file(teacher_server: Server, data_dir: Path,
                                                               tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env.update({"SLIMSTREAM_DATA_DIR": str(data_dir), "SLIMSTREAM_TEACHER_URL": teacher_server.url + "/v1",
                "SLIMSTREAM_TEACHER_MODEL": MODEL, "SLIMSTREAM_TEACHER_MAX_CONCURRENCY": "1"})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "teacher-rationales", "--data", "ml-100k",
                             "--samples", "1", "--window-size", "5", "--targets", "2", "--max-tokens", "48",
                             "--users", "40", "--seed", "11", "--temperature", "1.3", "--out", str(out),
                             "--version", "killed"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    path = out / "killed.jsonl"
    deadline = time.monotonic() + 180
    while not (path.is_file() and path.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no record written"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    records = path.read_text().count("\n")
    meta = json.loads((out / "killed.meta.json").read_text())
    assert 1 <= records < 40, records
    assert meta["counts"]["records"] == records and meta["counts"]["written"] == records
    teacher_server.wait_idle(60)


@pytest.mark.slow
def test_cli_unreachable_teacher_fails_in_one_line(data_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
    env.update({"SLIMSTREAM_DATA_DIR": str(data_dir), "SLIMSTREAM_TEACHER_URL": f"http://127.0.0.1:{free_port()}/v1",
                "SLIMSTREAM_TEACHER_MAX_RETRIES": "0"})
    proc = _cli(env, "--users", "1", "--out", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("slimstream: error: teacher at") and proc.stderr.count("\n") == 1, proc.stderr
