"""The CLI against the real broker: produce, tail, and `up` end to end with a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from streams.broker import free_port
from streams.events import Recommendation, RecommendationPath, RecommendedItem
from streams.settings import Settings
from tests.conftest import ROOT, run
from tests.kafka_io import publish, read_until

S = Settings.from_env()


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_produce_sends_valid_lines_keyed_by_user_and_reports_bad_ones(broker, tmp_path: Path) -> None:
    f = tmp_path / "events.jsonl"
    f.write_text("\n".join([
        json.dumps({"user_id": "u1", "item_id": "Toy Story (1995)", "event_type": "view", "timestamp": 1}),
        "{broken",
        json.dumps({"user_id": "u2", "item_id": "Heat (1995)", "event_type": "click", "timestamp": 2}),
        json.dumps({"user_id": "u3", "event_type": "click", "timestamp": 2}),
    ]) + "\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    proc = cli("produce", str(f), env=env)
    assert proc.returncode == 1, proc.stderr  # some lines were invalid
    assert f"{f}:2: skipped: malformed JSON" in proc.stderr and f"{f}:4: skipped: item_id" in proc.stderr
    records = run(read_until(broker.bootstrap_servers, S.kafka.topic_interactions, lambda r: len(r) >= 2, 30))
    assert sorted((r.key, json.loads(r.value)["item_id"]) for r in records) == [
        (b"u1", "Toy Story (1995)"), (b"u2", "Heat (1995)")]


def test_tail_prints_recommendations(broker) -> None:
    rec = Recommendation(user_id="u1", items=[RecommendedItem(item_id="Heat (1995)", score=0.5, title="Heat")],
                         rationale="Step 1: likes crime films.", rationale_current=True, window_version=3,
                         last_event_timestamp=5.0, path=RecommendationPath.slow, rationale_window_version=3)
    run(publish(broker.bootstrap_servers, S.kafka.topic_recommendations, [(b"u1", rec.model_dump_json().encode())]))
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
    proc = cli("tail", "--from-beginning", "--json", "--limit", "1", env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Recommendation.model_validate_json(proc.stdout.strip()) == rec
    proc = cli("tail", "--from-beginning", "--limit", "1", env=env, timeout=60)
    assert "u1" in proc.stdout and "Heat" in proc.stdout and "likes crime films" in proc.stdout


def _up_env(data_dir: Path, qdrant: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_") and k != "KAFKA_BOOTSTRAP_SERVERS"}
    # The registry beside this module's Qdrant copy: the ranker up trains must not serve other modules' workers.
    return {**env, "SLIMSTREAM_DATA_DIR": str(data_dir), "QDRANT_PATH": str(qdrant), "COLUMNS": "160",
            "SLIMSTREAM_REGISTRY_DIR": str(qdrant.parent / "registry"),
            "SLIMSTREAM_STUDENT_MAX_NEW_TOKENS": "48", "SLIMSTREAM_WEB_PORT": str(free_port())}


@pytest.mark.slow
def test_up_runs_the_main_job_and_stops_by_itself(data_dir, indexed_qdrant) -> None:
    proc = cli("up", "--users", "2", "--max-events", "6", "--rate", "20", "--ranker-minutes", "0.1",
               env=_up_env(data_dir, indexed_qdrant), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the first run trains the served ranker, judged through the serving code, and every answer names it
    assert "first run: training the served ranker" in proc.stdout and "ranker v0001:" in proc.stdout
    assert "ranker+v0001" in proc.stdout
    assert "6 events from 2 users" in proc.stdout
    assert "2/2 users have a rationale for their final window" in proc.stdout
    assert "slow current rationale" in proc.stdout
    assert "stopped: broker and worker are down" in proc.stdout


@pytest.mark.slow
def test_up_ctrl_c_leaves_no_process_behind(data_dir, indexed_qdrant) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "cli", "up", "--users", "2", "--rate", "1", "--no-train-ranker"],
                            cwd=ROOT, env=_up_env(data_dir, indexed_qdrant), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        children: list[psutil.Process] = []
        while time.monotonic() < deadline:
            children = psutil.Process(proc.pid).children(recursive=True)
            if len(children) >= 2:  # broker and worker
                break
            time.sleep(0.5)
        assert len(children) >= 2, "up did not start the broker and the worker"
        time.sleep(5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped: broker and worker are down" in out, out[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
