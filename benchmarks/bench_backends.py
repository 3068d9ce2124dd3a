"""Student backends side by side in one run: transformers (de-quantized float32) vs llama.cpp on the packaged
Q4_1 GGUF vs llama.cpp on the Q8_0 export the distilled student goes through, and with ``--vllm`` the
``openai`` backend on vLLM's CPU build (``.venv-vllm``, scripts/install-vllm.sh), base model and a LoRA adapter
loaded at run time.

Same SLIM prompts (ML-1M windows), greedy, the same token budget and thread count for every in-process backend;
the figure is rationales/s and the ratio to transformers. vLLM runs as its own server (API process + engine;
its CPU backend pins the model to one core unless VLLM_CPU_OMP_THREADS_BIND says otherwise) and gets the batch as
4 concurrent requests, so its ratio is a system comparison, not a kernel one. Writes
``benchmarks/results/bench_backends.json``.

Run: ``.venv/bin/python benchmarks/bench_backends.py [--prompts 6] [--tokens 96] [--threads 2] [--vllm]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from models.prompts import PromptItem, build_slim_messages
from streams.datasets import load_items
from streams.settings import Settings

OUT = Path(__file__).parent / "results" / "bench_backends.json"
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def vllm_server(model_dir: Path, served: str, port: int, dtype: str, log: Path) -> Iterator[str]:
    """vLLM's OpenAI server (CPU build) with runtime LoRA loading; yields its /v1 URL."""
    from models.openai_student import local_vllm_server

    cmd, env = local_vllm_server(ROOT / ".venv-vllm/bin/python", model_dir, served, port, dtype=dtype)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM not up after 600 s; see {log}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vllm", action="store_true", help="also the openai backend on vLLM's CPU build (.venv-vllm)")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--adapter", type=Path, help="LoRA adapter for the vLLM run (default: the registry's CURRENT)")
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="slimstream-bench-"))
    base = Settings.from_env(data={"data_dir": data}, student={"max_new_tokens": args.tokens,
                                                               "threads": args.threads, "batch_size": 4})
    items = load_items("ml-1m")
    prompts = [build_slim_messages([PromptItem(title=i.title, year=i.year, genres=i.genres)
                                    for i in items[k * 20:(k + 1) * 20]], 20) for k in range(args.prompts)]
    from models.llamacpp import LlamaCppStudent
    from models.student import TransformersStudent

    backends = {
        "transformers_f32": lambda: TransformersStudent(base),
        "llamacpp_q4_1": lambda: LlamaCppStudent(base.updated(student={"backend": "llamacpp"})),
        "llamacpp_q8_0_export": lambda: LlamaCppStudent(base.updated(student={"backend": "llamacpp"}),
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
    names = list(backends)
    if args.vllm:
        names += _bench_vllm(args, base, prompts, data, results)
    ref = results["transformers_f32"]["seconds"]  # type: ignore[index]
    for name in names:
        results[name]["speedup_vs_transformers"] = ref / results[name]["seconds"]  # type: ignore[index]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _bench_vllm(args: argparse.Namespace, base: Settings, prompts: list, data: Path, results: dict) -> list[str]:
    from models.openai_student import OpenAIStudent
    from models.student import export_base_model
    from streams.registry import ModelRegistry
    from streams.broker import free_port

    settings = base
    model_dir = export_base_model(settings, data / "models" / "student")
    registry = ModelRegistry.for_settings(Settings.from_env())  # the project's registry (.slimstream/registry)
    adapter = args.adapter or (registry.adapter_dir(registry.current()) if registry.current() else None)
    names = []
    with vllm_server(model_dir, settings.student.model_version, free_port(), args.vllm_dtype,
                     data / "vllm.log") as url:
        remote = base.updated(student={"backend": "openai", "url": url, "deadline_s": 600})
        runs = {f"vllm_cpu_{args.vllm_dtype}_base": lambda: OpenAIStudent(remote)}
        if adapter is not None:
            runs[f"vllm_cpu_{args.vllm_dtype}_lora"] = lambda: OpenAIStudent(remote, adapter_dir=adapter)
            results["vllm_adapter"] = str(adapter)
        for name, make in runs.items():
            student = make()
            student.generate(prompts[:1])
            t = time.perf_counter()
            out = student.generate(prompts)
            s = time.perf_counter() - t
            results[name] = {"seconds": s, "rationales_per_s": len(prompts) / s,
                             "mean_chars": sum(len(o) for o in out) / len(out)}
            names.append(name)
    return names


if __name__ == "__main__":
    main()
