"""Reliability at volume: ``kill -9`` (or SIGTERM) a worker in the middle of a replay, or one of two workers
(failover), then check that nothing was lost, against a reference computed from the interactions topic.

For each ``--modes`` entry on a fresh Tansu broker, ``--events`` of ML-1M's earliest interactions (time order,
keyed by user, each with an ``event_id``) are published at full speed and ``slimstream worker`` (trained ranker,
llama.cpp student, Qdrant local mode, ``--store``) consumes them:

- ``crash``: one worker, ``kill -9`` once it has applied half the events, a new one started on the same data;
- ``sigterm``: the same with a graceful stop;
- ``failover``: two workers in one group (4 partitions); ``kill -9`` one at half; the other takes over its
  partitions and drains the topic; then a second worker is started again (scale back to two).

Once the group has committed every offset, the checks (all users, not a sample):

- **windows**: every user's window (``/window/<user>/`` on the first worker: it proxies to the owner) equals
  the window recomputed from the topic with the worker's own rules (``tests/kafka_io.expected_windows``); lost
  events = the versions missing from the users whose window is behind;
- **newest recommendation**: every user's last message on ``recommendations`` answers their last window version;
- **rationales**: at most one point per user in Qdrant, none for a window newer than the user's;
- **redelivered** events absorbed (``duplicates`` of the surviving/restarted workers), dead letters (0 expected);
- **recovery**: the kill -> the first event applied by a restarted worker (crash, sigterm), or -> the survivor
  owning every partition (failover), and the kill -> the topic drained.

    .venv/bin/python benchmarks/reliability.py                          # 100k events, crash,sigterm,failover
    .venv/bin/python benchmarks/reliability.py --events 20000 --modes crash

Prints a table and writes ``benchmarks/results/reliability.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.backlog import add_worker_args, http_json, index_template, publish, say, worker_env  # noqa: E402
from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.settings import Settings  # noqa: E402
from tests.conftest import private_data_dir  # noqa: E402

S = Settings.from_env()


class Worker:
    def __init__(self, bootstrap: str, data_dir: Path, qdrant: Path, args: argparse.Namespace, log: Path) -> None:
        self.port = free_port()
        env = worker_env(bootstrap, data_dir, qdrant, self.port, args)
        env["SLIMSTREAM_TABLE_STORE"] = args.store
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def get(self, path: str) -> dict[str, Any] | None:
        return http_json(f"http://127.0.0.1:{self.port}{path}")

    def applied(self) -> int:
        return int((self.get("/metrics/") or {}).get("events_applied", 0))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)
        if sig == signal.SIGTERM:
            self.proc.wait(60)
        else:
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc, 60.0)


LOG_SIGNS = ("WARNING", "ERROR", "Joined group", "Revoking", "Recovery complete", "Heartbeat", "Commit")


def log_digest(log: Path, lines: int = 20) -> str:
    """The group and error lines at the end of a worker's log: a failed wait in CI says what the workers were
    doing (their logs live in a temporary directory that is gone when CI reports)."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError as err:
        return f"{log.name}: unreadable ({err})"
    keep = [ln[:300] for ln in text if any(sign in ln for sign in LOG_SIGNS) and "GGUF" not in ln][-lines:]
    return f"--- {log.name} ({len(text)} lines), last group/error lines:\n" + "\n".join(keep)


def wait(predicate, timeout: float, what: str, workers: list[Worker]) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        for w in workers:
            if not w.alive():
                raise RuntimeError(f"a worker exited with {w.proc.returncode} while waiting for {what}\n"
                                   + log_digest(w.log))
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"{what}: not within {timeout:.0f}s\n" + "\n".join(log_digest(w.log) for w in workers))


def committed(bootstrap: str) -> dict[int, int]:
    from tests.kafka_io import committed_offsets

    return asyncio.run(committed_offsets(bootstrap, S.kafka.app_id, S.kafka.topic_interactions,
                                         S.kafka.topic_partitions))


def serving(health: dict[str, Any]) -> bool:
    """A worker owns partitions and has read their changelogs (before, its windows answer 503)."""
    return (health.get("assigned_partitions", 0) > 0 and bool(health.get("recovery_completed"))
            and not health.get("in_recovery", True))


def wait_drained(bootstrap: str, end: dict[int, int], timeout: float, workers: list[Worker]) -> float:
    """Until the group has committed every partition's end offset. A drain that stops short fails with what
    each partition is missing and what each worker says it owns and has applied, not with a bare timeout."""
    last: dict[int, int] = {}

    def done() -> bool:
        last.update(committed(bootstrap))
        return all(last.get(p, -1) >= e for p, e in end.items())

    try:
        return wait(done, timeout, "the topic drained", workers)
    except RuntimeError as err:
        short = {p: {"committed": last.get(p, -1), "end": e} for p, e in end.items() if last.get(p, -1) < e}
        seen = [{"log": w.log.name, "applied": w.applied(), "health": w.get("/healthz/")} for w in workers]
        raise RuntimeError(f"partitions short: {short}; workers: {seen}; {err}") from None


def check(bootstrap: str, n_records: int, workers: list[Worker], stores: list[Path],
          args: argparse.Namespace) -> dict[str, Any]:
    """Every user's window, newest recommendation and rationale points against the topic's reference."""
    from streams.window import WindowState
    from tests.kafka_io import expected_windows, read_until

    expected = expected_windows(bootstrap, n_records)
    users = sorted(expected)
    behind, lost_events, wrong = [], 0, []
    for user in users:
        got = workers[0].get(f"/window/{user}/")  # any worker answers: it proxies to the user's owner
        if got is None or "error" in got:
            behind.append(user)
            lost_events += expected[user].version
            continue
        state = WindowState.model_validate(got)
        want = expected[user].model_copy(update={"epoch": state.epoch})
        if state != want:
            (behind if state.version < want.version else wrong).append(user)
            lost_events += max(0, want.version - state.version)
    # The pull API through the first worker (it forwards to the user's owner), asked before the topic is read:
    # the slow path may still be answering users (the rationale sweep after a rebalance), so a message that
    # reached the topic after the question is no evidence against the answer.
    pulled: dict[str, dict[str, Any] | None] = {}
    asked_ms: dict[str, int] = {}
    for u in users:
        asked_ms[u] = int(time.time() * 1000)
        pulled[u] = workers[0].get(f"/v1/recommendations/{u}")
    recs = asyncio.run(read_until(bootstrap, S.kafka.topic_recommendations, lambda rs: False, args.read_s))
    history: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # user -> (record timestamp ms, message), in order
    for r in sorted(recs, key=lambda r: (r.partition, r.offset)):
        if r.value:
            rec = json.loads(r.value)
            history.setdefault(rec["user_id"], []).append((r.timestamp, rec))
    last = {u: msgs[-1][1] for u, msgs in history.items()}
    stale_recs = [u for u in users if last.get(u, {}).get("window_version") != expected[u].version]

    def newest_when_asked(u: str, recommendation_id: str) -> bool:
        """The answer is the user's last message on the topic, but for messages sent after the question."""
        ids = [rec["recommendation_id"] for _, rec in history.get(u, [])]
        if recommendation_id not in ids:
            return False
        later = history[u][len(ids) - ids[::-1].index(recommendation_id):]
        return all(ts >= asked_ms[u] for ts, _ in later)

    pull_published = [u for u in users if (pulled[u] or {}).get("source") == "published"]
    pull_wrong = [u for u in users if pulled[u] is None
                  or pulled[u].get("current_window_version") != expected[u].version
                  or (u in pull_published and not newest_when_asked(u, pulled[u]["recommendation_id"]))]
    dead = asyncio.run(read_until(bootstrap, S.kafka.topic_dead_letter, lambda rs: False, 2))
    for w in workers:
        w.stop()
    from vectorstore.store import VectorStore

    points, twice = [], 0
    for path in stores:  # one local store per worker process (a shared server would be one collection)
        store = VectorStore(Settings.from_env(qdrant={"path": str(path), "url": None}))
        try:
            mine = store.rationale_points()
        finally:
            store.close()
        twice += sum(1 for c in Counter(p["user_id"] for p in mine).values() if c > 1)
        points += mine
    future = [p["user_id"] for p in points
              if p["user_id"] in expected and p["window_version"] > expected[p["user_id"]].version]
    return {"users": len(users), "events_reference": sum(s.version for s in expected.values()),
            "windows_exact": len(users) - len(behind) - len(wrong), "windows_behind": len(behind),
            "windows_other": len(wrong), "lost_events": lost_events,
            "newest_recommendation_current": len(users) - len(stale_recs), "stale_recommendation_users": len(stale_recs),
            "pull_api_published": len(pull_published), "pull_api_wrong": len(pull_wrong),
            "examples_pull_wrong": {u: None if pulled[u] is None else
                                    [pulled[u].get("source"), pulled[u].get("current_window_version"), expected[u].version]
                                    for u in pull_wrong[:5]},
            "rationale_points": len(points), "users_with_2plus_points": twice,
            "users_with_a_rationale": len({p["user_id"] for p in points}),
            "points_newer_than_window": len(future), "dead_letters": len(dead),
            "examples_behind": {u: [expected[u].partition, expected[u].version] for u in behind[:5]},
            "behind_by_partition": dict(Counter(expected[u].partition for u in behind)),
            "examples_stale": stale_recs[:5]}


def run_mode(mode: str, records: list[tuple[bytes, bytes]], args: argparse.Namespace, template: Path,
             work: Path) -> dict[str, Any]:
    data = private_data_dir(args.data_dir, work / f"data-{mode}")
    qdrant = work / f"qdrant-{mode}"
    shutil.copytree(template, qdrant)
    row: dict[str, Any] = {"mode": mode, "events": len(records), "store": args.store}
    started: list[Worker] = []  # every worker this mode starts: none may outlive it, whatever fails
    try:
        _run_mode(mode, records, args, template, work, data, qdrant, row, started)
    finally:
        for w in started:
            if w.alive():
                w.stop()
    say(f"{mode}: {row}")
    return row


def _run_mode(mode: str, records: list[tuple[bytes, bytes]], args: argparse.Namespace, template: Path, work: Path,
              data: Path, qdrant: Path, row: dict[str, Any], started: list[Worker]) -> None:
    from streams.topics import ensure_topics
    from tests.kafka_io import end_offsets

    n = len(records)

    def worker(*a: Any) -> Worker:
        w = Worker(*a)
        started.append(w)
        return w

    with EmbeddedBroker(log_path=work / f"tansu-{mode}.log") as broker:
        bootstrap = broker.bootstrap_servers
        asyncio.run(ensure_topics(S.updated(kafka={"bootstrap_servers": bootstrap})))
        stores = [qdrant]
        workers = [worker(bootstrap, data, qdrant, args, work / f"worker-{mode}-1.log")]
        if mode == "failover":
            # A second worker needs its own data dir for Faust's files (and RocksDB), the caches linked, and its
            # own Qdrant: local mode admits one process (with a Qdrant server both would share one collection).
            data2 = private_data_dir(args.data_dir, work / f"data-{mode}-2")
            stores.append(work / f"qdrant-{mode}-2")
            shutil.copytree(template, stores[1])
            workers.append(worker(bootstrap, data2, stores[1], args, work / f"worker-{mode}-2.log"))
        wait(lambda: all((w.get("/healthz/") or {}).get("models_ready") for w in workers), 600, "workers ready", workers)
        t0 = time.monotonic()
        asyncio.run(publish(bootstrap, S.kafka.topic_interactions, records, acks=1, linger_ms=5))
        row["publish_s"] = round(time.monotonic() - t0, 1)
        half = n // 2
        wait(lambda: sum(w.applied() for w in workers) >= half, 900, "half the events applied", workers)
        victim = workers[0]
        applied_at_kill = sum(w.applied() for w in workers)
        sig = signal.SIGTERM if mode == "sigterm" else signal.SIGKILL
        t_kill = time.monotonic()
        victim.kill(sig)
        row["applied_when_killed"] = applied_at_kill
        say(f"{mode}: {'SIGTERM' if sig == signal.SIGTERM else 'kill -9'} at {applied_at_kill} applied events")
        if mode == "failover":
            survivor = workers[1]
            every = list(range(S.kafka.topic_partitions))
            # The survivor takes the victim's partitions once the group notices (session timeout) and rebalances.
            row["kill_to_survivor_owns_all_s"] = round(wait(
                lambda: (survivor.get("/healthz/") or {}).get("partitions") == every, 900, "the survivor", [survivor]), 1)
            workers = [survivor]
        else:
            victim = worker(bootstrap, data, qdrant, args, work / f"worker-{mode}-restart.log")
            workers = [victim]
            row["kill_to_first_applied_s"] = round(wait(lambda: victim.applied() >= 1, 900, "the restarted worker",
                                                        workers) + (victim.started - t_kill), 1)
        end = asyncio.run(end_offsets(bootstrap, S.kafka.topic_interactions, S.kafka.topic_partitions))
        wait_drained(bootstrap, end, args.drain_s, workers)
        row["kill_to_drained_s"] = round(time.monotonic() - t_kill, 1)
        if mode == "failover":  # scale back to two: the newcomer gets partitions, the check reads through both
            again = worker(bootstrap, data, qdrant, args, work / f"worker-{mode}-again.log")  # the victim's store
            workers.append(again)
            wait(lambda: all(serving(w.get("/healthz/") or {}) for w in workers), 900,
                 "two workers with partitions, their tables recovered", workers)
        row["duplicates_absorbed"] = sum(int((w.get("/metrics/") or {}).get("duplicates", 0)) for w in workers)
        row.update(check(bootstrap, n, workers, stores, args))


def replay_records(n: int) -> list[tuple[bytes, bytes]]:
    """ML-1M's first ``n`` interactions in time order, keyed by user, each with an event_id."""
    from streams.replay import earliest_events

    return [(ev.user_id.encode(), ev.model_copy(update={"event_id": f"{ev.user_id}|{ev.item_id}|{ev.timestamp:g}"})
             .model_dump_json(exclude_none=True).encode()) for ev in earliest_events("ml-1m", n)]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--modes", default="crash,sigterm,failover")
    ap.add_argument("--store", default="memory", choices=["memory", "rocksdb"])
    ap.add_argument("--read-s", type=float, default=20.0, help="seconds to read the recommendations topic")
    ap.add_argument("--drain-s", type=float, default=1800.0, help="the longest wait for the drain after the kill")
    add_worker_args(ap, backend="llamacpp", max_new_tokens=64, data_dir=ROOT / ".slimstream" / "live-replay")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliability.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="slimstream-reliability-"))
    template = index_template(args.data_dir)
    records = replay_records(args.events)
    rows = [run_mode(mode, records, args, template, work) for mode in args.modes.split(",")]
    out = {"command": " ".join(["python", *sys.argv]), "host": platform.node(), "cpus": os.cpu_count(),
           "session_timeout_s": S.kafka.broker_session_timeout_s, "rows": rows,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    keys = ["events", "users", "lost_events", "windows_exact", "stale_recommendation_users", "duplicates_absorbed",
            "dead_letters", "users_with_2plus_points", "kill_to_first_applied_s", "kill_to_survivor_owns_all_s",
            "kill_to_drained_s"]
    print("\n" + " ".join(f"{k:>14.14}" for k in ["mode", *keys]))
    for r in rows:
        print(" ".join(f"{str(r.get(k, '-')):>14.14}" for k in ["mode", *keys]))
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
