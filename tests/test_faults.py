"""Faults of the student's backend, against a real OpenAI-compatible server (``models.serving.api_server`` on
the packaged SmolLM2 GGUF, llama.cpp): frozen (SIGSTOP: connections open, nothing answers, as a hung vLLM),
then killed (connection refused) and started again. The fast path keeps answering every user throughout,
and the users whose rationale failed are explained once the server is back, without sending another event
(the retry backoff in agents/rationale.py). The vector store's outage is tests/test_window_batch.py's."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.settings import Settings
from tests.conftest import TEACHER_MODEL, ServerProcess, WorkerProcess, run, worker_env
from tests.kafka_io import event, publish, read_until

pytestmark = pytest.mark.slow
S = Settings.from_env()


def _recs(records: list) -> list[dict]:
    return [json.loads(r.value) for r in records if r.value]


def _answered(users: set[str], path: str | None = None):  # type: ignore[no-untyped-def]
    def done(records: list) -> bool:
        got = {r["user_id"] for r in _recs(records)
               if path is None or (r["path"] == path and (path == "fast" or r["rationale_current"]))}
        return users <= got
    return done


def _server(data_dir: Path, log: Path, port: int | None = None) -> ServerProcess:
    extra = ["--backend", "llamacpp", "--max-queue", "16"] + (["--port", str(port)] if port else [])
    srv = ServerProcess.teacher(data_dir, log, *extra)
    if port:  # the same address as before (the worker knows only that one)
        srv.port, srv.url = port, f"http://127.0.0.1:{port}"
    return srv.wait_ready()


def test_a_hung_then_dead_student_server_never_stalls_the_fast_path_and_rationales_come_once_it_is_back(
        tmp_path: Path, data_dir: Path, indexed_qdrant: Path) -> None:
    server = _server(data_dir, tmp_path / "server.log")
    port = server.port
    try:
        with EmbeddedBroker() as broker:
            env = worker_env(broker, data_dir, indexed_qdrant,
                             SLIMSTREAM_STUDENT_BACKEND="openai", SLIMSTREAM_STUDENT_URL=f"{server.url}/v1",
                             SLIMSTREAM_STUDENT_SERVED_MODEL=TEACHER_MODEL, SLIMSTREAM_STUDENT_MAX_NEW_TOKENS="32",
                             SLIMSTREAM_STUDENT_DEADLINE_S="15", SLIMSTREAM_STUDENT_CONNECT_TIMEOUT_S="2",
                             SLIMSTREAM_STUDENT_RETRY_BASE_S="1", SLIMSTREAM_STUDENT_RETRY_MAX_S="4")
            worker = WorkerProcess(env, tmp_path / "worker.log").start()
            bootstrap, topic = broker.bootstrap_servers, S.kafka.topic_recommendations

            def send(*users: str, t: int) -> None:
                run(publish(bootstrap, S.kafka.topic_interactions,
                            [event(u, "Toy Story (1995)", t, event_id=f"{u}-{t}") for u in users]))

            try:
                # Control: with the server up, a user gets a current rationale.
                send("f-warm", t=1_000_000)
                assert _answered({"f-warm"}, "slow")(run(read_until(bootstrap, topic, _answered({"f-warm"}, "slow"),
                                                                    120))), worker.log_tail()

                # 1. The server hangs: every user still gets a fast-path answer at once.
                os.killpg(server.proc.pid, signal.SIGSTOP)
                hung = {"f-a", "f-b", "f-c"}
                t0 = time.monotonic()
                send(*sorted(hung), t=1_000_100)
                assert _answered(hung, "fast")(run(read_until(bootstrap, topic, _answered(hung, "fast"), 30)))
                fast_s = time.monotonic() - t0
                worker.wait_until(lambda h: worker.metrics().get("student_deadline_exceeded", 0) >= 1, 60)
                assert not _answered(hung, "slow")(run(read_until(bootstrap, topic, lambda rs: False, 1)))

                # 2. It comes back: the failed users are explained without another event.
                os.killpg(server.proc.pid, signal.SIGCONT)
                assert _answered(hung, "slow")(run(read_until(bootstrap, topic, _answered(hung, "slow"), 180))), \
                    worker.log_tail()
                assert worker.metrics().get("rationale_retries_scheduled", 0) >= len(hung)

                # 3. The server dies (connection refused): fast answers go on; once it is started again on its
                # address, the user who asked meanwhile is explained.
                server.stop()
                send("f-d", t=1_000_200)
                assert _answered({"f-d"}, "fast")(run(read_until(bootstrap, topic, _answered({"f-d"}, "fast"), 30)))
                worker.wait_until(lambda h: worker.metrics().get("student_errors", 0) >= 1, 60)
                server = _server(data_dir, tmp_path / "server2.log", port)
                assert _answered({"f-d"}, "slow")(run(read_until(bootstrap, topic, _answered({"f-d"}, "slow"),
                                                                 180))), worker.log_tail()
                metrics = worker.metrics()
            finally:
                worker.stop()
    finally:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert fast_s < 20, fast_s  # the hang did not hold the fast path (the student's deadline is 15 s)
    assert metrics["events_applied"] == 5 and metrics.get("handler_errors", 0) == 0


def test_the_worker_reconnects_when_the_broker_comes_back_and_resumes(tmp_path: Path, data_dir: Path,
                                                                      indexed_qdrant: Path) -> None:
    """The broker goes away for 20 s and comes back on its address. Tansu's memory storage starts empty (a real
    broker keeps its logs), so what is checked is the worker itself: alive and answering /healthz/ meanwhile,
    consuming and answering new events once the broker is back, and stopping cleanly afterwards."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker1.log").start()
    port = broker.port
    worker = WorkerProcess(worker_env(broker, data_dir, indexed_qdrant), tmp_path / "worker.log").start()

    def answered(user: str):  # type: ignore[no-untyped-def]
        return lambda rs: any(json.loads(r.value)["user_id"] == user for r in rs if r.value)

    try:
        run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, [event("b-1", "Toy Story (1995)", 1e6)]))
        assert answered("b-1")(run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations,
                                              answered("b-1"), 60)))
        broker.stop()
        time.sleep(20)
        assert worker.get("/healthz/")["models_ready"]  # alive without a broker
        broker = EmbeddedBroker(port=port, log_path=tmp_path / "broker2.log").start()
        t0, resumed = time.monotonic(), None
        for n in range(40):  # an event every few seconds until one is answered
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions,
                        [event("b-2", "Heat (1995)", 1e6 + n, event_id=f"b-2-{n}")]))
            if answered("b-2")(run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations,
                                              answered("b-2"), 3))):
                resumed = time.monotonic() - t0
                break
        assert resumed is not None and resumed < 120, worker.log_tail()
    finally:
        code = worker.stop()
        broker.stop()
    assert code == 0
