"""The scale curve on this CPU: IVF-PQ shards of 1M, 5M and 10M vectors behind the real router
(prints a table; not a test).

    .venv/bin/python benchmarks/scale.py [--sizes 1000000,5000000,10000000] [--shards 1,2,4]
        [--dim 384] [--nlist 1024] [--nprobe 32] [--pq-m 64] [--queries 128] [--raw-vectors]

Per size, the catalog is generated in seeded chunks and never held whole: one IVF-PQ is trained
on a sample, every chunk is added to the sub-index of its partition (id % P, P = the vector
partitions) while the exact top-10 of the sample queries is tracked, so 10M vectors need about
1 GB here instead of 15. For each shard count S the partitions a shard owns (p % S == s) are
merged into its sealed segment and written as its snapshot; real shard processes restore from
those snapshots (the log is empty) behind the real router. Then, per S:

- build: training + adding for the size (shared by every S), and merging + snapshotting per S;
- bytes per vector: the IVF-PQ structure, and the shard processes' resident memory (the
  per-product Python maps included, which dominate at this code size);
- recall@10 of the merged per-shard answers against exact search, queries near catalog items;
- single queries: p50/p99 straight to shard 0 (pre-encoded vector) and through the router
  (warm query cache, so the text tower is not in the figure), and their ratio;
- throughput at batch 64: batches fanned out to every shard and merged, queries/s.

With `--raw-vectors` every shard also keeps its vectors in fp16 (2 bytes per dimension) and
re-ranks `VITRINE_PQ_REFINE_FACTOR` x k PQ candidates exactly, the shards' default; the codes
alone (the default here) are what lets 10M vectors fit in this machine's memory.

The dimension defaults to 384, the dimension the router's text tower produces, so the router
can be queried; with `--dim 512` the router rows are skipped. Every row carries product fields
the size of a fashion product's (`synthetic_fields`), so the memory figures include them and
the router's answers are complete hits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import faiss
import numpy as np
from router_load import MSGPACK, percentile, sequential_direct
from synthetic import near
from tqdm import tqdm

from proto.search import SearchRequest, SearchResponse
from proto.vectors import ProductFields
from services.router.merge import merge_topk
from services.shard.attributes import NUMBERS
from services.shard.packed import PackedBytes
from services.shard.segments import IndexSpec, SealedSegment, index_bytes, trained_faiss_index
from services.shard.snapshot import Snapshot, write_snapshot
from services.shard.store import StoreState
from vitrine.cli.stack import LocalStack, StackSettings
from vitrine.settings import CommonSettings

CHUNK = 100_000
MODEL_DIM = 384


class Catalog:
    """A seeded clustered catalog, regenerated chunk by chunk on demand."""

    def __init__(self, size: int, dim: int, seed: int) -> None:
        self.size, self.dim, self.seed = size, dim, seed
        rng = np.random.default_rng([seed, 0])
        self.centres = rng.standard_normal((max(16, size // 1000), dim)).astype(np.float32)

    def chunk(self, start: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, start])
        n = min(CHUNK, self.size - start)
        x = self.centres[rng.integers(0, len(self.centres), n)]
        x += 0.35 * rng.standard_normal(x.shape, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_partitions(
    catalog: Catalog, partitions: int, spec: IndexSpec, queries: np.ndarray
) -> tuple[list[bytes], np.ndarray, float]:
    """Serialised per-partition IVF-PQ indexes, the exact top-10 ids, and the seconds it took."""
    started = time.perf_counter()
    trained, _ = trained_faiss_index(spec, catalog.chunk(0))  # the shards' own recipe
    parts = [faiss.clone_index(trained) for _ in range(partitions)]
    best_scores = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    best_ids = np.full((len(queries), 10), -1, dtype=np.int64)
    for start in tqdm(range(0, catalog.size, CHUNK), desc=f"build {catalog.size:,}", leave=False):
        x = catalog.chunk(start)
        ids = np.arange(start, start + len(x))
        for p in range(partitions):
            rows = (ids % partitions) == p
            parts[p].add(x[rows])
        scores = queries @ x.T
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], 1)
        merged_ids = np.concatenate([best_ids, top + start], 1)
        keep = np.argsort(-merged_scores, axis=1)[:, :10]
        best_scores = np.take_along_axis(merged_scores, keep, 1)
        best_ids = np.take_along_axis(merged_ids, keep, 1)
    blobs = [faiss.serialize_index(part).tobytes() for part in parts]
    return blobs, best_ids, time.perf_counter() - started


def shard_vectors(catalog: Catalog, order: np.ndarray) -> np.ndarray:
    """fp16 vectors of the products `order` lists (catalog ids), in that order."""
    row_of = np.full(catalog.size, -1, dtype=np.int64)
    row_of[order] = np.arange(len(order))
    out = np.empty((len(order), catalog.dim), dtype=np.float16)
    for start in range(0, catalog.size, CHUNK):
        x = catalog.chunk(start)
        rows = row_of[start : start + len(x)]
        out[rows[rows >= 0]] = x[rows >= 0]
    return out


def synthetic_fields(product: int) -> bytes:
    """Packed fields as long as a fashion catalog's (a 30-40 character title, an image URL, the
    CSV's nine attributes): what each row of a shard carries."""
    colours = ("Navy Blue", "Black", "White", "Red", "Grey", "Green", "Beige", "Maroon")
    return ProductFields(
        title=f"Roadster Men {colours[product % 8]} Slim Fit Shirt {product}",
        image_uri=f"https://images.example.com/catalog/{product}.jpg",
        attributes={
            "gender": "Men", "master_category": "Apparel", "sub_category": "Topwear",
            "article_type": "Shirts", "colour": colours[product % 8], "season": "Summer",
            "year": "2012", "usage": "Casual", "brand": "Roadster",
        },
    ).pack()


def write_shard_snapshots(
    catalog: Catalog, blobs: list[bytes], num_shards: int, spec: IndexSpec, state_dir: Path,
    settings: CommonSettings,
) -> tuple[float, int]:
    """Each shard's sealed segment = its partitions merged, written as its snapshot.
    Returns (seconds, bytes of the IVF-PQ structures)."""
    started = time.perf_counter()
    partitions, size = len(blobs), catalog.size
    structure = 0
    for shard in range(num_shards):
        owned = [p for p in range(partitions) if p % num_shards == shard]
        index = faiss.deserialize_index(np.frombuffer(blobs[owned[0]], dtype=np.uint8))
        for p in owned[1:]:
            other = faiss.deserialize_index(np.frombuffer(blobs[p], dtype=np.uint8))
            index.merge_from(other, index.ntotal)
        order = np.concatenate([np.arange(p, size, partitions) for p in owned])
        ids = [f"p{g}" for g in order]
        assert len(ids) == index.ntotal
        structure += index_bytes(index)
        width = len(settings.filter_fields) + len(NUMBERS)  # codes, then price and stock
        sealed = SealedSegment(
            index=index, ids=PackedBytes.of(pid.encode() for pid in ids),
            seqs=np.zeros(len(ids), dtype=np.int64), versions=np.ones(len(ids), dtype=np.int64),
            vectors=shard_vectors(catalog, order) if spec.raw_vectors else None,
            codes=np.zeros((len(ids), width), dtype=np.float32),
            fields=PackedBytes.of(synthetic_fields(int(g)) for g in order),
            spec=spec, trained_on=len(ids), kind="ivf_pq",
        )
        state = StoreState(
            dim=index.d, versions={},  # every product's version is in its sealed row
            vocab={field: [] for field in settings.filter_fields},
            growing_ids=[], growing_vectors=np.zeros((0, index.d), dtype=np.float32),
            growing_codes=np.zeros((0, width), dtype=np.float32),
            growing_fields=[], sealed=sealed, sealed_dead=np.zeros(len(ids), dtype=bool),
        )
        cut = Snapshot(state, {}, settings.vectors_topic, num_shards, shard)
        write_snapshot(state_dir / "snapshots" / f"shard-{shard}", cut)
    return time.perf_counter() - started, structure


async def fan_out_batch(
    session: aiohttp.ClientSession, urls: list[str], queries: np.ndarray
) -> list[SearchResponse]:
    wire = SearchRequest.build(queries, 10, 60_000).to_wire()

    async def one(url: str) -> SearchResponse:
        async with session.post(f"{url}/search", data=wire, headers=MSGPACK) as resp:
            return SearchResponse.from_wire(await resp.read())

    return await asyncio.gather(*(one(url) for url in urls))


async def router_sequential(
    session: aiohttp.ClientSession, router: str, texts: list[str]
) -> tuple[list[float], int]:
    times, bad = [], 0
    for text in texts:
        started = time.perf_counter()
        async with session.get(f"{router}/search", params={"q": text, "k": "10"}) as resp:
            body = await resp.json()
        times.append((time.perf_counter() - started) * 1000)
        bad += resp.status != 200 or body["partial"]
    return times, bad


def resident_bytes(stack: LocalStack) -> int:
    total = 0
    for name in stack.fleet.names:
        pid = stack.children[name[0]].process.pid  # type: ignore[union-attr]
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return total


async def measure(
    stack: LocalStack, queries: np.ndarray, truth: np.ndarray, size: int, router_rows: bool
) -> dict[str, str]:
    urls = [group[0] for group in stack.replica_urls]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        responses = await fan_out_batch(session, urls, queries)
        hits = sum(
            len({hit.product_id for hit in merge_topk(responses, 10, query=q)}
                & {f"p{g}" for g in truth[q]})
            for q in range(len(queries))
        )
        direct, bad = await sequential_direct(session, urls[0], queries, 60_000)
        batches = [queries[i : i + 64] for i in range(0, len(queries) - 63, 64)] * 3
        started = time.perf_counter()
        for batch in batches:
            merge_topk(await fan_out_batch(session, urls, batch), 10)
        qps = 64 * len(batches) / (time.perf_counter() - started)
        row = {
            "recall@10": f"{hits / (10 * len(queries)):.3f}",
            "direct 1q p50/p99 ms": f"{percentile(direct, 50):.2f} / {percentile(direct, 99):.2f}",
            "batch 64 q/s": f"{qps:,.0f}",
        }
        if router_rows:
            texts = [f"scale warm query {i % 10}" for i in range(len(queries))]
            await router_sequential(session, stack.router_url, texts[:10])  # fill the cache
            routed, bad_routed = await router_sequential(session, stack.router_url, texts)
            bad += bad_routed
            row["router 1q p50/p99 ms"] = (
                f"{percentile(routed, 50):.2f} / {percentile(routed, 99):.2f}"
            )
            row["router/direct p50"] = f"{percentile(routed, 50) / percentile(direct, 50):.2f}x"
        row["bad"] = str(bad)
    return row


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(r.get(c, "").ljust(widths[c]) for c in columns), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000,10000000")
    parser.add_argument("--shards", default="1,2,4")
    parser.add_argument("--dim", type=int, default=MODEL_DIM)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--pq-m", type=int, default=64)
    parser.add_argument("--queries", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-vectors", action="store_true",
                        help="shards keep fp16 raw vectors and re-rank PQ candidates exactly")
    args = parser.parse_args()
    settings = CommonSettings()
    spec = IndexSpec(kind="ivf_pq", nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m,
                     raw_vectors=args.raw_vectors)
    kept = (f"fp16 raw vectors kept, re-rank {spec.refine_factor} x k" if args.raw_vectors
            else "no raw vectors kept")
    print(f"# {os.cpu_count()} cores; dim {args.dim}; IVF{args.nlist},PQ{args.pq_m}x8, nprobe "
          f"{args.nprobe}, {kept}; {args.queries} queries near catalog items; "
          f"P = {settings.vector_partitions}", flush=True)
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        catalog = Catalog(size, args.dim, args.seed)
        queries = near(np.random.default_rng(args.seed), catalog.chunk(0), args.queries)
        blobs, truth, build_s = build_partitions(catalog, settings.vector_partitions, spec,
                                                 queries)
        for num_shards in (int(s) for s in args.shards.split(",")):
            with tempfile.TemporaryDirectory(prefix="vitrine-scale-") as tmp:
                state = Path(tmp)
                assemble_s, structure = write_shard_snapshots(
                    catalog, blobs, num_shards, spec, state, settings)
                stack = LocalStack(StackSettings(
                    num_shards=num_shards, router_port=0, state_dir=state, kafka_bootstrap=None,
                    redis_url=None, start_timeout_s=1800, deadline_ms=2000,
                    service_env={"VITRINE_INDEX_TYPE": "ivf_pq",
                                 "VITRINE_KEEP_RAW_VECTORS": str(args.raw_vectors).lower(),
                                 "VITRINE_IVF_NPROBE": str(args.nprobe),
                                 "VITRINE_PQ_M": str(args.pq_m)},
                ))
                started = time.perf_counter()
                stack.start()
                try:
                    load_s = time.perf_counter() - started
                    row = {
                        "vectors": f"{size:,}", "shards": str(num_shards),
                        "train+add s": f"{build_s:.0f}", "merge+snapshot s": f"{assemble_s:.0f}",
                        "stack start (restore) s": f"{load_s:.0f}",
                        "B/vec IVF-PQ": f"{structure / size:.0f}",
                        "B/vec shard RSS": f"{resident_bytes(stack) / size:.0f}",
                    }
                    row.update(asyncio.run(measure(stack, queries, truth, size,
                                                   args.dim == MODEL_DIM)))
                    rows.append(row)
                finally:
                    stack.stop()
                    shutil.rmtree(state / "snapshots", ignore_errors=True)
            print_table(rows)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"\npeak RSS of this process {peak_gb:.1f} GB; command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
