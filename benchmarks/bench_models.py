"""Speed of the stream's building blocks, measured side by side in one run (these machines are noisy).

Prints the figures and writes ``benchmarks/results/bench_models.json``:

- encoder: ONNX Runtime vs PyTorch sentences/s on the same ML-1M item texts (the ratio is the target);
- student: tokens/s of one batched call of 4 rationales vs 4 single calls (why the agent batches);
- vector store: latency of the fast path's query (search over the ML-1M catalogue, excluding a window).

Run: ``.venv/bin/python benchmarks/bench_models.py [--texts 512] [--tokens 64]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from qdrant_client import models

from models.encoder import default_model_dir, load_encoder
from models.prompts import PromptItem, build_slim_messages
from models.student import TransformersStudent
from streams.datasets import item_text, load_items
from streams.settings import Settings
from vectorstore.catalogue import index_catalogue
from vectorstore.store import VectorStore

OUT = Path(__file__).parent / "results" / "bench_models.json"


def torch_encoder(texts: list[str], batch: int) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    d = default_model_dir()
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    model = AutoModel.from_pretrained(d, local_files_only=True).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            v = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(v, dim=-1).numpy())
    return np.concatenate(out)


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="slimstream-bench-"))
    settings = Settings.from_env(data={"data_dir": data}, qdrant={"path": str(data / "qdrant")}, student={"max_new_tokens": args.tokens, "batch_size": 4})
    items = load_items("ml-1m")
    texts = [item_text(i) for i in items[: args.texts]]
    results: dict[str, object] = {"machine": platform.processor() or platform.machine(), "at": time.time()}

    # -- encoder ------------------------------------------------------------------------------------------
    encoder = load_encoder(settings)
    encoder.encode(texts[:8])  # warm-up
    onnx_vecs, onnx_s = timed(encoder.encode, texts)
    torch_encoder(texts[:8], 8)
    torch_vecs, torch_s = timed(torch_encoder, texts, settings.encoder.batch_size)
    agree = float(np.min(np.sum(onnx_vecs * torch_vecs, axis=1)))
    results["encoder"] = {"texts": len(texts), "onnx_sentences_per_s": len(texts) / onnx_s,
                          "torch_sentences_per_s": len(texts) / torch_s, "onnx_over_torch": torch_s / onnx_s,
                          "min_cosine_onnx_vs_torch": agree}

    # -- student --------------------------------------------------------------------------------------------
    student = TransformersStudent(settings)
    windows = [[PromptItem(title=i.title, year=i.year, genres=i.genres) for i in items[k * 10:(k + 1) * 10]]
               for k in range(4)]
    prompts = [build_slim_messages(w, 10) for w in windows]
    student.generate(prompts[:1])  # warm-up
    _, batched_s = timed(student.generate, prompts)
    _, single_s = timed(lambda: [student.generate([p]) for p in prompts])
    results["student"] = {"max_new_tokens": args.tokens, "batch": 4, "batched_call_s": batched_s,
                          "four_single_calls_s": single_s, "batched_speedup": single_s / batched_s,
                          "loaded_from": student.loaded_from, "load_s": student.load_seconds}

    # -- vector store ---------------------------------------------------------------------------------------
    store = VectorStore(settings)
    try:
        store.ensure_collections(encoder.dim)
        _, index_s = timed(index_catalogue, store, encoder, items)
        rng = np.random.default_rng(0)
        lat = []
        for _ in range(args.queries):
            window = [items[j].item_id for j in rng.choice(len(items), 20, replace=False)]
            q = onnx_vecs[rng.integers(len(onnx_vecs))]
            _, s = timed(store.search_items, q, window, 10)
            lat.append(s * 1000)
        # What search_items avoids in local mode: Qdrant's payload filter, evaluated in Python per point.
        flt_lat = []
        for _ in range(max(10, args.queries // 5)):
            window = [items[j].item_id for j in rng.choice(len(items), 20, replace=False)]
            flt = models.Filter(must_not=[models.FieldCondition(key="item_id", match=models.MatchAny(any=window))])
            _, s = timed(lambda: store.client.query_points(settings.qdrant.collection_items, query=q.tolist(),
                                                           query_filter=flt, limit=10))
            flt_lat.append(s * 1000)
        results["vectorstore"] = {"items": len(items), "index_s": index_s,
                                  "search_p50_ms": statistics.median(lat),
                                  "search_p95_ms": float(np.percentile(lat, 95)),
                                  "payload_filter_search_p50_ms": statistics.median(flt_lat),
                                  "client_side_exclusion_speedup": statistics.median(flt_lat) / statistics.median(lat)}
    finally:
        store.close()

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
