"""The worker keeps serving on a backlog far past where it used to stall (19,722 of 20,000 events), and with
hostile records interleaved: every valid event applied (every window exact), every bad record dead-lettered
with its reason, fresh events answered on the fast path within seconds while the student is still far
behind, and the agent never crashes.

Before: the rationale agent's full input buffer blocked Faust's shared fetcher, which stopped the window
agent too; hostile records crashed the agent (RecursionError, a dead letter too large for the broker).
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from pathlib import Path

import pytest

from streams.broker import EmbeddedBroker
from streams.events import DeadLetter, Recommendation
from streams.replay import earliest_events
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.window import WindowState
from tests.conftest import WorkerProcess, run, worker_env
from tests.hostile import hostile_corpus, interleave
from tests.kafka_io import event, expected_windows, publish, read_until

pytestmark = pytest.mark.slow
S = Settings.from_env()
BACKLOG = 30_000  # ML-1M's earliest events: 230 users
HOSTILE = 10_000
FRESH = 20
CRASH_MARKS = ("Crashed reason", "Traceback (most recent call last)")


def ml1m_backlog(n: int) -> list[tuple[bytes, bytes]]:
    return [(ev.user_id.encode(), ev.model_dump_json(exclude_none=True).encode())
            for ev in earliest_events("ml-1m", n)]


def serve_backlog(tmp_path: Path, data_dir: Path, qdrant: Path, records: list, valid: int) -> dict:
    """Publish ``records`` before the worker starts; start it; check it consumed and applied all of it and
    answers fresh events within seconds while its student is still behind. Returns what the checks saw."""
    with EmbeddedBroker(log_path=tmp_path / "tansu.log") as broker:
        bootstrap = broker.bootstrap_servers
        run(ensure_topics(S.updated(kafka={"bootstrap_servers": bootstrap})))
        run(publish(bootstrap, S.kafka.topic_interactions, records, linger_ms=20))
        worker = WorkerProcess(worker_env(broker, data_dir, qdrant), tmp_path / "worker.log").start()
        try:
            worker.wait_until(lambda h: worker.metrics().get("events_in", 0) >= len(records), 900)
            drained = worker.metrics()
            users = {r[0] for r in records[:valid]}
            # The student is far behind: most users still wait for their first rationale.
            assert drained["load"]["rationale_backlog"]["waiting_users"] > 0, drained["load"]
            assert drained.get("rationales_generated", 0) < len(users) / 2, drained

            # Fresh events now: each new user's first fast-path answer comes within seconds.
            fresh = [event(f"fresh-{k}", "Toy Story (1995)", 978300760.0 + k) for k in range(FRESH)]
            sent_at = time.time()
            run(publish(bootstrap, S.kafka.topic_interactions, fresh, linger_ms=0))
            want = {key.decode() for key, _ in fresh}

            def answered(rs) -> bool:  # type: ignore[no-untyped-def]
                return want <= {r.key.decode() for r in rs if r.key and r.key.decode() in want}

            recs = run(read_until(bootstrap, S.kafka.topic_recommendations, answered, 60))
            first: dict[str, Recommendation] = {}
            for r in recs:
                if r.key and r.key.decode() in want and r.key.decode() not in first:
                    first[r.key.decode()] = Recommendation.model_validate_json(r.value)
            assert set(first) == want, f"{len(first)}/{FRESH} fresh events answered:\n{worker.log_tail()}"
            delays = sorted(rec.produced_at - sent_at for rec in first.values())
            assert all(rec.path.value == "fast" and rec.window_version == 1 for rec in first.values())
            assert delays[-1] < 10.0, delays
            after = worker.metrics()
            assert after["load"]["rationale_backlog"]["waiting_users"] > 0, "the student caught up: not a backlog test"

            expected = expected_windows(bootstrap, len(records) + FRESH)
            windows = {u: worker.get(f"/window/{u}/") for u in expected}
        finally:
            worker.stop()
        dlq = run(read_until(bootstrap, S.kafka.topic_dead_letter, lambda r: len(r) >= len(records) - valid, 60))
    log = (tmp_path / "worker.log").read_text(errors="replace")
    assert not [m for m in CRASH_MARKS if m in log], "the worker logged a crash:\n" + log[-4000:]
    assert after["events_applied"] == valid + FRESH and after.get("handler_errors", 0) == 0, after
    assert after.get("dead_letters", 0) == len(records) - valid
    for user, exp in expected.items():  # every window exactly as the worker's own rules recompute it
        got = WindowState.model_validate(windows[user])
        assert got == exp.model_copy(update={"epoch": got.epoch}), user
    return {"dlq": [DeadLetter.model_validate_json(r.value) for r in dlq], "delays": delays, "metrics": after}


def test_a_backlog_far_past_the_old_stall_is_applied_and_fresh_events_answered(
        tmp_path, data_dir, indexed_qdrant) -> None:
    records = ml1m_backlog(BACKLOG)
    seen = serve_backlog(tmp_path, data_dir, indexed_qdrant, records, len(records))
    m = seen["metrics"]
    # Answers come in batches: far fewer fast-path messages (and store round trips) than events.
    assert m["fast_path_batch_events"] >= BACKLOG and m["recommendations_fast"] < BACKLOG / 4, m
    assert not seen["dlq"]


def test_hostile_records_interleaved_are_dead_lettered_and_the_stream_goes_on(
        tmp_path, data_dir, indexed_qdrant) -> None:
    good = ml1m_backlog(BACKLOG)
    bad = hostile_corpus(HOSTILE)
    records = interleave(good, [(r.key, r.value) for r in bad])
    assert len(records) == BACKLOG + HOSTILE
    seen = serve_backlog(tmp_path, data_dir, indexed_qdrant, records, BACKLOG)
    letters = seen["dlq"]
    assert len(letters) == HOSTILE
    reasons: dict[str, list[str]] = defaultdict(list)  # digest of the bad value -> the reasons it may carry
    for r in bad:
        reasons[hashlib.sha256(r.value or b"").hexdigest()].append(r.reason)
    for letter in letters:
        assert letter.source_topic == S.kafka.topic_interactions and letter.error
        assert any(reason in letter.error for reason in reasons[letter.raw_sha256]), (letter.error, letter.raw_preview)
    assert sum(letter.raw_truncated for letter in letters) >= 1  # the 900 kB ones: digest and preview only
