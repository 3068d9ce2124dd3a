"""Student backends side by side in one run: transformers (de-quantized float32) vs llama.cpp on the packaged
Q4_1 GGUF vs llama.cpp on the Q8_0 export the distilled student goes through.

Same SLIM prompts (ML-1M windows), greedy, the same token budget and thread count for every backend; the
figure is rationales/s and the ratio to transformers. Writes ``benchmarks/results/bench_backends.json``.

Run: ``.venv/bin/python benchmarks/bench_backends.py [--prompts 6] [--tokens 96] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from models.prompts import PromptItem, build_slim_messages
from streams.datasets import load_items
from streams.settings import Settings

OUT = Path(__file__).parent / "results" / "bench_backends.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="slimstream-bench-"))
    base = dict(data_dir=data, student_max_new_tokens=args.tokens, student_threads=args.threads,
                student_batch_size=4)
    items = load_items("ml-1m")
    prompts = [build_slim_messages([PromptItem(title=i.title, year=i.year, genres=i.genres)
                                    for i in items[k * 20:(k + 1) * 20]], 20) for k in range(args.prompts)]
    from models.llamacpp import LlamaCppStudent
    from models.student import TransformersStudent

    backends = {
        "transformers_f32": lambda: TransformersStudent(Settings(**base)),
        "llamacpp_q4_1": lambda: LlamaCppStudent(Settings(**base, student_backend="llamacpp")),
        "llamacpp_q8_0_export": lambda: LlamaCppStudent(Settings(**base, student_backend="llamacpp"),
                                                        requantize=True),
    }
    results: dict[str, object] = {"machine": platform.processor() or platform.machine(), "at": time.time(),
                                  "prompts": len(prompts), "max_new_tokens": args.tokens, "threads": args.threads}
    for name, make in backends.items():
        student = make()
        student.generate(prompts[:1])  # warm-up (and, for the export, its one-time cost is not timed)
        t = time.perf_counter()
        out = student.generate(prompts)
        s = time.perf_counter() - t
        results[name] = {"seconds": s, "rationales_per_s": len(prompts) / s,
                         "mean_chars": sum(len(o) for o in out) / len(out)}
        del student
    ref = results["transformers_f32"]["seconds"]  # type: ignore[index]
    for name in backends:
        results[name]["speedup_vs_transformers"] = ref / results[name]["seconds"]  # type: ignore[index]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
