"""The worker's Prometheus metrics, liveness and readiness, against a real worker on the real broker:
``/metrics`` parses with prometheus_client's own text parser and its counters and histograms move with traffic;
``/readyz`` says what is missing until the worker can serve; ``/stats/`` keeps the JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streams.broker import EmbeddedBroker
from streams.settings import Settings
from tests.conftest import ROOT, WorkerProcess, run, worker_env
from tests.kafka_io import event, publish

pytestmark = pytest.mark.slow
S = Settings.from_env()


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _samples(port: int) -> dict[str, float]:
    status, body = _get(port, "/metrics")
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def _families(port: int) -> set[str]:
    """Every metric name a scrape offers: family names and sample names (``_total``, ``_bucket``, ...)."""
    status, body = _get(port, "/metrics")
    out: set[str] = set()
    for family in text_string_to_metric_families(body.decode()):
        out.add(family.name)
        out.update(sample.name for sample in family.samples)
    return out


def _dashboard_metrics() -> set[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "slimstream.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    return set(re.findall(r"\bslimstream_[a-z0-9_]+", exprs))


def test_metrics_readiness_and_liveness_of_a_running_worker(tmp_path: Path, data_dir: Path,
                                                            indexed_qdrant: Path) -> None:
    with EmbeddedBroker() as broker:
        worker = WorkerProcess(worker_env(broker, data_dir, indexed_qdrant), tmp_path / "worker.log")
        log = open(worker.log_path, "ab")
        worker.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=worker.env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            seen: list[tuple[int, dict]] = []
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                assert worker.proc.poll() is None, worker.log_tail()
                try:
                    status, body = _get(worker.port, "/readyz")
                except OSError:
                    time.sleep(0.2)
                    continue
                seen.append((status, json.loads(body)))
                if status == 200:
                    break
                time.sleep(0.2)
            assert seen and seen[-1][0] == 200 and all(v for k, v in seen[-1][1].items() if k != "ready")
            for status, body in seen[:-1]:  # not ready yet: 503, saying what is missing
                assert status == 503 and body["ready"] is False and not all(
                    body[k] for k in ("store_loaded", "models_loaded", "recovery_done", "partitions_assigned"))
            assert _get(worker.port, "/livez")[0] == 200
            # No SLIMSTREAM_API_TOKEN (the default, on loopback): the /v1 API needs no credentials.
            status, body = _get(worker.port, "/v1/recommendations/obs-nobody")
            assert status == 200 and json.loads(body)["source"] == "fallback"

            before = _samples(worker.port)
            assert before.get("slimstream_events_in_total", 0.0) == 0.0
            assert any(k.startswith("slimstream_models_info{") for k in before)
            records = [event(f"obs-{n}", "Toy Story (1995)", 1_000_000 + n) for n in range(3)]
            records.append((b"obs-bad", b'{"user_id": "obs-bad"}'))  # a dead letter: its counter exists too
            run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, records))
            worker.wait_until(lambda h: worker.metrics().get("recommendations_fast", 0) >= 3
                              and worker.metrics().get("dead_letters", 0) >= 1, 60)
            after = _samples(worker.port)
            families = _families(worker.port)
            stats = json.loads(_get(worker.port, "/stats/")[1])
            consumer = json.loads(_get(worker.port, "/consumer/")[1])
        finally:
            worker.stop()
    assert after["slimstream_events_in_total"] == 4.0 == stats["events_in"]
    assert after["slimstream_events_applied_total"] == 3.0
    assert after["slimstream_event_to_recommendation_seconds_count"] >= 3
    assert after["slimstream_fast_path_batch_events_sum"] >= 3
    assert after["slimstream_vector_store_call_seconds_count"] > before.get("slimstream_vector_store_call_seconds_count", 0)
    assert after["slimstream_assigned_partitions"] == S.kafka.topic_partitions
    # Every metric the provisioned Grafana dashboard (compose profile observe) plots is one the worker serves.
    # (A counter without samples yet, e.g. no attributed feedback, is still announced by its family name.)
    unknown = {m for m in _dashboard_metrics()
               if m not in families and re.sub(r"_(total|bucket|sum|count|info)$", "", m) not in families}
    assert not unknown, f"the dashboard queries metrics the worker does not export: {sorted(unknown)}"
    # /consumer/: every input partition resumed, past the three applied events (and the dead letter) in all.
    inputs = [p for p in consumer["aiokafka"]["partitions"] if p["tp"].startswith(S.kafka.topic_interactions + "[")]
    assert consumer["flow_active"] and consumer["recovery_completed"] and len(inputs) == S.kafka.topic_partitions
    assert not any(p["paused"] for p in inputs) and sum(p["position"] for p in inputs) == 4
    assert not any(tp.startswith(S.kafka.topic_interactions + "[") for tp in consumer["faust_paused"])
    routes = [consumer["conductor_routes"][p["tp"]] for p in inputs]  # each input partition reaches a channel
    assert all(routes) and all(ch["queued"] in (0, None) for r in routes for ch in r)
    info = next(k for k in after if k.startswith("slimstream_models_info{"))
    assert "student=smollm2-135m-instruct-base" in info
