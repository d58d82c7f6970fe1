"""One embedded vector engine from PyPI on benchmarks/peers.py's vectors (writes a JSON result).

    .venv-peers/bin/python benchmarks/peer_engines.py --engine NAME --base base.npy \
        --queries queries.npy --k 10 --workdir DIR --out result.json \
        [--settings '[{"ef": 64}, {"ef": 128}]'] [--batch 64] [--warmup 20]

NAME: usearch, qdrant-edge, chroma, lancedb or milvus-lite. Run by `.venv-peers` (`make peers`),
never by Vitrine's venv: this file imports only numpy, psutil, tqdm and the engine's package.

Row i of `base` (float32, L2-normalised) is product key i; it is read memory-mapped and fed to
the engine in chunks, so this process never holds a second copy of it. Every engine is built
production-like, with the parameters the JSON's "index" names: HNSW M=16, ef_construction=100,
inner product; LanceDB an IVF_FLAT of 2*sqrt(n) partitions (its other ANN indexes quantize).
Each build is checked to be the index it claims (no unindexed rows searched by brute force)
before any search is timed.

The JSON: engine, version, index, build_s (empty to searchable, index built), memory_bytes
(resident bytes of this process and its children after the build, the base released and
garbage collected, minus the same after the imports), memory_settled_bytes (the same once
glibc's and pyarrow's allocators have returned freed memory to the OS: without the build's
transients), disk_bytes (allocated under the engine's folder in --workdir) and one run per
search-time setting: single_ms (one query per call, after one untimed priming query and
--warmup untimed ones), batch_qps (--batch rows per call), ids (top-k keys of each single
query, best first) and batch_agree (share of queries whose batch top-k set equals the single
one). "note" appears only where an engine can't do what was asked, "details" says what was
built. An engine that fails raises (non-zero exit); peers.py reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

CHUNK = 20_000  # rows per feed: bounded transient memory, few engine calls
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 100
HNSW_SWEEP = [{"ef": ef} for ef in (32, 64, 128, 256, 512)]
IVF_SWEEP = [{"nprobes": n} for n in (8, 16, 32, 64, 128, 256)]
COLLECTION = "vectors"


# ---------------------------------------------------------------- measuring


def resident_bytes() -> int:
    """RSS of this process plus all its descendants (an engine may run a server process)."""
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # it may exit meanwhile
            total += child.memory_info().rss
    return total


def settle_heap() -> None:
    """Hand memory freed during the build back to the OS (glibc's arenas, pyarrow's pool where
    the engine uses it): what is left is what the engine keeps, not the build's transients."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()


def disk_bytes(folder: Path) -> int:
    """Bytes allocated under `folder` (as du counts: sparse and preallocated files honestly)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.stat(path).st_blocks * 512
    return total


def chunks(base: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(first key, rows) in CHUNK-row copies, with a progress line on stderr."""
    starts: Iterable[int] = range(0, len(base), CHUNK)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        starts = tqdm(starts, desc="build", unit="chunk", file=sys.stderr)
    begun = time.perf_counter()
    for number, start in enumerate(starts):
        yield start, np.array(base[start: start + CHUNK], dtype=np.float32)
        fed = min(len(base), start + CHUNK)
        if tqdm is None and (number % 5 == 4 or fed == len(base)):
            print(f"build: {fed:,}/{len(base):,} rows fed, {time.perf_counter() - begun:.0f} s",
                  file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the engines


class Engine:
    """What the harness drives. Subclasses import their package lazily (the memory baseline
    is taken after `modules` are imported, before anything is built)."""

    name = ""
    modules: tuple[str, ...] = ()  # imported before the memory baseline
    dists: tuple[str, ...] = ()  # the distributions whose versions the JSON reports
    setting_keys: frozenset[str] = frozenset()  # what a search-time setting may hold
    required_keys: frozenset[str] = frozenset()  # and must
    default_sweep: list[dict[str, Any]] = []
    batch_note = ""  # set where an engine has no batch call and search_batch loops

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        self.folder, self.dim, self.rows = folder, dim, rows
        self.notes: list[str] = []
        self.details: dict[str, Any] = {}

    @classmethod
    def check(cls, settings: list[dict[str, Any]]) -> None:
        """Refuse a malformed sweep before an hour-long build, not after it."""
        if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
            raise ValueError(f"--settings must be a JSON list of objects, got {settings!r}")
        for setting in settings:
            unknown, missing = set(setting) - cls.setting_keys, cls.required_keys - set(setting)
            bad = [v for v in setting.values() if not isinstance(v, int) or v < 1]
            if unknown or missing or bad:
                raise ValueError(f"{cls.name}: bad setting {setting}: keys "
                                 f"{sorted(cls.required_keys)} required, "
                                 f"{sorted(cls.setting_keys)} allowed, values positive ints")

    def index(self) -> str:
        raise NotImplementedError

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        raise NotImplementedError

    def save(self) -> None:
        """Persist what a restart needs where the build didn't already (after build_s)."""

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        raise NotImplementedError

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Usearch(Engine):
    """usearch's in-memory HNSW; saved to the folder after the build so disk_bytes is real."""

    name = "usearch"
    modules = ("usearch.index",)
    dists = ("usearch",)
    setting_keys = required_keys = frozenset({"ef"})
    default_sweep = HNSW_SWEEP

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        super().__init__(folder, dim, rows)
        from usearch.index import Index

        self.ix = Index(ndim=dim, metric="ip", dtype="f32", connectivity=HNSW_M,
                        expansion_add=HNSW_EF_CONSTRUCTION)

    def index(self) -> str:
        return (f"HNSW connectivity={HNSW_M} expansion_add={HNSW_EF_CONSTRUCTION} metric=ip "
                f"f32 ({self.ix.hardware_acceleration})")

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        for start, x in chunks:
            self.ix.add(np.arange(start, start + len(x), dtype=np.uint64), x)
        if len(self.ix) != self.rows:
            raise RuntimeError(f"usearch holds {len(self.ix)} vectors, fed {self.rows}")
        self.details = {"size": len(self.ix), "index_memory_usage": self.ix.memory_usage}

    def save(self) -> None:
        self.ix.save(str(self.folder / "index.usearch"))

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        self.ix.expansion_search = setting["ef"]
        return [int(key) for key in self.ix.search(q, k).keys]

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        self.ix.expansion_search = setting["ef"]
        return self.ix.search(queries, k).keys.tolist()


class QdrantEdge(Engine):
    """An EdgeShard; `optimize()` builds the HNSW, then info() must show every point indexed
    (a plain segment would be searched by brute force)."""

    name = "qdrant-edge"
    modules = ("qdrant_edge",)
    dists = ("qdrant-edge-py",)
    setting_keys = required_keys = frozenset({"ef"})
    default_sweep = HNSW_SWEEP
    FULL_SCAN_KB = 10_000  # Qdrant's default: segments below 10 MB of vectors are scanned

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        super().__init__(folder, dim, rows)
        import qdrant_edge as qe

        self.qe = qe
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Dot),
            hnsw_config=qe.HnswIndexConfig(m=HNSW_M, ef_construct=HNSW_EF_CONSTRUCTION,
                                           full_scan_threshold=self.FULL_SCAN_KB),
        )
        self.shard = qe.EdgeShard.create(str(folder), config)

    def index(self) -> str:
        return (f"HNSW m={HNSW_M} ef_construct={HNSW_EF_CONSTRUCTION} distance=Dot "
                f"full_scan_threshold={self.FULL_SCAN_KB}KB, optimizer defaults")

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        qe = self.qe
        for start, x in chunks:
            points = [qe.Point(start + i, row) for i, row in enumerate(x)]
            self.shard.update(qe.UpdateOperation.upsert_points(points))
        self.shard.optimize()
        info = self.shard.info()
        self.details = {"segments": info.segments_count, "points": info.points_count,
                        "indexed_vectors": info.indexed_vectors_count}
        if info.points_count != self.rows or info.indexed_vectors_count < self.rows:
            raise RuntimeError(f"qdrant-edge after optimize(): {self.details}, fed {self.rows} "
                               "(unindexed points would be searched by brute force)")

    def save(self) -> None:
        self.shard.flush()

    def _request(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> Any:
        qe = self.qe
        return qe.QueryRequest(limit=k, query=qe.Query.Nearest(q),
                               params=qe.SearchParams(hnsw_ef=setting["ef"]),
                               with_payload=False, with_vector=False)

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        return [int(p.id) for p in self.shard.query(self._request(q, k, setting))]

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        batch = self.qe.QueryBatchRequest([self._request(q, k, setting) for q in queries])
        return [[int(p.id) for p in hits] for hits in self.shard.query_batch(batch)]

    def close(self) -> None:
        self.shard.close()


class Chroma(Engine):
    """A PersistentClient's collection (hnswlib inside). Its loaded index keeps the ef_search
    it was opened with, so a new ef is written with `modify` and the client reopened."""

    name = "chroma"
    modules = ("chromadb",)
    dists = ("chromadb",)
    setting_keys = required_keys = frozenset({"ef"})
    default_sweep = HNSW_SWEEP

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        super().__init__(folder, dim, rows)
        self.ef = 100  # Chroma's default ef_search
        self.client = self._connect()
        hnsw = {"space": "ip", "max_neighbors": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                "ef_search": self.ef}
        self.collection = self.client.create_collection(COLLECTION, embedding_function=None,
                                                        configuration={"hnsw": hnsw})

    def _connect(self) -> Any:
        import chromadb
        from chromadb.config import Settings

        return chromadb.PersistentClient(path=str(self.folder),
                                         settings=Settings(anonymized_telemetry=False))

    def index(self) -> str:
        return (f"HNSW (hnswlib) max_neighbors={HNSW_M} ef_construction={HNSW_EF_CONSTRUCTION} "
                "space=ip, PersistentClient")

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        most = self.client.get_max_batch_size()
        for start, x in chunks:
            for at in range(0, len(x), most):
                part = x[at: at + most]
                self.collection.add(ids=[str(start + at + i) for i in range(len(part))],
                                    embeddings=part)
        if self.collection.count() != self.rows:
            raise RuntimeError(f"chroma holds {self.collection.count()} rows, fed {self.rows}")
        self.details = {"configuration": self.collection.configuration["hnsw"],
                        "max_batch_size": most,
                        "ef_change": "collection.modify(configuration={'hnsw': {'ef_search'}}) "
                                     "then client close and reopen (the loaded index ignores "
                                     "it otherwise); the first query after it is untimed"}

    def _use_ef(self, ef: int) -> None:
        if ef == self.ef:
            return
        self.collection.modify(configuration={"hnsw": {"ef_search": ef}})
        self.client.close()
        self.client = self._connect()
        self.collection = self.client.get_collection(COLLECTION)
        got = self.collection.configuration["hnsw"]["ef_search"]
        if got != ef:
            raise RuntimeError(f"chroma ef_search is {got} after asking for {ef}")
        self.ef = ef

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        self._use_ef(setting["ef"])
        found = self.collection.query(query_embeddings=[q], n_results=k, include=[])
        return [int(key) for key in found["ids"][0]]

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        self._use_ef(setting["ef"])
        found = self.collection.query(query_embeddings=queries, n_results=k, include=[])
        return [[int(key) for key in keys] for keys in found["ids"]]

    def close(self) -> None:
        self.client.close()


class Lance(Engine):
    """A LanceDB table with an IVF_FLAT index (exact vectors inside the probed partitions;
    IVF_PQ / IVF_SQ / IVF_HNSW_SQ quantize, so they'd need a refine to reach high recall)."""

    name = "lancedb"
    modules = ("lancedb", "lancedb.index", "pyarrow")
    dists = ("lancedb", "pyarrow")
    setting_keys = frozenset({"nprobes", "refine_factor"})
    required_keys = frozenset({"nprobes"})
    default_sweep = IVF_SWEEP

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        super().__init__(folder, dim, rows)
        import lancedb
        import pyarrow as pa

        self.pa = pa
        self.partitions = max(1, round(2 * math.sqrt(rows)))
        self.schema = pa.schema([pa.field("id", pa.int64()),
                                 pa.field("vector", pa.list_(pa.float32(), dim))])
        self.db = lancedb.connect(str(folder))
        self.table = self.db.create_table(COLLECTION, schema=self.schema)

    def index(self) -> str:
        return (f"IVF_FLAT num_partitions={self.partitions} (2*sqrt(n)) distance=dot, "
                "max_iterations=50 sample_rate=256 (defaults)")

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        from lancedb.index import IvfFlat

        pa = self.pa
        for start, x in chunks:
            vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), self.dim)
            ids = pa.array(np.arange(start, start + len(x), dtype=np.int64))
            self.table.add(pa.Table.from_arrays([ids, vectors], schema=self.schema))
        self.table.create_index("vector", config=IvfFlat(distance_type="dot",
                                                         num_partitions=self.partitions))
        [index] = self.table.list_indices()
        stats = self.table.index_stats(index.name)
        self.details = {"index_type": stats.index_type, "distance_type": stats.distance_type,
                        "indexed_rows": stats.num_indexed_rows,
                        "unindexed_rows": stats.num_unindexed_rows}
        if stats.index_type != "IVF_FLAT" or stats.num_unindexed_rows or \
                stats.num_indexed_rows != self.rows:
            raise RuntimeError(f"lancedb index after create_index: {self.details}")

    def _query(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> Any:
        query = (self.table.search(q, vector_column_name="vector").distance_type("dot")
                 .nprobes(setting["nprobes"]).limit(k).select(["id", "_distance"]))
        if setting.get("refine_factor"):
            query = query.refine_factor(setting["refine_factor"])
        return query.to_arrow()

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        return self._query(q, k, setting)["id"].to_pylist()

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        found = self._query(queries, k, setting).to_pydict()  # one row per (query, hit)
        hits: list[list[tuple[float, int]]] = [[] for _ in queries]
        for at, key, distance in zip(found["query_index"], found["id"], found["_distance"],
                                     strict=True):
            hits[at].append((distance, key))
        return [[key for _, key in sorted(each)] for each in hits]


class MilvusLite(Engine):
    """pymilvus's MilvusClient on a local .db (Milvus Lite 3.x: a gRPC server in this process,
    FAISS per segment). It reports every index 'Finished' whatever it holds, so the build is
    checked on its in-process collection: no unflushed rows, an HNSW on every segment."""

    name = "milvus-lite"
    modules = ("pymilvus", "milvus_lite", "faiss")
    dists = ("milvus-lite", "pymilvus", "faiss-cpu")
    setting_keys = required_keys = frozenset({"ef"})
    default_sweep = HNSW_SWEEP

    def __init__(self, folder: Path, dim: int, rows: int) -> None:
        super().__init__(folder, dim, rows)
        from pymilvus import DataType, MilvusClient

        self.uri = str(folder / "milvus.db")
        self.client = MilvusClient(self.uri)
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        self.client.create_collection(COLLECTION, schema=schema)

    def index(self) -> str:
        return (f"HNSW (faiss IndexHNSWFlat per segment) M={HNSW_M} "
                f"efConstruction={HNSW_EF_CONSTRUCTION} metric=IP")

    def build(self, chunks: Iterable[tuple[int, np.ndarray]]) -> None:
        for start, x in chunks:
            self.client.insert(COLLECTION, [{"id": start + i, "vector": row}
                                            for i, row in enumerate(x)])
        self.client.flush(COLLECTION)
        lite = self._lite()
        lite._wait_for_bg()  # post-flush compaction first: indexing is then done once
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type="HNSW", metric_type="IP",
                        params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
        from pymilvus.exceptions import MilvusException

        try:  # builds inline: the collection is loaded
            self.client.create_index(COLLECTION, index, timeout=24 * 3600)
        except MilvusException as exc:  # pymilvus retried a slow first call that went on
            if "index already exists" not in str(exc):
                raise
        self.client.load_collection(COLLECTION)
        lite._wait_for_bg()
        segments = [s for s in lite._segments_snapshot() if s.num_rows]
        kinds = [type(s.indexes.get("vector")).__name__ for s in segments]
        self.details = {"segments": len(segments), "segment_rows": [s.num_rows for s in segments],
                        "segment_indexes": sorted(set(kinds)),
                        "unflushed_rows": lite._memtable.size(),
                        "server": "in-process thread (no child process in Milvus Lite 3.x)"}
        indexed = sum(s.num_rows for s, kind in zip(segments, kinds, strict=True)
                      if kind == "FaissHnswIndex")
        if indexed != self.rows or lite._memtable.size():
            raise RuntimeError(f"milvus-lite after create_index + load: {self.details}, "
                               f"{indexed} rows in HNSW segments of {self.rows} fed")

    def _lite(self) -> Any:
        """The milvus_lite Collection behind the gRPC server (its private state is the only
        place that says whether segments are really indexed)."""
        from milvus_lite import server_manager_instance

        _server, db, _port = server_manager_instance._servers[os.path.abspath(self.uri)]
        return db.get_collection(COLLECTION)

    def _search(self, rows: list[np.ndarray], k: int, setting: dict[str, Any]) -> list[list[int]]:
        found = self.client.search(COLLECTION, data=rows, limit=k, output_fields=[],
                                   search_params={"metric_type": "IP",
                                                  "params": {"ef": setting["ef"]}})
        return [[int(hit["id"]) for hit in hits] for hits in found]

    def search(self, q: np.ndarray, k: int, setting: dict[str, Any]) -> list[int]:
        return self._search([q], k, setting)[0]

    def search_batch(self, queries: np.ndarray, k: int,
                     setting: dict[str, Any]) -> list[list[int]]:
        return self._search(list(queries), k, setting)

    def close(self) -> None:
        from milvus_lite import server_manager_instance

        self.client.close()
        server_manager_instance.release_server(self.uri)


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (Usearch, QdrantEdge, Chroma, Lance,
                                                        MilvusLite)}


# ---------------------------------------------------------------- the run


def measure(engine: Engine, queries: np.ndarray, k: int, setting: dict[str, Any], batch: int,
            warmup: int) -> dict[str, Any]:
    """One setting: sequential single queries (after untimed ones), then batches."""
    engine.search(queries[0], k, setting)  # a setting's one-off cost (chroma's reopen) untimed
    for i in range(warmup):
        engine.search(queries[i % len(queries)], k, setting)
    single, ids = [], []
    for q in queries:
        started = time.perf_counter()
        got = engine.search(q, k, setting)
        single.append((time.perf_counter() - started) * 1000)
        ids.append(got)
    batched: list[list[int]] = []
    started = time.perf_counter()
    for at in range(0, len(queries), batch):
        batched += engine.search_batch(queries[at: at + batch], k, setting)
    qps = len(queries) / (time.perf_counter() - started)
    run: dict[str, Any] = {
        "setting": setting, "single_ms": single, "batch_qps": qps, "ids": ids,
        "batch_agree": float(np.mean([set(a) == set(b) for a, b in zip(ids, batched,
                                                                      strict=True)])),
    }
    short = sum(len(got) < k for got in ids)
    if short:
        run["note"] = f"{short} of {len(ids)} queries got fewer than {k} hits"
    if engine.batch_note:
        run["batch_note"] = engine.batch_note
    return run


def versions(dists: tuple[str, ...]) -> dict[str, str]:
    return {d: importlib.metadata.version(d) for d in dists}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", required=True, choices=sorted(ENGINES))
    parser.add_argument("--base", required=True, type=Path)
    parser.add_argument("--queries", required=True, type=Path)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--settings", type=json.loads, default=None,
                        help="JSON list of search-time settings (default: the engine's sweep)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    kind = ENGINES[args.engine]
    settings = args.settings if args.settings is not None else kind.default_sweep
    kind.check(settings)
    for module in kind.modules:
        importlib.import_module(module)
    settle_heap()
    before = resident_bytes()

    folder = args.workdir / args.engine
    folder.mkdir(parents=True)  # fails on a previous run's leftovers rather than mixing them
    base = np.load(args.base, mmap_mode="r")
    started = time.perf_counter()
    engine = kind(folder, base.shape[1], base.shape[0])
    engine.build(chunks(base))
    build_s = time.perf_counter() - started
    del base
    gc.collect()
    memory = resident_bytes() - before  # as peers.py measures its own engines
    settle_heap()
    settled = resident_bytes() - before
    engine.save()
    disk = disk_bytes(folder)
    print(f"{args.engine}: built in {build_s:.1f} s, {memory / 1e6:,.0f} MB resident "
          f"({settled / 1e6:,.0f} MB settled), {disk / 1e6:,.0f} MB on disk", file=sys.stderr,
          flush=True)

    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    runs = []
    for setting in settings:
        runs.append(measure(engine, queries, args.k, setting, args.batch, args.warmup))
        times = runs[-1]["single_ms"]
        print(f"{args.engine} {setting}: p50 {np.percentile(times, 50):.2f} ms, batch "
              f"{runs[-1]['batch_qps']:,.0f} q/s", file=sys.stderr, flush=True)
    engine.close()

    every = versions(kind.dists)
    result: dict[str, Any] = {
        "engine": args.engine, "version": every[kind.dists[0]], "versions": every,
        "index": engine.index(), "details": engine.details, "build_s": build_s,
        "memory_bytes": memory, "memory_settled_bytes": settled, "disk_bytes": disk,
        "runs": runs,
    }
    if engine.notes:
        result["note"] = "; ".join(engine.notes)
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
