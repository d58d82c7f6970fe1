"""Shard index types at scale, in process (prints a table; not a test).

    .venv/bin/python benchmarks/index.py [--sizes 100000,1000000] [--dim 512]
        [--kinds flat,ivf_flat,ivf_pq,hnsw] [--fp16] [--queries 200]

For each size: N clustered unit vectors (seeded, synthetic) go through the shard's own code
path: VectorRecords decoded from wire bytes and applied to a `ShardStore` (the catch-up rate),
one seal into each sealed index type (the build time), then single queries and batches of 64
(p50/p99), recall@10 against exact search, bytes per vector (the ANN structure alone, and with
the fp16 raw vectors and row tables the shard keeps beside it), and the time to write and load
a snapshot. Queries are data points plus noise (in distribution). On a machine where FAISS
sees a GPU, the growing buffer's exact scan runs there; the table says which.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from synthetic import clustered, near  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from proto.vectors import VectorRecord
from services.shard.index import gpu_available
from services.shard.segments import IndexSpec, IndexType, index_bytes
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore

MODEL_ID = "bench-random"


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def catch_up(store: ShardStore, vectors: np.ndarray) -> float:
    """records/s: decode wire bytes and apply, as the replicator does (seals excluded)."""
    wire = [
        VectorRecord.upsert(f"p{i}", 1, MODEL_ID, v, "f16").to_wire()
        for i, v in enumerate(tqdm(vectors, desc="encode records", leave=False))
    ]
    started = time.perf_counter()
    for data in tqdm(wire, desc="apply", leave=False):
        store.apply(VectorRecord.from_wire(data))
    return len(wire) / (time.perf_counter() - started)


def measure(
    kind: IndexType, fp16: bool, base: ShardStore, queries: np.ndarray, truth: np.ndarray
) -> dict[str, str]:
    store = ShardStore(IndexSpec(kind=kind, fp16=fp16), seal_threshold=10**12)
    store.load(base.export())  # the same growing buffer, without decoding it again
    started = time.perf_counter()
    asyncio.run(store.seal())
    build_s = time.perf_counter() - started
    sealed = store.sealed
    assert sealed is not None and store.growing is not None and len(store.growing) == 0
    n = len(sealed)

    single = []
    found: list[list[str]] = []
    for q in queries:
        t = time.perf_counter()
        found.extend(store.search(q[None], 10)[1])
        single.append((time.perf_counter() - t) * 1000)
    batched = []
    for start in range(0, len(queries) - 63, 64):
        t = time.perf_counter()
        store.search(queries[start : start + 64], 10)
        batched.append((time.perf_counter() - t) * 1000)
    hits = [len({f"p{j}" for j in t} & set(f)) for f, t in zip(found, truth, strict=True)]

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_snapshot(Path(tmp), Snapshot(store.export(), {0: n}, "bench", 1, 0))
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        loaded = load_latest(Path(tmp), "bench", 1, 0, store.spec)
        assert loaded is not None
        ShardStore(store.spec).load(loaded.state)
        load_s = time.perf_counter() - t

    s50, s99 = percentiles(single)
    b50, b99 = percentiles(batched) if batched else (float("nan"), float("nan"))
    return {
        "index": f"{kind}{' fp16' if fp16 else ''}",
        "structure": index_name(sealed.index),
        "build s": f"{build_s:.1f}",
        "1q p50/p99 ms": f"{s50:.2f} / {s99:.2f}",
        "64q p50/p99 ms": f"{b50:.1f} / {b99:.1f}",
        "recall@10": f"{sum(hits) / (10 * len(hits)):.3f}",
        "B/vec index": f"{index_bytes(sealed.index) / n:.0f}",
        "B/vec shard": f"{store.nbytes() / n:.0f}",
        "snap write/load s": f"{write_s:.1f} / {load_s:.1f}",
    }


def index_name(index: object) -> str:
    if isinstance(index, faiss.Index):
        return type(faiss.downcast_index(index)).__name__
    return f"{type(index).__name__} ({index.device})"  # type: ignore[attr-defined]


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(r[c].ljust(widths[c]) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--kinds", default="flat,ivf_flat,ivf_pq,hnsw")
    parser.add_argument("--fp16", action="store_true", help="also the fp16-code variants")
    parser.add_argument("--queries", type=int, default=192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    kinds: list[IndexType] = args.kinds.split(",")
    print(f"# {os.cpu_count()} cores, {faiss.omp_get_max_threads()} FAISS threads; FAISS "
          f"{faiss.__version__}; GPU: {gpu_available()}; dim {args.dim}; {args.queries} queries")
    for size in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(args.seed)
        vectors = clustered(rng, size, args.dim, clusters=max(16, size // 1000))
        queries = near(rng, vectors, args.queries)
        truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)[1]
        base = ShardStore(seal_threshold=10**12)
        rate = catch_up(base, vectors)
        del vectors
        rows = []
        variants = [(k, False) for k in kinds] + ([(k, True) for k in kinds if k != "ivf_pq"]
                                                   if args.fp16 else [])
        for kind, fp16 in tqdm(variants, desc=f"{size:,} vectors", leave=False):
            rows.append(measure(kind, fp16, base, queries, truth))
        print(f"\n## {size:,} vectors; catch-up (decode + apply) {rate:,.0f} records/s\n")
        print_table(rows)


if __name__ == "__main__":
    main()
