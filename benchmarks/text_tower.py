"""The text tower's runtimes side by side on this CPU (prints tables; not a test): single-query
latency, batch throughput, agreement with torch, and retrieval quality when the router encodes
queries with the variant while products keep torch's vectors.

    .venv/bin/python benchmarks/text_tower.py [--data ../shared/data/fashion] [--threads 2]
        [--queries 300] [--products 1500] [--read-between-mb 0,8,35,70] [--cache-only]

Runtimes: torch (as the services ran before), torch in bf16 weights, torch.compile (inductor;
skipped where it cannot compile here), onnx (ONNX Runtime, exact) and onnx-int8 (dynamic int8
weights, lossy). Queries are distinct texts like a shopper's, so no cache answers them.
NDCG@10 uses the eval's attribute queries and catalog conditions on the test split.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vitrine.model import DualEncoder, load_dual_encoder
from vitrine.settings import CommonSettings
from vitrine.training.data import in_split, load_products
from vitrine.training.eval import (
    CONDITIONS,
    build_queries,
    condition_texts,
    grades,
    retrieval_metrics,
)
from vitrine.training.features import load_images

RUNTIMES = ("torch", "onnx", "onnx-int8")
WORDS = ["red", "leather", "ankle", "boots", "navy", "blue", "casual", "shirt", "women",
         "kurta", "sports", "shoes", "denim", "jacket", "gold", "watch", "printed", "tshirt"]


def shopper_queries(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 6)))) + f" {i}" for i in range(n)]


def latency(
    encoder: DualEncoder, texts: list[str], read_between_mb: int = 0
) -> tuple[float, float]:
    """p50 / p99 ms of one query at a time; `read_between_mb` of other memory are read before
    each, as the shards' IVF scans do on the cores they share with the router."""
    encoder.encode_texts(texts[:5])
    other = np.ones(read_between_mb * 2**20 // 4, dtype=np.float32)
    times = []
    for text in texts:
        other.sum()
        started = time.perf_counter()
        encoder.encode_texts([text])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(encoder: DualEncoder, texts: list[str], batch: int = 32) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), batch):
        encoder.encode_texts(texts[start:start + batch])
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--products", type=int, default=1500)
    parser.add_argument("--read-between-mb", default="0,8,35,70",
                        help="the cache table: MB of other memory read before each query")
    parser.add_argument("--cache-only", action="store_true", help="print only the cache table")
    args = parser.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    torch.set_num_threads(args.threads)
    spec = CommonSettings().model_spec()
    encoders = {runtime: load_dual_encoder(spec, device="cpu", text_runtime=runtime,
                                           compute_threads=args.threads)
                for runtime in RUNTIMES}
    encoders["torch bf16"] = load_dual_encoder(spec, device="cpu", precision="bf16",
                                               text_runtime="torch")
    compiled = load_dual_encoder(spec, device="cpu", text_runtime="torch")
    try:
        compiled.model.text = torch.compile(compiled.model.text, dynamic=True)
        compiled.encode_texts(["compile me", "and me too, longer"])
        encoders["torch.compile"] = compiled
    except Exception as exc:  # no C++ toolchain, or an op inductor cannot lower
        print(f"torch.compile skipped: {type(exc).__name__}: {str(exc)[:120]}")
    texts = shopper_queries(args.queries)
    sizes = [int(mb) for mb in args.read_between_mb.split(",")]
    print(f"\nthe cache: single queries on {args.threads} threads with other memory read "
          "before each (p50 / p99 ms)")
    print("| runtime | " + " | ".join(f"{mb} MB" for mb in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for runtime in ("onnx", "onnx-int8"):
        cells = ["{:.2f} / {:.2f}".format(*latency(encoders[runtime], texts, mb))
                 for mb in sizes]
        print(f"| {runtime} | " + " | ".join(cells) + " |")
    if args.cache_only:
        return
    reference = encoders["torch"].encode_texts(texts)
    rows = []
    for runtime, encoder in encoders.items():
        p50, p99 = latency(encoder, texts)
        cosine = float((reference * encoder.encode_texts(texts)).sum(axis=1).min())
        rows.append((runtime, p50, p99, throughput(encoder, texts), cosine))
    base = rows[0]
    print(f"\nsingle text queries on {args.threads} threads, {len(texts)} distinct texts")
    print("| runtime | p50 ms | p99 ms | p50 vs torch | batch-32 texts/s | min cosine to torch |")
    print("|---|---|---|---|---|---|")
    for runtime, p50, p99, rate, cosine in rows:
        print(f"| {runtime} | {p50:.2f} | {p99:.2f} | {p50 / base[1]:.2f}x | {rate:,.0f} | "
              f"{cosine:.5f} |")

    products = in_split(load_products(args.data.resolve()), "test")[: args.products]
    torch_encoder = encoders["torch"]
    images = torch_encoder.encode_images(load_images([p.image for p in products]))
    queries = build_queries(products)
    graded = grades(queries, products)
    print(f"\nNDCG@10, queries encoded by the runtime, {len(products)} test products encoded by "
          f"torch ({len(queries)} attribute queries)")
    print("| runtime | " + " | ".join(f"({c})" for c in CONDITIONS) + " |")
    print("|---|" + "---|" * len(CONDITIONS))
    product_vectors = {}
    for condition in CONDITIONS:
        product_texts = condition_texts(products, condition)
        has_text = np.array([bool(t.strip()) for t in product_texts])
        text_vectors = np.zeros_like(images)
        text_vectors[has_text] = torch_encoder.encode_texts([t for t in product_texts if t.strip()])
        product_vectors[condition] = torch_encoder.fuse(images, text_vectors, has_text)
    for runtime, encoder in encoders.items():
        query_vectors = encoder.encode_texts([q.text for q in queries])
        cells = []
        for condition in CONDITIONS:
            scores = query_vectors @ product_vectors[condition].T
            cells.append(f"{100 * retrieval_metrics(scores, graded)['ndcg@10'].mean():.2f}")
        print(f"| {runtime} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
