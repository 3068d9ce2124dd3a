"""The whole stream on real components: Tansu, a worker process, Qdrant local mode, SmolLM2, MiniLM.

One broker and one worker serve the module; the end-to-end test runs last because it stops the worker
to open Qdrant's local-mode directory (one process at a time).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams.broker import EmbeddedBroker
from streams.datasets import load_interactions, load_items
from streams.events import DeadLetter, Recommendation
from streams.settings import Settings
from streams.topics import topic_specs
from tests.conftest import WorkerProcess, run, worker_env
from tests.kafka_io import event, publish, read_until

pytestmark = pytest.mark.slow
S = Settings.from_env()


@pytest.fixture(scope="module")
def stream_broker():
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture(scope="module")
def stream_worker(stream_broker, data_dir: Path, indexed_qdrant: Path, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    worker = WorkerProcess(worker_env(stream_broker, data_dir, indexed_qdrant), log)
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def catalogue_ids() -> set[str]:
    return {i.item_id for i in load_items("ml-1m")}


@pytest.fixture(scope="module")
def ml1m_histories() -> dict[str, list]:
    by_user: dict[str, list] = defaultdict(list)
    for it in load_interactions("ml-1m")[:20_000]:
        by_user[it.user_id].append(it)
    return {u: sorted(v, key=lambda i: i.timestamp) for u, v in by_user.items() if len(v) >= 25}


def recs_for(records, user: str) -> list[Recommendation]:
    return [Recommendation.model_validate_json(r.value) for r in records if r.key == user.encode()]


def test_topics_created_up_front(stream_broker, stream_worker) -> None:
    async def describe() -> dict[str, int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=stream_broker.bootstrap_servers)
        await admin.start()
        try:
            return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(
                [s.name for s in topic_specs(S)])}
        finally:
            await admin.close()

    counts = run(describe())
    assert counts == {s.name: s.partitions for s in topic_specs(S)}


def test_malformed_events_go_to_dead_letter_and_stream_goes_on(stream_broker, stream_worker, catalogue_ids) -> None:
    user = "dlq-user"
    items = sorted(catalogue_ids)[:3]
    records = [
        event(user, items[0], 1000.0),
        (user.encode(), b'{"user_id": "dlq-user", "item_id": '),  # malformed JSON
        (user.encode(), json.dumps({"user_id": user, "event_type": "view", "timestamp": 1.0}).encode()),  # no item
        (user.encode(), json.dumps({"user_id": 42, "item_id": items[1], "event_type": "view",
                                    "timestamp": "yesterday"}).encode()),  # wrong types
        (user.encode(), json.dumps({"user_id": user, "item_id": "x" * 40_000, "event_type": "view",
                                    "timestamp": 1.0}).encode()),  # oversized
        event(user, items[1], 1001.0),
        event(user, items[2], 1002.0),
    ]
    run(publish(stream_broker.bootstrap_servers, S.kafka.topic_interactions, records))

    dlq = run(read_until(stream_broker.bootstrap_servers, S.kafka.topic_dead_letter, lambda r: len(r) >= 4, 120))
    letters = [DeadLetter.model_validate_json(r.value) for r in dlq]
    assert len(letters) == 4
    reasons = sorted(letter.error for letter in letters)
    assert any("malformed JSON" in r for r in reasons)
    assert any("item_id" in r and "required" in r.lower() for r in reasons)
    assert any("user_id" in r and "timestamp" in r for r in reasons)
    assert any("too large" in r for r in reasons)
    # Nothing is lost: the original bytes and their position come along.
    import base64
    raws = {base64.b64decode(letter.raw) for letter in letters}
    assert records[1][1] in raws and records[4][1] in raws
    assert all(letter.source_topic == S.kafka.topic_interactions and letter.source_offset >= 0 for letter in letters)

    recs = run(read_until(stream_broker.bootstrap_servers, S.kafka.topic_recommendations,
                          lambda r: any(x.window_version == 3 for x in recs_for(r, user)), 120))
    versions = {x.window_version for x in recs_for(recs, user)}
    # A window's version counts its applied events, and the window holds each of them: the three valid
    # events around the bad ones were all applied (answered together when they arrive in one batch).
    assert max(versions) == 3
    assert [i["item_id"] for i in stream_worker.get(f"/window/{user}/")["items"]] == items


def test_event_under_wrong_key_is_rekeyed_not_lost(stream_broker, stream_worker, catalogue_ids) -> None:
    user = "rekey-user"
    item = sorted(catalogue_ids)[10]
    _, value = event(user, item, 2000.0)
    run(publish(stream_broker.bootstrap_servers, S.kafka.topic_interactions, [(b"someone-else", value), (None, value)]))
    # Both copies are re-published under the user's key and applied (no event_id: two events), none lost.
    recs = run(read_until(stream_broker.bootstrap_servers, S.kafka.topic_recommendations,
                          lambda r: any(x.window_version == 2 for x in recs_for(r, user)), 120))
    mine = recs_for(recs, user)
    assert mine and mine[-1].window_version == 2 and item not in {i.item_id for i in mine[-1].items}
    assert stream_worker.metrics()["rekeyed"] >= 2


def test_burst_is_coalesced_into_few_student_calls(stream_broker, stream_worker, ml1m_histories) -> None:
    history = next(iter(ml1m_histories.values()))[:20]
    user = "burst-user"
    records = [event(user, it.item_id, it.timestamp) for it in history]
    run(publish(stream_broker.bootstrap_servers, S.kafka.topic_interactions, records))

    def last_rationale_arrived(rs) -> bool:  # type: ignore[no-untyped-def]
        return any(x.path.value == "slow" and x.rationale_window_version == 20 for x in recs_for(rs, user))

    recs = recs_for(run(read_until(stream_broker.bootstrap_servers, S.kafka.topic_recommendations,
                                   last_rationale_arrived, 300)), user)
    fast = [r for r in recs if r.path.value == "fast"]
    slow = [r for r in recs if r.path.value == "slow"]
    # Every event is answered on the fast path by a recommendation that reflects it; events of one user that
    # arrive together are answered together, by one recommendation for the newest window (never out of order).
    versions = [r.window_version for r in fast]
    assert versions and versions[-1] == 20 and versions == sorted(set(versions)), versions
    # Each slow message is one rationale the student wrote for this user.
    assert 1 <= len(slow) <= 4, f"{len(slow)} student rationales for a burst of 20 events"
    last = slow[-1]
    assert last.window_version == 20 and last.rationale_current and last.rationale
    assert last.last_event_timestamp == max(it.timestamp for it in history)
    metrics = stream_worker.metrics()
    # The user is asked for once per written window (at most once per fast-path batch, never per event), and
    # every request finds its window in the table (none is taken before the write and dropped).
    assert 1 <= metrics["load"]["rationale_backlog"]["requested"] <= 20
    assert metrics.get("rationale_requests_without_window", 0) == 0
    assert metrics["events_applied"] >= 20 and metrics["fast_path_batch_events"] >= 20


def test_end_to_end_recommendations_with_rationales(stream_broker, stream_worker, ml1m_histories,
                                                    catalogue_ids, indexed_qdrant, data_dir) -> None:
    users = dict(list(ml1m_histories.items())[1:4])
    n = 6
    records = []
    for user, hist in users.items():
        records += [event(user, it.item_id, it.timestamp, event_id=f"{user}-{k}") for k, it in enumerate(hist[:n])]
    run(publish(stream_broker.bootstrap_servers, S.kafka.topic_interactions, records))

    def all_current(rs) -> bool:  # type: ignore[no-untyped-def]
        return all(any(x.path.value == "slow" and x.rationale_window_version == n for x in recs_for(rs, u))
                   for u in users)

    records_out = run(read_until(stream_broker.bootstrap_servers, S.kafka.topic_recommendations, all_current, 300))
    assert all_current(records_out), stream_worker.log_tail()
    for user, hist in users.items():
        window = {it.item_id for it in hist[:n]}
        recs = recs_for(records_out, user)
        fast = [r.window_version for r in recs if r.path.value == "fast"]
        assert fast and fast[-1] == n and fast == sorted(set(fast)), fast
        final = [r for r in recs if r.path.value == "slow" and r.rationale_window_version == n][-1]
        assert final.rationale_current and final.window_version == n
        assert len(final.rationale) > 40
        assert final.rationale_model_version == S.student.model_version
        assert len(final.items) == S.retrieval.top_k
        ids = [i.item_id for i in final.items]
        assert set(ids) <= catalogue_ids, "recommended items come from the ML-1M catalogue"
        assert not set(ids) & window, "items already in the window are excluded"
        assert [i.score for i in final.items] == sorted((i.score for i in final.items), reverse=True)

    # Qdrant's local mode is single-process: stop the worker, then look at what it stored.
    stream_worker.stop()
    from vectorstore.store import VectorStore

    store = VectorStore(Settings.from_env(data={"data_dir": data_dir}, qdrant={"path": str(indexed_qdrant)}))
    try:
        points = store.rationale_points()
    finally:
        store.close()
    for user in users:
        mine = [p for p in points if p["user_id"] == user]
        assert len(mine) == 1, f"{user}: {len(mine)} rationale points"
        assert mine[0]["window_version"] == n and mine[0]["rationale"]
    burst = [p for p in points if p["user_id"] == "burst-user"]
    assert len(burst) == 1 and burst[0]["window_version"] == 20
