"""A restarted worker continues every user's window from the changelog, exactly.

Tansu answers ListOffsets(latest) with the last *batch's* base offset + 1. When changelog records are
batched, Faust's recovery believes it has reached the end early and silently drops the rest of the last
batch. The worker's recovery reads each changelog's last batch for its true end (``kafka.probe_log_end``,
streams/kafka_compat.py); the older workaround, one record per batch, is checked too. These tests compare,
for every user, the recovered window with the window recomputed from the interactions topic with the
worker's own rules, so a single lost changelog update fails them. The control case turns both off and shows
the comparison does catch the loss.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

from streams.broker import EmbeddedBroker
from streams.datasets import load_interactions
from streams.settings import Settings
from streams.topics import WINDOWS_TABLE
from streams.window import WindowState
from tests.conftest import WorkerProcess, private_data_dir, run, worker_env
from tests.kafka_io import committed_offsets, end_offsets, event, expected_windows, publish, read_until

pytestmark = pytest.mark.slow
S = Settings.from_env()
USERS, EVENTS_PER_USER, TAIL_EVENTS = 12, 15, 3


def histories() -> dict[str, list]:
    by_user: dict[str, list] = defaultdict(list)
    for it in load_interactions("ml-1m")[:30_000]:
        by_user[it.user_id].append(it)
    picked = [u for u, v in by_user.items() if len(v) >= EVENTS_PER_USER][:USERS]
    return {u: sorted(by_user[u], key=lambda i: i.timestamp)[:EVENTS_PER_USER] for u in picked}


def wait_all_committed(bootstrap: str, partitions: int, total: int, worker: WorkerProcess) -> None:
    """Until the worker's consumer group has committed ``total`` interactions (all partitions together)."""
    deadline = time.monotonic() + 60
    while True:
        committed = run(committed_offsets(bootstrap, S.kafka.app_id, S.kafka.topic_interactions, partitions))
        if sum(max(0, o) for o in committed.values()) >= total:
            return
        assert time.monotonic() < deadline, (committed, total, worker.log_tail())
        time.sleep(0.5)


def caught_up(records: list, versions: dict[str, int]) -> bool:
    """Whether the changelog ``records`` hold, as each user's newest value, the window version in ``versions``.
    The worker writes a user's window once per fast-path batch, so a burst may leave fewer records than events."""
    newest: dict[str, int] = {}
    for r in records:
        newest[json.loads(r.key)] = json.loads(r.value)["version"]  # Faust JSON keys and values
    return all(newest.get(u) == v for u, v in versions.items())


def versions_after(records: list) -> dict[str, int]:
    """Each user's window version once ``records`` (distinct events) are applied: one per event."""
    out: dict[str, int] = defaultdict(int)
    for key, _ in records:
        out[key.decode()] += 1
    return dict(out)


class Restart(NamedTuple):
    diff: dict[str, tuple]  # {user: (recovered, expected)} for the users whose window came back different
    past_reported_end: set[str]  # users with a changelog record beyond the broker's ListOffsets(latest) answer


def restart_and_compare(tmp_path: Path, data_dir: Path, qdrant: Path, **env: str) -> Restart:
    """Fill windows, restart the worker, compare every recovered window with its recomputation."""
    # Linger makes the producer gather the burst's changelog writes into multi-record batches, the case
    # Tansu's ListOffsets answer gets wrong.
    env.setdefault("SLIMSTREAM_PRODUCER_LINGER_MS", "300")
    partitions = int(env.get("SLIMSTREAM_TOPIC_PARTITIONS", S.kafka.topic_partitions))
    changelog = S.kafka.changelog_topic(WINDOWS_TABLE)
    with EmbeddedBroker() as broker:
        worker = WorkerProcess(worker_env(broker, data_dir, qdrant, **env), tmp_path / "worker.log")
        worker.start()
        hist = histories()
        # Interleave users and send in bursts so the worker's changelog writes go out many at a time.
        records = [event(u, h[k].item_id, h[k].timestamp, event_id=f"{u}-{k}")
                   for k in range(EVENTS_PER_USER) for u, h in hist.items()]
        # The last few events go out alone once everything before them is in the changelog: their writes
        # then share the changelog's last batch whatever the machine's speed, so "the end of the log" is a
        # multi-record batch every run (the case Tansu misreports), not by the luck of the burst's timing.
        body, tail = records[:-TAIL_EVENTS], records[-TAIL_EVENTS:]
        run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, body, linger_ms=50))
        worker.wait_until(lambda h: worker.metrics().get("events_applied", 0) >= len(body), 120)
        want = versions_after(body)
        assert caught_up(run(read_until(broker.bootstrap_servers, changelog, lambda r: caught_up(r, want), 30)), want)
        run(publish(broker.bootstrap_servers, S.kafka.topic_interactions, tail, linger_ms=50))
        total = len(records)
        worker.wait_until(lambda h: worker.metrics().get("events_applied", 0) >= total, 120)
        before = {u: worker.get(f"/window/{u}/") for u in hist}
        # Stop only once the worker has committed every interaction: the restarted worker then gets none of them
        # again, so its windows are recovery's work alone. A redelivered event would re-apply an update that
        # recovery lost (at-least-once heals it) and hide the loss from this comparison.
        wait_all_committed(broker.bootstrap_servers, partitions, total, worker)
        assert worker.stop() == 0, worker.log_tail()
        want = versions_after(records)
        written = run(read_until(broker.bootstrap_servers, changelog, lambda r: caught_up(r, want), 30))
        reported = run(end_offsets(broker.bootstrap_servers, changelog, partitions))

        worker.start()
        after = {u: worker.get_or_none(f"/window/{u}/") for u in hist}
        reapplied = worker.metrics().get("events_applied", 0)
        worker.stop()
        expected = expected_windows(broker.bootstrap_servers, total)

    assert caught_up(written, want)  # every user's newest window reached the changelog
    assert len(written) <= total  # at most one write per applied event (once per user per fast-path batch)
    assert reapplied == 0  # nothing was delivered again: the windows after the restart are recovery's alone
    past_end = {json.loads(r.key) for r in written if r.offset >= reported[r.partition]}  # Faust JSON keys
    assert set(expected) == set(hist)
    epochs = {u: WindowState.model_validate(before[u]).epoch for u in hist}
    # The worker stamps each new window lineage with its creation time; a recomputation has no clock, so it
    # borrows the live one. Recovery must restore the epoch too, not start a new lineage.
    expected = {u: e.model_copy(update={"epoch": epochs[u]}) for u, e in expected.items()}
    for u in hist:  # before the restart the live table was right: any difference is recovery's
        assert epochs[u] > 1_600_000_000_000, epochs[u]
        assert WindowState.model_validate(before[u]) == expected[u]
    diff = {u: (after[u], expected[u]) for u in hist
            if after[u] is None or "error" in after[u] or WindowState.model_validate(after[u]) != expected[u]}
    return Restart(diff, past_end)


@pytest.mark.parametrize("partitions", ["4", "1"])
def test_restarted_worker_recovers_every_window_exactly(tmp_path, data_dir, indexed_qdrant, partitions) -> None:
    r = restart_and_compare(tmp_path, data_dir, indexed_qdrant, SLIMSTREAM_TOPIC_PARTITIONS=partitions)
    if partitions == "1":  # the tail's writes shared the last batch: the broker's answer fell short of them
        assert r.past_reported_end, "the tail's changelog writes should have shared one batch"
    assert not r.diff, {u: (a and a.get("version"), e.version) for u, (a, e) in r.diff.items()}


def test_one_record_per_batch_still_recovers_exactly_without_the_probe(tmp_path, data_dir, indexed_qdrant) -> None:
    r = restart_and_compare(tmp_path, data_dir, indexed_qdrant, SLIMSTREAM_ONE_RECORD_PER_BATCH="true",
                            SLIMSTREAM_PROBE_LOG_END="false", SLIMSTREAM_TOPIC_PARTITIONS="1")
    assert not r.past_reported_end  # one record per batch: the broker's answer is the true end
    assert not r.diff, {u: (a and a.get("version"), e.version) for u, (a, e) in r.diff.items()}


def test_a_rocksdb_table_store_keeps_every_window_across_a_restart(tmp_path, data_dir, indexed_qdrant) -> None:
    # Faust's RocksDB store: the windows live on the worker's disk and recovery reads only the changelog written
    # since its persisted offsets. A data dir of its own: the state must come from this run alone.
    own = private_data_dir(data_dir, tmp_path / "data")
    r = restart_and_compare(tmp_path, own, indexed_qdrant, SLIMSTREAM_TABLE_STORE="rocksdb",
                            SLIMSTREAM_TOPIC_PARTITIONS="1")
    assert r.past_reported_end, "the tail's changelog writes should have shared one batch"
    assert not r.diff, {u: (a and a.get("version"), e.version) for u, (a, e) in r.diff.items()}
    assert any((own / "faust").rglob("*.sst")) or any((own / "faust").rglob("CURRENT")), "no RocksDB files written"


def test_control_batched_changelog_loses_updates_on_tansu(tmp_path, data_dir, indexed_qdrant) -> None:
    # Faust ends recovery when every partition reached its (mis)reported end; the rest of the last batch of
    # the partition that finishes last is then buffered and never applied. With one partition that
    # partition is always the last one, and the tail events make its last batch hold several records.
    r = restart_and_compare(tmp_path, data_dir, indexed_qdrant, SLIMSTREAM_PROBE_LOG_END="false",
                            SLIMSTREAM_ONE_RECORD_PER_BATCH="false", SLIMSTREAM_TOPIC_PARTITIONS="1")
    assert r.past_reported_end, "the tail's changelog writes should have shared one batch"
    # Exactly the users with an update past the reported end come back stale: the comparison sees each loss.
    assert set(r.diff) == r.past_reported_end, (set(r.diff), r.past_reported_end)
