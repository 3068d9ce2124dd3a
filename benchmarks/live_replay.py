"""Live replay: the served SLIM ranker judged online, next to the text ranker and popularity, on real components.

A temporal split of ML-1M: the ranker is trained (``retrain.ranker.fit``, the worker's window length) on every
interaction before time T (the ``--quantile`` of all timestamps) and promoted in a fresh ranker registry. Then,
for each serving mode (``ranker``: the registry's ranker; ``text``: ``SLIMSTREAM_RANKER=text``, the text
ranker) and each ``--rates`` (0: full speed), a fresh Tansu broker and Qdrant copy, one ``slimstream worker``:

1. warm-up: each sampled user's last ``--warmup`` interactions before T are published and applied (not judged);
2. replay: their first ``--judged`` interactions after T, in time order, at the rate;
3. online judgement: each replayed event is judged against the newest recommendation the worker had sent to
   that user *before the event was published* (HR@10, NDCG@10; no recommendation yet: a miss), and, to tell
   serving lag from model quality, against the recommendation for the window right before it whenever it came
   ("per window", over the events whose previous window had its own answer: under a backlog one answer covers
   several events of a user, ``per_window_coverage`` says how many had one). Popularity (pre-T counts, the window's items excluded) is judged on the same events.
4. events/s over the replay, freshness (publish -> first recommendation reflecting the event, p50/p99 for the
   fast path and the slow path), student calls per 1,000 events, the rationale backlog's maximum, the share of
   recommendations whose rationale was written for the user's current or previous window.

    .venv/bin/python benchmarks/live_replay.py                       # 200 users, full speed and 200/s
    .venv/bin/python benchmarks/live_replay.py --users 50 --judged 10 --rates 0 --ranker-minutes 1   # smoke

Prints a table and writes ``benchmarks/results/live_replay.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.backlog import add_worker_args, http_json, index_template, say, worker_env  # noqa: E402
from streams.broker import EmbeddedBroker, free_port, stop_process  # noqa: E402
from streams.settings import Settings  # noqa: E402

S = Settings.from_env()
K = 10


@dataclass
class World:
    """The temporal split and the replay built from it."""

    cut: float
    train: list[Any]  # every interaction before the cut
    warmup: dict[str, list[Any]]  # user -> last pre-cut interactions (time order)
    judged: dict[str, list[Any]]  # user -> first post-cut interactions (time order)
    popular: list[str] = field(default_factory=list)  # pre-cut popularity order

    def replay_order(self) -> list[Any]:
        return sorted((i for evs in self.judged.values() for i in evs), key=lambda i: (i.timestamp, i.user_id))


def build_world(args: argparse.Namespace) -> World:
    from streams.datasets import load_interactions

    rows = sorted(load_interactions("ml-1m"), key=lambda i: (i.timestamp, i.user_id, i.item_id))
    cut = float(np.quantile([i.timestamp for i in rows], args.quantile))
    before, after = defaultdict(list), defaultdict(list)
    for i in rows:
        (before if i.timestamp < cut else after)[i.user_id].append(i)
    eligible = sorted(u for u in after if len(after[u]) >= 5 and len(before[u]) >= 5)
    rng = np.random.default_rng(args.seed)
    users = sorted(rng.choice(eligible, size=min(args.users, len(eligible)), replace=False).tolist())
    counts = Counter(i.item_id for i in rows if i.timestamp < cut)
    return World(cut=cut, train=[i for i in rows if i.timestamp < cut],
                 warmup={u: before[u][-args.warmup:] for u in users},
                 judged={u: after[u][:args.judged] for u in users},
                 popular=[item for item, _ in counts.most_common()])


def train_served_ranker(world: World, args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    """Fit on the pre-cut interactions, judge through the serving code, promote: the registry the worker reads."""
    registry = _rankers(data_dir)
    if registry.current() is not None:  # a resumed run: the same cut and seed trained it
        say(f"ranker {registry.current()} already trained in {registry.root}")
        return registry.get(registry.current())
    result = _train(world, data_dir, minutes=args.ranker_minutes, seed=args.seed, checkpoints="checkpoints",
                    promote=True)
    if not result.promoted:
        raise SystemExit(f"the ranker did not pass its gate: {result.reason}")
    return result.manifest


def train_swap_version(world: World, args: argparse.Namespace, data_dir: Path) -> None:
    """The version the swap mode promotes mid-replay: the same data, another seed, a shorter budget;
    registered (not promoted) as ``--swap-to``."""
    if not _rankers(data_dir).exists(args.swap_to):
        _train(world, data_dir, minutes=args.swap_minutes, seed=args.seed + 1, checkpoints="checkpoints-swap",
               promote=False, version=args.swap_to, extra={"purpose": "swap"})


def _rankers(data_dir: Path) -> Any:
    from streams.registry import ModelRegistry

    return ModelRegistry.rankers_for_settings(S.updated(data={"data_dir": data_dir}))


def _train(world: World, data_dir: Path, *, minutes: float, seed: int, checkpoints: str, promote: bool,
           version: str | None = None, extra: dict[str, Any] | None = None) -> Any:
    """A ranker fitted on the pre-cut interactions (``fit``), judged and registered (``publish_ranker``)."""
    from retrain.ranker import RankerSpec, fit, publish_ranker
    from streams.splits import leave_one_out

    settings = S.updated(data={"data_dir": data_dir})
    split = leave_one_out(world.train)
    spec = RankerSpec(minutes=minutes, seed=seed, checkpoint_dir=str(data_dir / checkpoints))
    say(f"training ranker {version or '(next version)'} on {len(world.train)} pre-cut interactions "
        f"({split.n_users} users), budget {minutes:g} min, seed {seed}")
    ranker = fit(settings, "ml-1m", split, spec, progress=say)
    return publish_ranker(settings, _rankers(data_dir), ranker, split, dataset=f"ml-1m<{world.cut:.0f}",
                          extra=extra or {}, promote=promote, say=say, version=version)


def _event(i: Any) -> tuple[bytes, bytes]:
    from streams.replay import interaction_to_event

    ev = interaction_to_event(i.user_id, i.item_id, i.rating, i.timestamp)
    return ev.user_id.encode(), ev.model_dump_json(exclude_none=True).encode()


async def _publish_timed(bootstrap: str, events: list[Any], rate: float,
                         midway: Callable[[], Awaitable[None]] | None = None) -> list[float]:
    """Publish ``events`` in order (``rate`` 0: full speed); the wall time each was handed to the broker.
    ``midway``: awaited once half of them are out (the hot swap), the rate's clock carrying on."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=0 if rate else 5)
    await producer.start()
    sent: list[float] = []
    try:
        t0 = time.monotonic()
        futures = []
        for n, i in enumerate(events):
            if midway is not None and n == len(events) // 2:
                await midway()
            if rate:
                delay = t0 + n / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            key, value = _event(i)
            futures.append(await producer.send(S.kafka.topic_interactions, value, key=key))
            sent.append(time.time())
            if len(futures) >= 500:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent


def _worker(bootstrap: str, data_dir: Path, qdrant: Path, registry: Path, mode: str, port: int,
            log_path: Path, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = worker_env(bootstrap, data_dir, qdrant, port, args)
    env.update({"SLIMSTREAM_REGISTRY_DIR": str(registry), "SLIMSTREAM_RANKER": "text" if mode == "text" else "registry"})
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", "cli", "worker"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait(url: str, predicate, timeout: float, proc: subprocess.Popen[bytes]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"worker exited with {proc.returncode}")
        got = http_json(url)
        if got is not None and predicate(got):
            return got
        time.sleep(0.25)
    raise SystemExit(f"timed out waiting on {url}")


def replay(world: World, mode: str, rate: float, args: argparse.Namespace, data_dir: Path, template: Path,
           work: Path) -> dict[str, Any]:
    """One serving mode at one rate on a fresh broker and Qdrant: the recommendations and the worker's figures."""
    from streams.events import Recommendation
    from streams.topics import ensure_topics
    from tests.kafka_io import read_until

    tag = f"{mode}-{int(rate)}"
    qdrant = work / f"qdrant-{tag}"
    shutil.copytree(template, qdrant)
    registry = data_dir / "registry"
    swap: dict[str, Any] = {}
    if mode == "swap":  # a registry of its own: the shared one keeps serving the first version
        registry = work / f"registry-{tag}"
        shutil.copytree(data_dir / "registry", registry, symlinks=True)
    warm = [i for evs in world.warmup.values() for i in evs]
    events = world.replay_order()
    with EmbeddedBroker(log_path=work / f"tansu-{tag}.log") as broker:
        asyncio.run(ensure_topics(S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers})))
        port = free_port()
        (data_dir / "logs").mkdir(exist_ok=True)
        proc = _worker(broker.bootstrap_servers, data_dir, qdrant, registry, mode, port,
                       data_dir / "logs" / f"worker-{tag}.log", args)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait(f"{base}/healthz/", lambda h: h["models_ready"] and h["assigned_partitions"] > 0, 300, proc)
            asyncio.run(_publish_timed(broker.bootstrap_servers, sorted(warm, key=lambda i: i.timestamp), 0))
            _wait(f"{base}/metrics/", lambda m: m.get("events_applied", 0) >= len(warm), 300, proc)
            before = http_json(f"{base}/metrics/") or {}
            say(f"[{tag}] warm-up applied ({len(warm)} events); replaying {len(events)} at "
                f"{'full speed' if not rate else f'{rate:g}/s'}")
            midway = None
            if mode == "swap":
                async def midway() -> None:  # promote the second version and announce it, as `rankers promote` does
                    from streams.model_updates import model_update_for, publish_model_update
                    from streams.registry import ModelRegistry

                    settings = S.updated(kafka={"bootstrap_servers": broker.bootstrap_servers},
                                         data={"registry_dir": registry})
                    reg = ModelRegistry.rankers_for_settings(settings)
                    swap["from"], swap["to"] = reg.current(), args.swap_to
                    await asyncio.to_thread(reg.promote, args.swap_to, reason="live replay hot swap")
                    await publish_model_update(settings, model_update_for(reg, settings, "promote", "live replay"))
                    swap["announced_at"] = time.time()
                    say(f"[{tag}] promoted {swap['from']} -> {swap['to']} with half the replay out")
            t0 = time.time()
            sent = asyncio.run(_publish_timed(broker.bootstrap_servers, events, rate, midway))
            total = len(warm) + len(events)
            final = _wait(f"{base}/metrics/", lambda m: m.get("events_applied", 0) >= total, 600, proc)
            drained = time.time()
            time.sleep(args.settle)  # the last fast-path batch and a few rationales
            after = http_json(f"{base}/metrics/") or final
            records = asyncio.run(read_until(broker.bootstrap_servers, S.kafka.topic_recommendations,
                                             lambda rs: len(rs) >= after.get("recommendations_fast", 0)
                                             + after.get("recommendations_slow", 0), 60))
        finally:
            stop_process(proc, 30.0)
    recs = [Recommendation.model_validate_json(r.value) for r in records]
    return {"mode": mode, "rate": rate, "events": len(events), "warmup_events": len(warm), "sent": sent,
            "t0": t0, "drained": drained, "recs": recs, "before": before, "after": after, "swap": swap}


def swap_figures(world: World, run: dict[str, Any]) -> dict[str, Any]:
    """What a hot swap mid-replay did: every event still answered, and how the versions switched."""
    swap, recs = run["swap"], sorted(run["recs"], key=lambda r: r.produced_at)
    old, new = f"ranker+{swap['from']}", f"ranker+{swap['to']}"
    final = {u: len(world.warmup[u]) + len(world.judged[u]) for u in world.judged}
    newest: dict[str, int] = {}
    for r in recs:
        newest[r.user_id] = max(newest.get(r.user_id, 0), r.window_version)
    first_new = next((r.produced_at for r in recs if r.ranker_version.endswith(new)), None)
    old_after = sum(1 for r in recs if first_new is not None and r.produced_at > first_new
                    and r.ranker_version.endswith(old))
    after = run["after"]
    total = run["events"] + run["warmup_events"]
    return {
        "from": old, "to": new,
        "events_answered": after.get("fast_path_batch_events", 0), "events_total": total,
        "users_whose_last_window_was_answered": sum(1 for u, v in final.items() if newest.get(u) == v),
        "users": len(final),
        "recommendations_old": sum(1 for r in recs if r.ranker_version.endswith(old)),
        "recommendations_new": sum(1 for r in recs if r.ranker_version.endswith(new)),
        # served is read once per fast-path batch: after the first answer from the new version, none from the old
        "old_version_recommendations_after_first_new": old_after,
        "announce_to_first_new_ms": None if first_new is None else round((first_new - swap["announced_at"]) * 1000, 1),
        "worker_swaps": after.get("ranker_swaps", 0), "last_ranker_swap": after.get("last_ranker_swap"),
    }


def judge(world: World, run: dict[str, Any]) -> dict[str, Any]:
    """Online HR@10 / NDCG@10 of the run's recommendations (as served and per window) and of popularity."""
    events = world.replay_order()
    version: dict[str, int] = {u: len(w) for u, w in world.warmup.items()}
    windows: dict[str, list[str]] = {u: [i.item_id for i in w] for u, w in world.warmup.items()}
    by_user: dict[str, list[Any]] = defaultdict(list)
    for r in run["recs"]:
        by_user[r.user_id].append(r)
    served, per_window, pop, fresh_fast, fresh_slow, labels = [], [], [], [], [], Counter()
    # Popularity served the same way: for the window of the answer the user had (same lag, same misses).
    by_version: dict[str, dict[int, list[str]]] = {u: {version[u]: list(w)} for u, w in windows.items()}
    pop_served: list[tuple[float, float] | None] = []
    covered = 0  # events whose previous window got its own recommendation (batches coalesce versions)
    pop_covered: list[tuple[float, float] | None] = []  # popularity on those same events
    for i, sent_at in zip(events, run["sent"]):
        u = i.user_id
        v = version[u] + 1
        seen = set(windows[u])
        shown = [r for r in by_user[u] if r.window_version < v and r.produced_at <= sent_at]
        last = max(shown, key=lambda r: (r.window_version, r.produced_at), default=None)
        served.append(_gain([x.item_id for x in last.items] if last else [], i.item_id))
        if last is not None:
            labels[last.ranker_version] += 1
            then = set(by_version[u].get(last.window_version, by_version[u][min(by_version[u])]))
            pop_served.append(_gain([x for x in world.popular if x not in then][:K], i.item_id))
        else:
            pop_served.append(None)
        prev = [r for r in by_user[u] if r.window_version == v - 1]
        per_window.append(_gain([x.item_id for x in prev[-1].items] if prev else [], i.item_id))
        covered += bool(prev)
        pop.append(_gain([x for x in world.popular if x not in seen][:K], i.item_id))
        if prev:
            pop_covered.append(pop[-1])
        for path, out in (("fast", fresh_fast), ("slow", fresh_slow)):
            first = [r.produced_at for r in by_user[u] if r.window_version >= v and r.path.value == path]
            if first:
                out.append(min(first) - sent_at)
        version[u] = v
        windows[u] = [x for x in windows[u] if x != i.item_id][-(S.worker.window_size - 1):] + [i.item_id]
        by_version[u][v] = list(windows[u])
    judged_pw = [g for g in per_window if g is not None]
    return {"served": _mean(served), "per_window": _mean(judged_pw), "popularity": _mean(pop),
            "popularity_as_served": _mean(pop_served),
            "per_window_coverage": round(covered / max(len(events), 1), 4),
            "popularity_per_window": _mean(pop_covered),
            "no_recommendation_yet": round(sum(1 for g in served if g is None) / max(len(served), 1), 4),
            "served_by": dict(labels),
            "freshness_fast_ms": _pct(fresh_fast), "freshness_slow_ms": _pct(fresh_slow)}


def _gain(items: list[str], target: str) -> tuple[float, float] | None:
    if not items:
        return None
    if target in items[:K]:
        rank = items.index(target)
        return 1.0, 1.0 / math.log2(rank + 2)
    return 0.0, 0.0


def _mean(gains: list[tuple[float, float] | None]) -> dict[str, float]:
    g = np.array([x if x is not None else (0.0, 0.0) for x in gains], dtype=np.float64).reshape(-1, 2)
    return {"HR@10": round(float(g[:, 0].mean()), 4), "NDCG@10": round(float(g[:, 1].mean()), 4), "n": len(gains)}


def _pct(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    a = np.asarray(values) * 1000
    return {"n": len(values), "p50": round(float(np.percentile(a, 50)), 1), "p99": round(float(np.percentile(a, 99)), 1),
            "max": round(float(a.max()), 1)}


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """Throughput, student calls, backlog and rationale currency of one run."""
    before, after = run["before"], run["after"]
    events = run["events"]
    recs = run["recs"]
    replay_recs = [r for r in recs if r.produced_at >= run["t0"]]
    calls = after.get("student_calls", 0) - before.get("student_calls", 0)
    current = sum(1 for r in replay_recs if r.rationale_window_version is not None
                  and r.window_version - r.rationale_window_version <= 1)
    backlog = (after.get("load") or {}).get("rationale_backlog") or {}
    return {
        "events_per_s": round(events / max(run["drained"] - run["t0"], 1e-9), 1),
        "student_calls": calls, "student_calls_per_1000_events": round(1000 * calls / max(events, 1), 1),
        "rationales_generated": after.get("rationales_generated", 0) - before.get("rationales_generated", 0),
        "rationale_backlog": backlog,
        "recommendations": len(replay_recs),
        "share_with_rationale_for_current_or_previous_window": round(current / max(len(replay_recs), 1), 4),
        "ranker_calls": after.get("ranker_calls", 0) - before.get("ranker_calls", 0),
        "fast_path_batches": after.get("fast_path_batches", 0) - before.get("fast_path_batches", 0),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--quantile", type=float, default=0.8, help="the cut: this quantile of all timestamps")
    p.add_argument("--warmup", type=int, default=20, help="pre-cut events per user published first (not judged)")
    p.add_argument("--judged", type=int, default=30, help="post-cut events per user replayed and judged")
    p.add_argument("--rates", default="0,200", help="comma-separated events/s (0: full speed)")
    p.add_argument("--modes", default="ranker,text,swap",
                   help="ranker: the registry's CURRENT; text: the text ranker; swap: CURRENT, and --swap-to "
                        "promoted and announced with half the replay published")
    p.add_argument("--swap-to", default="v0002", help="the ranker version the swap mode promotes (trained "
                   "beside the first with --swap-minutes and another seed when missing)")
    p.add_argument("--swap-minutes", type=float, default=3.0)
    p.add_argument("--ranker-minutes", type=float, default=10.0)
    add_worker_args(p, backend="llamacpp", max_new_tokens=64, data_dir=ROOT / ".slimstream" / "live-replay")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait after the replay was applied")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-only", action="store_true", help="train (or find) the ranker, then stop")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "live_replay.json")
    args = p.parse_args(argv)
    t_start = time.monotonic()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    world = build_world(args)
    say(f"cut at {time.strftime('%Y-%m-%d', time.gmtime(world.cut))}: {len(world.train)} training interactions; "
        f"replay {len(world.judged)} users, {len(world.replay_order())} judged events")
    manifest = train_served_ranker(world, args, args.data_dir)
    if "swap" in args.modes.split(","):
        train_swap_version(world, args, args.data_dir)
    if args.train_only:
        return
    template = index_template(args.data_dir)
    runs = []
    with tempfile.TemporaryDirectory(prefix="live-replay-") as tmp:
        for rate in [float(r) for r in args.rates.split(",")]:
            for mode in args.modes.split(","):
                run = replay(world, mode, rate, args, args.data_dir, template, Path(tmp))
                row = {"mode": mode, "rate": rate, **judge(world, run), **figures(run)}
                if mode == "swap":
                    row["swap"] = swap_figures(world, run)
                    say(f"[swap @ {rate:g}/s] {row['swap']}")
                runs.append(row)
                say(f"[{mode} @ {rate:g}/s] online HR@10 {row['served']['HR@10']:.4f} (per window "
                    f"{row['per_window']['HR@10']:.4f}, popularity {row['popularity']['HR@10']:.4f}); "
                    f"{row['events_per_s']} events/s; fast freshness p99 {row['freshness_fast_ms'].get('p99')} ms")
    out = {"command": "python benchmarks/live_replay.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "host": platform.node(), "cpus": __import__("os").cpu_count(), "args": {k: str(v) for k, v in vars(args).items()},
           "cut": world.cut, "users": len(world.judged), "judged_events": len(world.replay_order()),
           "ranker": {"version": manifest.get("version"), "name": manifest.get("name"),
                      "offline_test": manifest.get("metrics"), "training": manifest.get("training")},
           "runs": runs, "wall_s": round(time.monotonic() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'mode':<8} {'rate':>6} {'HR@10 served':>13} {'per window':>11} {'popularity':>11} {'events/s':>9} "
          f"{'fresh p99 ms':>13} {'calls/1k':>9}")
    for r in runs:
        print(f"{r['mode']:<8} {r['rate']:>6g} {r['served']['HR@10']:>13.4f} {r['per_window']['HR@10']:>11.4f} "
              f"{r['popularity']['HR@10']:>11.4f} {r['events_per_s']:>9} {str(r['freshness_fast_ms'].get('p99')):>13} "
              f"{r['student_calls_per_1000_events']:>9}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
