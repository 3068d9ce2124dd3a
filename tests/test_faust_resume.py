"""streams/faust_resume.py against the real broker: records already waiting on the input topic when a worker
starts (a fresh group: no committed offsets) all reach the agent, even when the seek that follows recovery is
slow and the agent is not yet iterating (the window agent waits for its vector store); with Faust's own ``on_recovery_completed`` the same start drops the records its fetcher delivered during
that seek (faust-streaming issue #596), which is what the wrapper is for."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.settings import Settings
from streams.topics import WINDOWS_TABLE, ensure_topics
from tests.kafka_io import event, publish

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
N = 40


def _received(fix: str, tmp_path: Path) -> set[tuple[int, int]]:
    out = tmp_path / f"received-{fix}.txt"
    (tmp_path / fix).mkdir()
    with EmbeddedBroker() as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMSTREAM_")}
        env.update({"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers, "SLIMSTREAM_DATA_DIR": str(tmp_path / fix),
                    "SLIMSTREAM_WEB_ENABLED": "false", "SLIMSTREAM_APP_ID": f"resume-{fix}",
                    "SEEK_DELAY_S": "2", "AGENT_DELAY_S": "1", "RESUME_FIX": fix, "OUT": str(out), "PYTHONUNBUFFERED": "1"})
        settings = Settings.from_env(env)
        asyncio.run(ensure_topics(settings))
        asyncio.run(publish(broker.bootstrap_servers, settings.kafka.topic_interactions,
                            [event(f"r-{i}", "Heat (1995)", 1e6 + i) for i in range(N)]))
        # A table to recover (Faust's fetcher runs during a recovery, so it can deliver before the seek).
        asyncio.run(publish(broker.bootstrap_servers, settings.kafka.changelog_topic(WINDOWS_TABLE),
                            [(json.dumps(f"w-{i}").encode(), json.dumps({"user_id": f"w-{i}"}).encode())
                             for i in range(200)]))
        log = open(tmp_path / f"worker-{fix}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "tests.resume_race_worker"], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            ready = False
            while time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / f"worker-{fix}.log").read_text()[-3000:]
                text = (tmp_path / f"worker-{fix}.log").read_text(errors="replace")
                got = len(out.read_text().splitlines()) if out.exists() else 0
                if got >= N:
                    break
                if not ready and "Worker ready" in text:
                    ready, deadline = True, time.monotonic() + 10  # then 10 s to deliver what waits
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
    lines = out.read_text().splitlines() if out.exists() else []
    return {(int(p), int(o)) for p, o in (ln.split() for ln in lines)}


def test_records_waiting_at_a_first_start_all_reach_the_agent(tmp_path: Path) -> None:
    assert len(_received("1", tmp_path)) == N


def test_faust_alone_drops_the_records_it_delivered_during_the_seek(tmp_path: Path) -> None:
    # Not a property to keep: the evidence that the test above can fail. A Faust release that fixes the race
    # makes this one fail (and streams/faust_resume.py then leaves that release's method alone).
    assert len(_received("0", tmp_path)) < N
