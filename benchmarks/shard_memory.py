"""Memory a shard spends per product beside its vectors, at 1M products (prints a table).

    .venv/bin/python benchmarks/shard_memory.py [--products 1000000] [--no-fields]

Builds a real ShardStore through its own path (VectorRecords applied, then sealed into a flat
segment, then restored from its snapshot, as a restarted shard is) with tiny vectors (dim 8),
so what the process holds is the per-product bookkeeping: ids, versions, change numbers,
dead rows, the id lookup, attribute codes and, unless --no-fields, each product's fields
(a fashion catalog's title, image URI and nine attributes), and the BM25 index over them (in a
directory, as a shard with snapshots keeps it: the snapshot carries it and the restore opens
it). Resident memory is measured from /proc (fragmentation included) after a garbage
collection, before and after each step.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import shlex
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from tqdm import tqdm

from proto.vectors import VectorRecord
from services.shard.segments import IndexSpec
from services.shard.snapshot import Snapshot, load_latest, write_snapshot
from services.shard.store import ShardStore

FILTER_FIELDS = ["gender", "master_category", "sub_category", "article_type", "colour",
                 "usage", "season"]
COLOURS = ("Navy Blue", "Black", "White", "Red", "Grey", "Green", "Beige", "Maroon")


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def record(i: int, vector: np.ndarray, with_fields: bool) -> VectorRecord:
    colour = COLOURS[i % len(COLOURS)]
    attributes = {
        "gender": "Men", "master_category": "Apparel", "sub_category": "Topwear",
        "article_type": "Shirts", "colour": colour, "season": "Summer", "year": "2012",
        "usage": "Casual", "brand": "Roadster",
    }
    if not with_fields:
        return VectorRecord.upsert(str(10_000 + i), 1_733_100_000_000 + i, "m", vector,
                                   attributes=attributes)
    return VectorRecord.upsert(
        str(10_000 + i), 1_733_100_000_000 + i, "m", vector, attributes=attributes,
        title=f"Roadster Men {colour} Slim Fit Casual Shirt",
        image_uri=f"file:///data/fashion/images/{10_000 + i}.jpg",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=1_000_000)
    parser.add_argument("--no-fields", action="store_true",
                        help="records without title and image URI, as the release before wrote "
                        "them (the attributes stay: filters index them)")
    args = parser.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    n, dim = args.products, 8
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = IndexSpec(kind="flat")
    rows = []

    work = Path(tempfile.mkdtemp(prefix="vitrine-shard-memory-"))
    base = rss_bytes()
    store = ShardStore(spec, FILTER_FIELDS, seal_threshold=10**9, lexical_dir=work / "lexical")
    started = time.perf_counter()
    for i in tqdm(range(n), desc="apply", unit="rec", file=sys.stderr):
        store.apply(record(i, vectors[i], not args.no_fields))
    apply_s = time.perf_counter() - started
    grown = rss_bytes()
    rows.append(("growing buffer, B/product (RSS)", f"{(grown - base) / n:,.0f}"))
    started = time.perf_counter()
    asyncio.run(store.seal())
    seal_s = time.perf_counter() - started
    sealed = rss_bytes()
    rows.append(("after the seal, B/product (RSS)", f"{(sealed - base) / n:,.0f}"))
    vector_bytes = n * dim * (4 + 2)  # the flat index's float32 codes and the fp16 raw copy
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # beside the index: hard links
        write_snapshot(Path(tmp), Snapshot(store.export(), {0: n}, "t", 1, 0))
        del store
        before_load = rss_bytes()
        tracemalloc.start()
        started = time.perf_counter()
        found = load_latest(Path(tmp), "t", 1, 0, spec)
        assert found is not None
        restored = ShardStore(spec, FILTER_FIELDS, lexical_dir=work / "lexical")
        restored.load(found.state)  # opens the snapshot's lexical index
        del found
        load_s = time.perf_counter() - started
        gc.collect()
        live = tracemalloc.get_traced_memory()[0]  # Python objects and numpy arrays, not FAISS
        tracemalloc.stop()
        loaded = rss_bytes()
    assert len(restored) == n and len(restored.lexical) == n
    lexical_files = sum(f.stat().st_size for f in (work / "lexical").rglob("*") if f.is_file())
    shutil.rmtree(work, ignore_errors=True)
    segment = restored.sealed
    raw = segment.vectors.nbytes if segment.vectors is not None else 0
    resident = (loaded - before_load) / n
    rows.append(("restored from its snapshot, B/product (RSS)", f"{resident:,.0f}"))
    vectors_per = f"{vector_bytes / n:,.0f}"
    rows.append((f"  of which the vectors (dim {dim}: index + fp16 raw)", vectors_per))
    rows.append(("restored, live Python + numpy B/product (tracemalloc)", f"{live / n:,.0f}"))
    rows.append(("  of which beside the vectors", f"{(live - raw) / n:,.0f}"))
    tables = {
        "product fields (packed)": getattr(segment, "fields", None),
        "product ids (packed)": segment.ids if hasattr(segment.ids, "nbytes") else None,
        "id lookup (hash + row)": getattr(segment, "lookup", None),
    }
    for name, table in tables.items():
        if table is not None:
            rows.append((f"  {name}, B/product", f"{table.nbytes / n:,.1f}"))
    arrays = {"versions": getattr(segment, "versions", None), "change numbers": segment.seqs,
              "attribute codes": segment.codes, "dead rows": segment.dead}
    for name, array in arrays.items():
        if array is not None:
            rows.append((f"  {name}, B/product", f"{array.nbytes / n:,.1f}"))
    rows.append(("lexical index (tantivy, on disk, mmap), B/product", f"{lexical_files / n:,.0f}"))
    rows.append(("apply / seal / restore s", f"{apply_s:.1f} / {seal_s:.1f} / {load_s:.1f}"))
    width = max(len(name) for name, _ in rows)
    print(f"\n{n:,} products, fields {'off' if args.no_fields else 'on'}")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>12}")


if __name__ == "__main__":
    main()
