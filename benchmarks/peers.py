"""Vitrine beside the engines a user would otherwise pick, on the same vectors and queries in one
run (prints a table; not a test).

    make peers        # the peers' own venv, .venv-peers (never installed into Vitrine's)
    .venv/bin/python benchmarks/peers.py [--vectors 1000000] [--products 5000] [--queries 500]
        [--engines faiss,vitrine,vitrine-http,vitrine-router,qdrant-edge,chroma,lancedb,
                   milvus-lite,usearch]

Vectors: the shipped model's fused product vectors (picture + title + attributes, as the
encoder writes them) of `--products` real catalog products, replicated with noise to
`--vectors` (each copy keeps its product's fields, so lexical and hybrid have real text).
Queries: distinct shopper texts (the eval's attribute phrases, then titles of products outside
the sample) through the text tower the router runs. Truth: exact inner-product top-10.

Engines, each in its own process so its memory is its own (resident bytes after the build, the
input released, minus the same process before it loaded anything):
- faiss: raw FAISS, the shard's index recipe and search parameters (`IndexSpec`);
- vitrine: the shard store in process (`ShardStore.search`: complete hits with their fields),
  built the way a shard is (every record applied, lexical index included, then one seal);
- vitrine-http: one shard process restored from that store's snapshot, `POST /search`;
- vitrine-router: the router with 2 shard processes, sequential cold-cache text queries
  (`mode=dense`; hybrid shown beside), against the same text tower plus the in-process store
  (the work the router wraps);
- the embedded peers from PyPI (`benchmarks/peer_engines.py`, run by `.venv-peers`).

Each ANN engine sweeps its search-time setting; the table shows, per engine, the cheapest
setting reaching `--recall` (else its best), and the ratios to raw FAISS at its own setting.
Everything is cached under benchmarks/out/peers/ by content (the encoded catalog, the
replicated vectors); engine runs are not.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import faiss
import msgpack
import numpy as np
from tqdm import tqdm

from proto.search import SearchRequest, SearchResponse
from proto.vectors import ProductFields, VectorRecord
from services.shard.segments import IndexSpec, trained_faiss_index
from services.shard.snapshot import Snapshot, write_snapshot
from services.shard.store import ShardStore
from vitrine.kafka import partition_for
from vitrine.settings import CommonSettings

HERE = Path(__file__).resolve().parent
CACHE = HERE / "out" / "peers"
PEERS_PYTHON = HERE.parent / ".venv-peers" / "bin" / "python"
VITRINE_ENGINES = ("faiss", "vitrine")
STACK_ENGINES = ("vitrine-http", "vitrine-router")
PEER_ENGINES = ("qdrant-edge", "chroma", "lancedb", "milvus-lite", "usearch")
NPROBES = (16, 32, 64, 128)  # the IVF sweep of faiss and vitrine (the shard default is 32)
CHUNK = 50_000
K = 10


# ---------------------------------------------------------------- the catalog and queries


@dataclasses.dataclass
class Workload:
    base: Path  # float32 (n, dim), row i is product f"p{i}"
    queries: Path  # float32 (nq, dim), the text tower's vectors of `texts`
    texts: list[str]
    fresh: list[str]  # other texts, never asked before: a cold pass of another mode
    fields: Path  # msgpack list: the packed ProductFields of each real product
    real: int  # rows are copies of real product i % real
    truth: np.ndarray  # exact top-10 rows per query


def encoded_catalog(data: Path, products: int, queries: int) -> tuple[Path, Path, Path]:
    """The shipped model's product vectors and packed fields of `products` real products, and
    `queries` distinct query texts with their vectors; cached by what made them."""
    from vitrine.model import ModelSpec, load_dual_encoder, product_text
    from vitrine.training.data import load_products
    from vitrine.training.eval import build_queries
    from vitrine.training.features import load_images

    settings = CommonSettings()
    key = _key(data.resolve(), products, queries, settings.model_arch, settings.model_weights)
    vectors, fields, texts = (CACHE / f"real-{key}.{ext}" for ext in ("npy", "msgpack", "json"))
    if vectors.exists() and fields.exists() and texts.exists():
        return vectors, fields, texts
    everything = load_products(data)
    step = max(1, len(everything) // products)
    picked = everything[::step][:products]  # spread over the file, not its first rows
    others = [p.title.lower() for i, p in enumerate(everything) if i % step]
    phrases = [q.text for q in build_queries(picked)]
    asked = list(dict.fromkeys(phrases[: queries // 2] + others))
    asked, fresh = asked[:queries], asked[queries: 2 * queries]  # fresh: for a second cold pass
    encoder = load_dual_encoder(ModelSpec(settings.model_arch, settings.model_weights),
                                text_runtime="auto")  # the router's runtime
    images = load_images([p.image for p in tqdm(picked, desc="pictures", file=sys.stderr)])
    product_vectors = np.concatenate([
        encoder.encode_products(images[i: i + 256],
                                [product_text(p.title, p.attributes) for p in picked[i: i + 256]])
        for i in tqdm(range(0, len(picked), 256), desc="encode products", file=sys.stderr)
    ])
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(vectors, product_vectors.astype(np.float32))
    np.save(vectors.with_suffix(".queries.npy"), encoder.encode_texts(asked))
    fields.write_bytes(msgpack.packb([
        ProductFields(title=p.title, image_uri=f"file://{p.image}",
                      attributes=p.attributes).pack() for p in picked
    ]))
    texts.write_text(json.dumps({"queries": asked, "fresh": fresh}))
    return vectors, fields, texts


def replicated(real: np.ndarray, n: int, noise: float, seed: int) -> Path:
    """Row i = real[i % len(real)] plus gaussian noise of norm about `noise`, normalised,
    written chunk by chunk to a .npy the engines read memory-mapped."""
    path = CACHE / f"base-{_key(real.tobytes(), n, noise, seed)}.npy"
    if path.exists():
        return path
    out = np.lib.format.open_memmap(path.with_suffix(".tmp"), mode="w+", dtype=np.float32,
                                    shape=(n, real.shape[1]))
    for start in tqdm(range(0, n, CHUNK), desc="replicate", file=sys.stderr):
        rows = np.arange(start, min(n, start + CHUNK))
        rng = np.random.default_rng([seed, start])
        x = real[rows % len(real)]
        x = x + noise / np.sqrt(x.shape[1]) * rng.standard_normal(x.shape, dtype=np.float32)
        out[start: start + len(rows)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    path.with_suffix(".tmp").rename(path)
    return path


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k rows, the catalog scanned in chunks."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(base), 200_000):
        scores, rows = faiss.knn(queries, np.ascontiguousarray(base[start: start + 200_000]), k,
                                 metric=faiss.METRIC_INNER_PRODUCT)
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, rows + start], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def workload(args: argparse.Namespace) -> Workload:
    vectors, fields, texts = encoded_catalog(args.data, args.products, args.queries)
    real = np.load(vectors)
    base = replicated(real, args.vectors, args.noise, args.seed)
    queries = vectors.with_suffix(".queries.npy")
    truth_path = base.with_suffix(f".truth-{_key(np.load(queries).tobytes())}.npy")
    if not truth_path.exists():
        np.save(truth_path, exact_top(np.load(base, mmap_mode="r"), np.load(queries), K))
    asked = json.loads(texts.read_text())
    return Workload(base, queries, asked["queries"], asked["fresh"], fields, len(real),
                    np.load(truth_path))


# ---------------------------------------------------------------- engines in their own process


def resident_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def chunks(base: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for start in tqdm(range(0, len(base), CHUNK), desc="build", file=sys.stderr, leave=False):
        yield start, np.ascontiguousarray(base[start: start + CHUNK], dtype=np.float32)


class FaissEngine:
    """Raw FAISS: the shard's own factory string and training recipe, nothing around it."""

    def __init__(self, spec: IndexSpec) -> None:
        self.spec = spec
        self.index: Any = None

    def build(self, base: np.ndarray, _: list[bytes], real: int) -> None:
        self.index, _trained = trained_faiss_index(self.spec, base)
        for _start, x in chunks(base):
            self.index.add(x)

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> list[list[int]]:
        params = faiss.SearchParametersIVF(nprobe=nprobe)  # type: ignore[call-arg]
        _, rows = self.index.search(queries, k, params=params)
        return rows.tolist()


class VitrineEngine:
    """The shard store: every record applied as the replicator applies it, one seal."""

    def __init__(self, spec: IndexSpec, lexical_dir: Path) -> None:
        self.spec = spec
        settings = CommonSettings()
        self.store = ShardStore(spec, settings.filter_fields, seal_threshold=1 << 62,
                                lexical_dir=lexical_dir)

    def build(self, base: np.ndarray, fields: list[bytes], real: int,
              rows: np.ndarray | None = None) -> None:
        """Apply `rows` of `base` (all by default) as upserts, then seal once."""
        rows = np.arange(len(base)) if rows is None else rows
        for start in tqdm(range(0, len(rows), CHUNK), desc="apply", file=sys.stderr,
                          leave=False):
            picked = rows[start: start + CHUNK]
            vectors = np.asarray(base[picked], dtype=np.float32)
            for row, vector in zip(picked.tolist(), vectors, strict=True):
                shown = ProductFields.unpack(fields[row % real])
                self.store.apply(VectorRecord.upsert(
                    f"p{row}", 1, "bench", vector, attributes=shown.attributes,
                    title=shown.title, image_uri=shown.image_uri,
                ))
        asyncio.run(self.store.seal())
        self.store.lexical.refresh(force=True)
        if self.store.growing is not None:
            self.store.growing.shrink()

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> list[list[int]]:
        sealed = self.store.sealed
        assert sealed is not None
        if sealed.spec.nprobe != nprobe:
            sealed.spec = dataclasses.replace(sealed.spec, nprobe=nprobe)
        hits = self.store.search(queries, k)
        return [[int(pid[1:]) for pid in ids] for ids in hits.ids]

    def snapshot(self, directory: Path, num_shards: int = 1, shard_id: int = 0) -> None:
        cut = Snapshot(self.store.export(), {}, CommonSettings().vectors_topic, num_shards,
                       shard_id)
        write_snapshot(directory, cut)


def run_vitrine_engine(args: argparse.Namespace) -> None:
    """`peers.py engine NAME ...`: build, sweep nprobe, write the JSON peer_engines.py writes."""
    base = np.load(args.base, mmap_mode="r")
    queries = np.load(args.queries)
    fields = msgpack.unpackb(Path(args.fields).read_bytes())
    spec = IndexSpec(kind="ivf_flat")
    engine: FaissEngine | VitrineEngine
    engine = FaissEngine(spec) if args.engine == "faiss" else \
        VitrineEngine(spec, Path(args.workdir) / "lexical")
    gc.collect()
    before = resident_bytes()
    started = time.perf_counter()
    engine.build(base, fields, args.real)
    build_s = time.perf_counter() - started
    rows = len(base)
    del base
    gc.collect()
    memory = resident_bytes() - before
    runs = []
    for nprobe in NPROBES:
        single, ids = [], []
        for q in queries[: args.warmup]:
            engine.search(q[None], K, nprobe)
        for q in queries:
            started = time.perf_counter()
            ids.extend(engine.search(q[None], K, nprobe))
            single.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        for start in range(0, len(queries), args.batch):
            engine.search(queries[start: start + args.batch], K, nprobe)
        qps = len(queries) / (time.perf_counter() - started)
        runs.append({"setting": {"nprobe": nprobe}, "single_ms": single, "batch_qps": qps,
                     "ids": ids})
    if isinstance(engine, VitrineEngine):
        engine.snapshot(Path(args.workdir) / "snapshot")
    recipe = spec.factory_string(rows, queries.shape[1])
    Path(args.out).write_text(json.dumps({
        "engine": args.engine, "version": f"faiss {faiss.__version__}",
        "index": f"{recipe} (IndexSpec defaults; sealed vectors fp16-rounded)"
        if args.engine == "vitrine" else recipe,
        "build_s": build_s, "memory_bytes": memory, "disk_bytes": 0, "runs": runs,
    }))


def build_fleet(args: argparse.Namespace) -> None:
    """`peers.py fleet ...`: the snapshots of `--shards` shards, each product in the shard its
    partition belongs to, as the router's fleet restores them."""
    base = np.load(args.base, mmap_mode="r")
    fields = msgpack.unpackb(Path(args.fields).read_bytes())
    settings = CommonSettings()
    owner = np.array([partition_for(f"p{i}", settings.vector_partitions) % args.shards
                      for i in range(len(base))])
    for shard in range(args.shards):
        rows = np.flatnonzero(owner == shard)
        workdir = Path(args.workdir)
        engine = VitrineEngine(IndexSpec(kind="ivf_flat"), workdir / f"lexical-{shard}")
        engine.build(base, fields, args.real, rows)
        engine.snapshot(workdir / "snapshots" / f"shard-{shard}", args.shards, shard)
        del engine
        gc.collect()


def _key(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------- Vitrine's services


def build_fleet_in(work: Workload, directory: Path, shards: int) -> None:
    """The shards' snapshots under `directory`/snapshots, built in a process of their own."""
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "fleet",
                    "--base", str(work.base), "--fields", str(work.fields),
                    "--real", str(work.real), "--shards", str(shards),
                    "--workdir", str(directory)], check=True)


def stack_for(state: Path, num_shards: int, nprobe: int) -> Any:
    from vitrine.cli.stack import LocalStack, StackSettings

    return LocalStack(StackSettings(
        num_shards=num_shards, router_port=0, state_dir=state, kafka_bootstrap=None,
        redis_cache_mb=0, start_timeout_s=1800, deadline_ms=2000,
        service_env={"VITRINE_INDEX_TYPE": "ivf_flat", "VITRINE_IVF_NPROBE": str(nprobe)},
    ))


def shard_memory(stack: Any) -> int:
    return sum(resident_bytes(stack.children[name[0]].process.pid) for name in stack.fleet.names)


async def over_http(stack: Any, work: Workload, batch: int) -> dict[str, Any]:
    """One shard process: each query alone, then batches, as pre-encoded vectors."""
    queries = np.load(work.queries)
    url = stack.replica_urls[0][0]
    headers = {"Content-Type": "application/msgpack"}
    async with aiohttp.ClientSession() as session:
        async def ask(rows: np.ndarray) -> SearchResponse:
            wire = SearchRequest.build(rows, K, 60_000, mode="dense").to_wire()
            async with session.post(f"{url}/search", data=wire, headers=headers) as resp:
                resp.raise_for_status()
                return SearchResponse.from_wire(await resp.read())

        for q in queries[:20]:
            await ask(q[None])
        single, ids = [], []
        for q in queries:
            started = time.perf_counter()
            answer = await ask(q[None])
            single.append((time.perf_counter() - started) * 1000)
            ids.append([int(pid[1:]) for pid in answer.ids[0]])
        started = time.perf_counter()
        for start in range(0, len(queries), batch):
            await ask(queries[start: start + batch])
        qps = len(queries) / (time.perf_counter() - started)
    return {"single_ms": single, "batch_qps": qps, "ids": ids}


async def through_router(stack: Any, texts: list[str], mode: str) -> dict[str, Any]:
    """Sequential text queries, each text asked once (every query vector is encoded)."""
    async with aiohttp.ClientSession() as session:
        single, ids = [], []
        for text in texts:
            started = time.perf_counter()
            params = {"q": text, "k": str(K), "mode": mode}
            async with session.get(f"{stack.router_url}/search", params=params) as resp:
                body = await resp.json()
            single.append((time.perf_counter() - started) * 1000)
            if resp.status != 200 or body["partial"]:
                raise RuntimeError(f"router answered {resp.status}: {str(body)[:300]}")
            ids.append([int(hit["product_id"][1:]) for hit in body["results"]])
        async with session.get(f"{stack.router_url}/metrics") as resp:
            metrics = await resp.text()
    return {"single_ms": single, "ids": ids, "stages": stage_means(metrics)}


def stage_means(metrics: str) -> dict[str, float]:
    """Mean ms of each router stage, and of one text-tower pass in its thread (the encode
    stage less that is cache lookups and the hand-off), from the Prometheus histograms."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        if family.name not in ("vitrine_router_stage_duration_seconds",
                               "vitrine_router_text_tower_duration_seconds"):
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "tower pass")
            if sample.name.endswith("_sum"):
                sums[stage] = sample.value
            elif sample.name.endswith("_count"):
                counts[stage] = sample.value
    return {stage: 1000 * sums[stage] / counts[stage] for stage in sums if counts.get(stage)}


def encode_latency(texts: list[str]) -> list[float]:
    """The router's text tower in this process, one query at a time: the work it wraps."""
    from vitrine.model import ModelSpec, load_dual_encoder

    settings = CommonSettings()
    encoder = load_dual_encoder(ModelSpec(settings.model_arch, settings.model_weights),
                                text_runtime="auto", compute_threads=settings.compute_threads)
    encoder.encode_texts(texts[:20])
    times = []
    for text in texts:
        started = time.perf_counter()
        encoder.encode_texts([text])
        times.append((time.perf_counter() - started) * 1000)
    return times


# ---------------------------------------------------------------- the run and its table


@dataclasses.dataclass
class Row:
    engine: str
    setting: str
    recall: float
    p50: float
    p99: float
    qps: float | None
    build_s: float | None
    memory: int | None
    note: str = ""


def recall(ids: list[list[int]], truth: np.ndarray) -> float:
    found = sum(len(set(got[:K]) & set(want.tolist())) for got, want in zip(ids, truth,
                                                                             strict=True))
    return found / truth.size


def rows_of(result: dict[str, Any], truth: np.ndarray) -> list[Row]:
    out = []
    for run in result["runs"]:
        times = run["single_ms"]
        out.append(Row(
            result["engine"], ",".join(f"{k}={v}" for k, v in run["setting"].items()) or "-",
            recall(run["ids"], truth), float(np.percentile(times, 50)),
            float(np.percentile(times, 99)), run.get("batch_qps"), result.get("build_s"),
            result.get("memory_bytes"), result.get("note", "") or run.get("batch_note", ""),
        ))
    return out


def chosen(rows: list[Row], target: float) -> Row:
    """The cheapest setting reaching the target recall, else the most accurate one."""
    reaching = [r for r in rows if r.recall >= target]
    return min(reaching, key=lambda r: r.p50) if reaching else max(rows, key=lambda r: r.recall)


def engine_command(name: str, work: Workload, args: argparse.Namespace, out: Path,
                   workdir: Path) -> list[str]:
    common = ["--base", str(work.base), "--queries", str(work.queries), "--k", str(K),
              "--workdir", str(workdir), "--out", str(out), "--batch", str(args.batch)]
    if name in VITRINE_ENGINES:
        return [sys.executable, str(Path(__file__).resolve()), "engine", name, *common,
                "--fields", str(work.fields), "--real", str(work.real)]
    return [str(PEERS_PYTHON), str(HERE / "peer_engines.py"), "--engine", name, *common]


def run_engine(name: str, work: Workload, args: argparse.Namespace, tmp: Path) -> list[Row]:
    workdir = tmp / name
    workdir.mkdir()
    out = workdir / "result.json"
    command = engine_command(name, work, args, out, workdir)
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0 or not out.exists():
        return [Row(name, "-", float("nan"), float("nan"), float("nan"), None, None, None,
                    f"failed (exit {done.returncode}); {done.stdout[-200:]}")]
    result = json.loads(out.read_text())
    rows = rows_of(result, work.truth)
    for row in rows:
        row.note = row.note or result.get("index", "")
    return rows


def stack_rows(work: Workload, args: argparse.Namespace, tmp: Path, nprobe: int,
               in_process_p50: float) -> list[Row]:
    rows = []
    if "vitrine-http" in args.engines and (tmp / "vitrine" / "snapshot").exists():
        state = tmp / "http-state"
        (state / "snapshots").mkdir(parents=True)
        (tmp / "vitrine" / "snapshot").rename(state / "snapshots" / "shard-0")
        stack = stack_for(state, 1, nprobe)
        stack.start()
        try:
            memory = shard_memory(stack)
            got = asyncio.run(over_http(stack, work, args.batch))
        finally:
            stack.stop()
        times = got["single_ms"]
        rows.append(Row("vitrine-http", f"nprobe={nprobe}", recall(got["ids"], work.truth),
                        float(np.percentile(times, 50)), float(np.percentile(times, 99)),
                        got["batch_qps"], None, memory, "1 shard process, POST /search, "
                        "memory: its whole RSS"))
    if "vitrine-router" in args.engines:
        fleet = tmp / "fleet"
        build_fleet_in(work, fleet, 2)
        encode = encode_latency(work.fresh)
        stack = stack_for(fleet, 2, nprobe)
        stack.start()
        try:
            memory = shard_memory(stack)
            dense = asyncio.run(through_router(stack, work.texts, "dense"))
            hybrid = asyncio.run(through_router(stack, work.fresh, "hybrid"))
        finally:
            stack.stop()
        encode_p50 = float(np.percentile(encode, 50))
        for mode, got in (("dense", dense), ("hybrid", hybrid)):
            times = got["single_ms"]
            stages = ", ".join(f"{k} {v:.2f}" for k, v in got["stages"].items())
            p50 = float(np.percentile(times, 50))
            overhead = (f"{p50 / (encode_p50 + in_process_p50):.2f}x the encode "
                        f"({encode_p50:.2f} ms) + in-process search it wraps"
                        if in_process_p50 else  # the in-process engine was not run
                        f"the encode alone: {encode_p50:.2f} ms in this process")
            rows.append(Row(
                f"vitrine-router {mode}", f"nprobe={nprobe}",
                recall(got["ids"], work.truth) if mode == "dense" else float("nan"),
                p50, float(np.percentile(times, 99)), None, None, memory,
                f"2 shards, cold text queries incl. encoding; {overhead}; "
                f"stage means ms: {stages}" if mode == "dense" else
                "2 shards, cold text queries, dense + BM25 fused on every shard",
            ))
    return rows


def print_table(rows: list[Row], reference: Callable[[Row], Row | None]) -> None:
    header = ("engine", "setting", "recall@10", "p50 ms", "p99 ms", "batch-64 q/s", "build s",
              "memory MB", "p50 / FAISS", "q/s / FAISS", "note")
    table = []
    def ratio(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b and np.isfinite(a) else ""

    for r in rows:
        faiss_row = reference(r)
        table.append((
            r.engine, r.setting, f"{r.recall:.3f}", f"{r.p50:.2f}", f"{r.p99:.2f}",
            f"{r.qps:,.0f}" if r.qps else "", f"{r.build_s:.0f}" if r.build_s else "",
            f"{r.memory / 1e6:,.0f}" if r.memory else "",
            ratio(r.p50, faiss_row.p50 if faiss_row else None),
            ratio(r.qps, faiss_row.qps if faiss_row else None), r.note,
        ))
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)) + " |",
              flush=True)


def run(args: argparse.Namespace) -> None:
    if set(args.engines) & set(PEER_ENGINES) and not PEERS_PYTHON.exists():
        subprocess.run(["make", "-C", str(HERE.parent), "peers"], check=True)
    work = workload(args)
    print(f"# {os.cpu_count()} cores; {args.vectors:,} vectors (dim "
          f"{np.load(work.queries).shape[1]}) = {work.real:,} real products' fused vectors "
          f"with noise {args.noise}; {len(work.texts)} distinct text queries; recall@10 against "
          f"exact; each engine at the cheapest setting reaching {args.recall}, all settings "
          f"below", flush=True)
    all_rows: list[Row] = []
    best: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="vitrine-peers-", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        for name in [e for e in args.engines if e not in STACK_ENGINES]:
            print(f"# {name} ...", file=sys.stderr, flush=True)
            rows = run_engine(name, work, args, tmp)
            all_rows += rows
            best[name] = chosen(rows, args.recall)
        vitrine = best.get("vitrine")
        nprobe = int(vitrine.setting.split("=")[1]) if vitrine and "=" in vitrine.setting \
            else IndexSpec().nprobe
        services = stack_rows(work, args, tmp, nprobe, vitrine.p50 if vitrine else 0.0)
    faiss_at = {r.setting: r for r in all_rows if r.engine == "faiss"}

    def reference(row: Row) -> Row | None:
        """Raw FAISS at the same parameters where the row has them, else at its chosen one."""
        return faiss_at.get(row.setting) or best.get("faiss")

    print("\n## Each engine at its chosen setting (ratios: to raw FAISS at the same nprobe, "
          "else at FAISS's chosen setting)")
    print_table([*best.values(), *services], reference)
    print("\n## Every setting")
    print_table(all_rows, reference)
    print(f"\ncommand: {shlex.join(sys.argv)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/fashion")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--products", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--noise", type=float, default=0.4,
                        help="norm of the noise added to each copy (0.4: cosine about 0.92)")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp", type=Path, default=None, help="where engines build")
    parser.add_argument("--engines", type=lambda s: s.split(","),
                        default=[*VITRINE_ENGINES, *STACK_ENGINES, *PEER_ENGINES])
    engine = sub.add_parser("engine", help="internal: one Vitrine-side engine in this process")
    engine.add_argument("engine", choices=VITRINE_ENGINES)
    fleet = sub.add_parser("fleet", help="internal: the router's shard snapshots")
    for part in (engine, fleet):
        for flag in ("--base", "--fields", "--workdir"):
            part.add_argument(flag, required=True)
        part.add_argument("--real", type=int, required=True)
    for flag in ("--queries", "--out"):
        engine.add_argument(flag, required=True)
    engine.add_argument("--k", type=int, default=K)
    engine.add_argument("--batch", type=int, default=64)
    engine.add_argument("--warmup", type=int, default=20)
    fleet.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    if args.command == "engine":
        run_vitrine_engine(args)
    elif args.command == "fleet":
        build_fleet(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
