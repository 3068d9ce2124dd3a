"""A worker serves the ranker registry's trained ranker, on real components (Tansu, Qdrant local mode, the
student): every fast-path answer is the ranker's top-K for the user's window (the same items the harness's
``served`` method ranks); a window of items the ranker never saw gets its popularity fallback; a burst is
answered in batches (fewer ranker calls than events); `slimstream rankers promote` hot-swaps to a text-reading
version while events keep coming, with every event still answered, and that version serves catalogue items it
was not trained on."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.ranker_artifact import load_ranker, save_ranker
from models.served_ranker import ServedRanker
from models.slim_rec import SLIMRecConfig, SLIMRecRanker
from retrain.ranker import item_text_vectors
from streams.broker import EmbeddedBroker
from streams.datasets import load_interactions, load_items
from streams.registry import ModelRegistry
from streams.settings import Settings
from streams.splits import leave_one_out, restrict_users
from tests.conftest import ROOT, WorkerProcess, worker_env
from tests.test_hot_swap import Feed, ml_histories, recs_by_user

S = Settings.from_env()
CFG = SLIMRecConfig(max_len=20, dim=32, batch_size=64, epochs=2, threads=1, bf16=False)


def _publish(registry: ModelRegistry, items: str, data_dir: Path) -> str:
    # 150 ML-1M users: most of the 3,706 catalogue items are never seen in training.
    split = leave_one_out(restrict_users(load_interactions("ml-1m"), 150, 0))
    data = split.training_data()
    text = None
    if items != "id":
        text = item_text_vectors(Settings.from_env(data={"data_dir": data_dir}), "ml-1m", data.item_ids)
    ranker = SLIMRecRanker(replace(CFG, items=items), item_text=text)
    ranker.fit(data)
    staging = registry.staging_dir()
    return registry.publish(staging, None, save_ranker(ranker, data, staging, dataset="ml-1m-150"))


@pytest.fixture(scope="module")
def rankers(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> ModelRegistry:
    registry = ModelRegistry(tmp_path_factory.mktemp("registry") / "rankers", artifact="weights.pt", kind="ranker")
    assert _publish(registry, "id", data_dir) == "v0001"
    assert _publish(registry, "text", data_dir) == "v0002"
    registry.promote("v0001")
    return registry


@pytest.mark.slow
def test_worker_serves_the_trained_ranker_and_hot_swaps_it(rankers: ModelRegistry, data_dir: Path,
                                                            indexed_qdrant: Path, tmp_path: Path) -> None:
    v1 = ServedRanker(load_ranker(rankers.version_dir("v0001")), "v0001")
    histories = ml_histories()
    users = list(histories)[:3]
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        env = worker_env(broker, data_dir, indexed_qdrant, SLIMSTREAM_REGISTRY_DIR=str(rankers.root.parent),
                         SLIMSTREAM_STUDENT_MAX_NEW_TOKENS="16")
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            _serve_swap_and_check(worker, env, bootstrap, rankers, data_dir, histories, users, v1)
        finally:
            worker.stop()


def _serve_swap_and_check(worker: WorkerProcess, env: dict, bootstrap: str, rankers: ModelRegistry,  # type: ignore[type-arg]
                          data_dir: Path, histories: dict, users: list, v1: ServedRanker) -> None:  # type: ignore[type-arg]
    """The scenario, apart so that the worker is stopped whatever fails."""
    assert worker.get("/healthz/")["ranker_version"] == "v0001"
    feed = Feed(bootstrap, histories)

    # 1. a burst: 8 events per user at once, answered in batches, each answer the ranker's own top-K
    feed.send(users, 8)
    by_user = recs_by_user(bootstrap, lambda got: all(
        any(r.window_version == 8 and r.path.value == "fast" for r in got.get(u, [])) for u in users))
    for u in users:
        final = [r for r in by_user[u] if r.window_version == 8 and r.path.value == "fast"][-1]
        window = [it.item_id for it in histories[u][:8]]
        expected = v1.recommend([window], S.retrieval.top_k)[0]
        assert final.ranker_version == "ranker+v0001" and final.student_version == S.student.model_version
        assert [i.item_id for i in final.items] == [x.item_id for x in expected]
        assert not set(window) & {i.item_id for i in final.items}
        assert all(i.title and i.title != i.item_id for i in final.items)  # titles from the catalogue
    metrics = worker.metrics()
    assert metrics["ranker_calls"] < 24, metrics  # 24 events, fewer batched ranker calls

    # 2. a window the ranker knows nothing about: its popularity order
    from tests.kafka_io import event, publish
    from tests.conftest import run
    run(publish(bootstrap, S.kafka.topic_interactions,
                [event("stranger", "item-nobody-knows", 978300000.0, event_id="stranger-0")]))
    stranger = recs_by_user(bootstrap, lambda got: bool(got.get("stranger")))["stranger"][0]
    assert stranger.ranker_version == "popular+v0001"
    assert [i.item_id for i in stranger.items] == list(v1.popular[:S.retrieval.top_k])

    # 3. promote the text-reading v0002 while events keep coming: no event unanswered
    promote = subprocess.Popen([sys.executable, "-m", "cli", "rankers", "promote", "v0002"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while worker.metrics().get("ranker_swaps", 0) < 1:
        assert time.monotonic() < deadline, worker.log_tail()
        if max(feed.sent.values()) < 16:
            feed.send(users)
        time.sleep(0.3)
    out, err = promote.communicate(timeout=60)
    assert promote.returncode == 0, err
    feed.send(users, 2)
    total = {u: feed.sent[u] for u in users}
    by_user = recs_by_user(bootstrap, lambda got: all(
        any(r.window_version == total[u] for r in got.get(u, [])) for u in users))
    for u in users:
        fast = [r.window_version for r in by_user[u] if r.path.value == "fast"]
        assert fast == sorted(set(fast)) and fast[-1] == total[u], fast  # every event reflected, in order
        labels = [r.ranker_version for r in by_user[u] if r.path.value == "fast"]
        first_new = labels.index("ranker+v0002")
        assert set(labels[:first_new]) == {"ranker+v0001"} and set(labels[first_new:]) == {"ranker+v0002"}
    metrics = worker.metrics()
    assert metrics["ranker_swaps"] == 1 and metrics.get("ranker_swap_failures", 0) == 0
    assert metrics["ranker_version"] == "v0002" and metrics["last_ranker_swap"]["ok"]
    # v0002 was trained on 150 users' items; the rest of the catalogue is served from its text
    trained = json.loads((rankers.version_dir("v0002") / "items.json").read_text())
    assert metrics["ranker_items_added"] == len(load_items("ml-1m")) - (len(trained) - 1)
    # ...and ranks them: the worker's last answer is the one of v0002 extended with the whole catalogue
    v2 = ServedRanker(load_ranker(rankers.version_dir("v0002")), "v0002")
    catalogue = [it.item_id for it in load_items("ml-1m")]
    vectors = item_text_vectors(Settings.from_env(data={"data_dir": data_dir}), "ml-1m", ["", *catalogue])
    v2.add_items(catalogue, vectors[1:])
    for u in users:
        last = [r for r in by_user[u] if r.window_version == total[u] and r.path.value == "fast"][-1]
        window = [it.item_id for it in histories[u][:total[u]]]
        assert [i.item_id for i in last.items] == [x.item_id for x in v2.recommend([window], S.retrieval.top_k)[0]]
    assert np.isfinite([i.score for u in users for r in by_user[u] for i in r.items]).all()
