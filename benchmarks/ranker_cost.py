"""What one served recommendation costs: the ranker's batched scoring per window, by batch size and catalogue
size, and the bytes of a user's window state (the figures docs/scale.md builds on).

1. A real ML-1M ranker (trained here for ``--minutes``, or ``--ranker DIR``) scoring B windows of 20 items with
   :meth:`models.served_ranker.ServedRanker.recommend` (user states + exact top-K over the catalogue),
   B in 1, 10, 100, 500: ms per call and per window.
2. The scoring + top-K part alone (the serving code's ``_top_k``) over synthetic catalogues of 100k and 1M items (the same width, random vectors): how the
   exact in-memory search grows, the point where an ANN index (Qdrant, ``SLIMSTREAM_RANKER_SEARCH=qdrant``)
   takes over.
3. A 20-item window state as the changelog stores it (JSON bytes) and the user's rationale point (384 floats).

    .venv/bin/python benchmarks/ranker_cost.py                 # writes benchmarks/results/ranker_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _ranker(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from models.ranker_artifact import load_ranker
    from models.served_ranker import ServedRanker

    if args.ranker is not None:
        return ServedRanker(load_ranker(args.ranker), "given")
    from retrain.ranker import RankerSpec, train_ranker
    from streams.registry import ModelRegistry
    from streams.settings import Settings

    settings = Settings.from_env(data={"data_dir": args.data_dir})
    registry = ModelRegistry.rankers_for_settings(settings)
    if registry.current() is None:
        train_ranker(settings, "ml-1m", RankerSpec(minutes=args.minutes), promote=True, progress=print)
    return ServedRanker(load_ranker(registry.version_dir(registry.current())), registry.current())


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranker", type=Path, default=None, help="a ranker version directory (default: train one)")
    p.add_argument("--minutes", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", type=Path, default=ROOT / ".slimstream" / "ranker-cost")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ranker_cost.json")
    args = p.parse_args(argv)
    from models.served_ranker import _top_k

    torch.set_num_threads(args.threads)
    ranker = _ranker(args)
    rng = np.random.default_rng(0)
    ids = ranker.item_ids[1:]
    out: dict = {"command": "python benchmarks/ranker_cost.py " + " ".join(argv or sys.argv[1:]),
                 "threads": args.threads, "catalogue": len(ids), "dim": int(ranker.item_matrix().shape[1]),
                 "window": 20, "batches": []}
    for b in (1, 10, 100, 500):
        windows = [list(rng.choice(ids, 20, replace=False)) for _ in range(b)]
        s = _time(lambda: ranker.recommend(windows, 10), 20 if b < 500 else 5)
        out["batches"].append({"batch": b, "ms_per_call": round(s * 1000, 2), "ms_per_window": round(s * 1000 / b, 3)})
        print(f"batch {b:>4}: {s * 1000:8.2f} ms per call, {s * 1000 / b:7.3f} ms per window")
    d = out["dim"]
    states = rng.normal(size=(100, d)).astype(np.float32)
    out["top_k_only"] = []
    for n in (3_706, 100_000, 1_000_000):
        table = rng.normal(size=(n, d)).astype(np.float32)
        s = _time(lambda: _top_k(states @ table.T, 10), 3)
        out["top_k_only"].append({"items": n, "ms_per_100_windows": round(s * 1000, 1),
                                  "table_mb": round(table.nbytes / 2**20, 1)})
        print(f"top-10 of {n:>9} items for 100 windows: {s * 1000:8.1f} ms (table {table.nbytes / 2**20:.0f} MiB)")
    from streams.events import InteractionEvent
    from streams.window import apply_event

    state = None
    for k, item in enumerate(ids[:20]):
        ev = InteractionEvent(user_id="user-123456", item_id=item, event_type="rating", value=4.0,
                              timestamp=978300000.0 + k, event_id=f"user-123456|{k}")
        state = apply_event(state, ev, 0, k, 20, 32)
    assert state is not None
    out["window_state_json_bytes"] = len(state.model_dump_json().encode())
    out["rationale_point_bytes"] = 384 * 4
    print(f"window state (20 items) {out['window_state_json_bytes']} bytes of JSON; rationale vector 1536 bytes")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
