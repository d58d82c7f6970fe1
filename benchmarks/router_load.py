"""Router under load on the local stack: 4 shards x 2 replicas, N synthetic vectors (prints
tables; not a test).

    .venv/bin/python benchmarks/router_load.py [--vectors 200000] [--rates 10,25,50]
        [--deadline-ms 80] [--requests 300] [--max-seconds 20] [--sequential 200]

1. load N clustered unit vectors (dim 384, f16) straight to catalog.vectors, each with its
   product's fields (a title, an image URI), as the encoder writes them;
2. open-loop text queries at fixed rates (cold cache: every text new; warm: repeated texts):
   client-observed p50/p95/p99/max, errors, partial answers;
3. the same at one rate with one replica stalled (SIGSTOP for the scenario) and one killed;
4. router overhead: sequential pre-encoded vectors straight to one shard replica vs warm-cache
   text through the router, and cold-cache sequential text through the router;
5. recall@10 of the merged per-shard answers against exact numpy search, for queries near
   catalog items and for random directions (text queries sit between the two).

Latencies in the open-loop runs count from each request's scheduled send time, so a stalled
client does not hide queueing (no coordinated omission). Everything is bounded by count and
time, and the stack is stopped on the way out (Ctrl-C included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families
from synthetic import clustered, near  # benchmarks/ is on sys.path when run as a script
from tqdm import tqdm

from proto.search import SearchRequest, SearchResponse
from proto.vectors import VectorRecord
from services.router.merge import merge_topk
from vitrine.cli.stack import LocalStack, StackSettings
from vitrine.kafka import partition_for, producer_config

DIM = 384
MODEL_ID = "bench-random"  # shards do not check model ids
MSGPACK = {"Content-Type": "application/msgpack"}
MACHINE = f"{os.cpu_count()} cores, shared; loopback"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def product_id(i: int) -> str:
    return f"p{i}"


# ---------------------------------------------------------------- loading


def generate_and_produce(
    stack: LocalStack, settings: StackSettings, n: int, seed: int
) -> tuple[np.ndarray, list[int]]:
    """Produce n upserts; returns the vectors (f16, as the shards hold them) and the expected
    count per shard."""
    rng = np.random.default_rng(seed)
    clusters = max(16, n // 1000)
    vectors = np.empty((n, DIM), dtype=np.float16)
    per_shard = [0] * settings.num_shards
    producer = Producer(producer_config(
        stack.kafka_bootstrap, **{"linger.ms": 20, "batch.num.messages": 10000,
                                  "queue.buffering.max.messages": 1_000_000,
                                  "queue.buffering.max.kbytes": 1_048_576}))
    failed: list[str] = []

    def on_delivery(err, _msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            failed.append(str(err))

    chunk = 50_000
    with tqdm(total=n, desc="produce vectors", unit="vec", file=sys.stderr) as bar:
        for start in range(0, n, chunk):
            block = clustered(rng, min(chunk, n - start), DIM, clusters).astype(np.float16)
            vectors[start:start + len(block)] = block
            for j, vec in enumerate(block):
                pid = product_id(start + j)
                partition = partition_for(pid, settings.vector_partitions)
                per_shard[partition % settings.num_shards] += 1
                record = VectorRecord.upsert(
                    pid, 1, MODEL_ID, vec, dtype="f16", title=f"synthetic product {start + j}",
                    image_uri=f"file:///nonexistent/{pid}.jpg",
                )
                while True:
                    try:
                        producer.produce(settings.vectors_topic, record.to_wire(),
                                         key=pid.encode(), partition=partition,
                                         on_delivery=on_delivery)
                        break
                    except BufferError:
                        producer.poll(0.05)
                producer.poll(0)
            bar.update(len(block))
    remaining = producer.flush(300)
    if remaining or failed:
        raise RuntimeError(f"{remaining} undelivered, {len(failed)} failed: {failed[:3]}")
    return vectors, per_shard


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for_shards(stack: LocalStack, per_shard: list[int], timeout_s: float) -> float:
    started = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    with tqdm(total=sum(per_shard) * len(stack.replica_urls[0]), desc="shards indexed",
              unit="vec", file=sys.stderr) as bar:
        while time.monotonic() < deadline:
            held = 0
            done = True
            for shard, urls in enumerate(stack.replica_urls):
                for url in urls:
                    count = get_json(f"{url}/stats")["vectors"]
                    held += min(count, per_shard[shard])
                    done &= count == per_shard[shard]
            bar.update(held - bar.n)
            if done:
                return time.perf_counter() - started
            time.sleep(1.0)
    raise RuntimeError(f"shards did not reach {per_shard} within {timeout_s}s")


# ---------------------------------------------------------------- router metrics

STAGES = ("encode", "fanout", "merge")


async def router_counters(session: aiohttp.ClientSession, router: str) -> dict[str, float]:
    """The router's own counters: hedges, replica outcomes and per-stage time sums/counts."""
    async with session.get(f"{router}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vitrine_router_hedges_total":
                out["hedges"] = out.get("hedges", 0) + sample.value
            elif sample.name == "vitrine_router_replica_requests_total":
                key = "replica_" + sample.labels["outcome"]
                out[key] = out.get(key, 0) + sample.value
            elif sample.name.startswith("vitrine_router_stage_duration_seconds_"):
                suffix = sample.name.rsplit("_", 1)[1]
                if suffix in ("sum", "count"):
                    out[f"{sample.labels['stage']}_{suffix}"] = sample.value
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    for stage in STAGES:
        n = d.get(f"{stage}_count", 0)
        d[f"{stage}_ms"] = d.get(f"{stage}_sum", 0) / n * 1000 if n else float("nan")
    return d


# ---------------------------------------------------------------- open-loop load


@dataclass
class ScenarioResult:
    name: str
    rate: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    partial: int = 0
    empty: int = 0
    sent: int = 0
    seconds: float = 0.0
    router: dict[str, float] = field(default_factory=dict)


async def open_loop(
    session: aiohttp.ClientSession, router: str, name: str, rate: float, texts: list[str],
    max_requests: int, max_seconds: float,
) -> ScenarioResult:
    result = ScenarioResult(name, rate)
    before = await router_counters(session, router)

    async def one(text: str, scheduled: float) -> None:
        try:
            async with session.get(f"{router}/search", params={"q": text, "k": "10"}) as resp:
                body = await resp.json()
                if resp.status != 200:
                    result.errors += 1
                    return
        except (TimeoutError, aiohttp.ClientError):
            result.errors += 1
            return
        result.latencies.append((time.perf_counter() - scheduled) * 1000)
        result.partial += bool(body["partial"])
        result.empty += not body["results"]

    tasks = []
    t0 = time.perf_counter()
    for i in range(max_requests):
        scheduled = t0 + i / rate
        if scheduled - t0 >= max_seconds:
            break
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(texts[i % len(texts)], scheduled)))
    result.sent = len(tasks)
    await asyncio.gather(*tasks)
    result.seconds = time.perf_counter() - t0
    result.router = counter_delta(before, await router_counters(session, router))
    return result


# ---------------------------------------------------------------- sequential / direct


async def sequential_router(
    session: aiohttp.ClientSession, router: str, texts: list[str]
) -> tuple[list[float], list[float], int]:
    client, server, bad = [], [], 0
    for text in texts:
        started = time.perf_counter()
        async with session.get(f"{router}/search", params={"q": text, "k": "10"}) as resp:
            body = await resp.json()
        client.append((time.perf_counter() - started) * 1000)
        if resp.status != 200 or body["partial"] or not body["results"]:
            bad += 1
        else:
            server.append(body["took_ms"])
    return client, server, bad


async def sequential_direct(
    session: aiohttp.ClientSession, url: str, queries: np.ndarray, budget_ms: float
) -> tuple[list[float], int]:
    times, bad = [], 0
    for q in queries:
        started = time.perf_counter()
        wire = SearchRequest.build(q[np.newaxis], 10, budget_ms).to_wire()
        async with session.post(f"{url}/search", data=wire, headers=MSGPACK) as resp:
            body = await resp.read()
        if resp.status == 200:
            SearchResponse.from_wire(body)
        else:
            bad += 1
        times.append((time.perf_counter() - started) * 1000)
    return times, bad


async def recall_at_10(
    session: aiohttp.ClientSession,
    stack: LocalStack,
    vectors: np.ndarray,
    queries: np.ndarray,
    kind: str,
) -> list[tuple[str, float]]:
    """Exact top-10 with numpy vs the merge of every shard's answer, per replica set."""
    exact_scores = []
    exact_ids = []
    for start in range(0, len(vectors), 100_000):
        block = vectors[start:start + 100_000].astype(np.float32) @ queries.T  # (b, nq)
        top = np.argpartition(-block, 10, axis=0)[:10]  # (10, nq)
        exact_ids.append(top + start)
        exact_scores.append(np.take_along_axis(block, top, axis=0))
    ids = np.concatenate(exact_ids)
    scores = np.concatenate(exact_scores)
    order = np.argsort(-scores, axis=0)[:10]
    truth = [{product_id(int(i)) for i in np.take_along_axis(ids, order, axis=0)[:, q]}
             for q in range(len(queries))]

    wire = SearchRequest.build(queries, 10, 60_000).to_wire()
    rows = []
    for replica in range(len(stack.replica_urls[0])):
        responses = []
        for urls in stack.replica_urls:
            async with session.post(f"{urls[replica]}/search", data=wire, headers=MSGPACK) as r:
                responses.append(SearchResponse.from_wire(await r.read()))
        hits = 0
        for q in range(len(queries)):
            got = {hit.product_id for hit in merge_topk(responses, 10, query=q)}
            hits += len(got & truth[q])
        rows.append((f"{kind}, replica set r{replica} (every shard's replica {replica})",
                     hits / (10 * len(queries))))
    return rows


# ---------------------------------------------------------------- tables


def print_header(title: str, args_line: str) -> None:
    print(f"\n## {title}")
    print(f"   machine: {MACHINE}; {args_line}")


def print_load_table(results: list[ScenarioResult]) -> None:
    print(f"{'scenario':<34} {'rate/s':>6} {'sent':>5} {'ok':>5} {'p50':>8} {'p95':>8} "
          f"{'p99':>8} {'max':>8} {'err':>4} {'partial':>8} {'empty':>5}")
    print("-" * 107)
    for r in results:
        ok = len(r.latencies)
        ratio = r.partial / ok if ok else float("nan")
        print(f"{r.name:<34} {r.rate:>6.0f} {r.sent:>5} {ok:>5} "
              f"{percentile(r.latencies, 50):>8.1f} {percentile(r.latencies, 95):>8.1f} "
              f"{percentile(r.latencies, 99):>8.1f} "
              f"{max(r.latencies) if r.latencies else float('nan'):>8.1f} "
              f"{r.errors:>4} {ratio:>8.3f} {r.empty:>5}")
    print("router-side, per scenario (from its /metrics): hedges, replica outcomes, mean ms "
          "per stage")
    print(f"{'scenario':<34} {'hedges':>6} {'rep ok':>6} {'rep err':>7} {'rep t/o':>7} "
          f"{'cancel':>6} " + " ".join(f"{s:>8}" for s in STAGES))
    for r in results:
        m = r.router
        print(f"{r.name:<34} {m.get('hedges', 0):>6.0f} {m.get('replica_ok', 0):>6.0f} "
              f"{m.get('replica_error', 0):>7.0f} {m.get('replica_timeout', 0):>7.0f} "
              f"{m.get('replica_cancelled', 0):>6.0f} "
              + " ".join(f"{m[f'{s}_ms']:>8.2f}" for s in STAGES))


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"{'figure':<{width}}  {'value':>12}")
    print("-" * (width + 14))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>12}")


# ---------------------------------------------------------------- main


async def measure(args: argparse.Namespace, stack: LocalStack, vectors: np.ndarray) -> None:
    rng = np.random.default_rng(args.seed + 1)
    router = stack.router_url
    run = f"run-{os.getpid()}"  # fresh texts per run: cold means cold
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    args_line = f"{args.vectors:,} vectors, 4 shards x 2 replicas, deadline {args.deadline_ms} ms"
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        # warm the connections and the model once
        await sequential_router(session, router, [f"warm up {i}" for i in range(5)])

        # part 5 first, on a quiet stack: sequential, overhead vs one shard replica
        k = args.sequential
        direct_q = unit_vectors(rng, k)
        direct, direct_bad = await sequential_direct(
            session, stack.replica_urls[0][0], direct_q, args.deadline_ms)
        warm_texts = [f"{run} warm query {i % 10}" for i in range(k)]
        await sequential_router(session, router, warm_texts[:10])  # fill the cache
        before = await router_counters(session, router)
        warm, warm_took, warm_bad = await sequential_router(session, router, warm_texts)
        mid = await router_counters(session, router)
        cold, cold_took, cold_bad = await sequential_router(
            session, router, [f"{run} cold sequential {i}" for i in range(k)])
        warm_stages = counter_delta(before, mid)
        cold_stages = counter_delta(mid, await router_counters(session, router))

        # part 6: recall
        recall = await recall_at_10(session, stack, vectors,
                                    near(rng, vectors, args.recall_queries), "near catalog items")
        recall += await recall_at_10(session, stack, vectors,
                                     unit_vectors(rng, args.recall_queries), "random directions")

        # part 3: open loop at each rate, cold texts; one warm-cache scenario
        results = []
        for rate in args.rates:
            texts = [f"{run} cold {rate} query {i}" for i in range(args.requests)]
            results.append(await open_loop(session, router, "cold cache (unique texts)", rate,
                                           texts, args.requests, args.max_seconds))
        warm_set = [f"{run} warm query {i}" for i in range(10)]
        fault_rate = args.fault_rate or min(args.rates)
        results.append(await open_loop(session, router, "warm cache (10 repeated texts)",
                                       fault_rate, warm_set, args.requests, args.max_seconds))

        # part 4: one replica stalled (SIGSTOP for the scenario), then one killed
        faults = []
        stalled = stack.children[args.stall_replica].process
        assert stalled is not None
        os.kill(stalled.pid, signal.SIGSTOP)
        try:
            texts = [f"{run} stalled query {i}" for i in range(args.requests)]
            faults.append(await open_loop(session, router,
                                          f"{args.stall_replica} stalled (SIGSTOP)",
                                          fault_rate, texts, args.requests, args.max_seconds))
        finally:
            os.kill(stalled.pid, signal.SIGCONT)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(stack.stop_child, args.kill_replica)
        texts = [f"{run} killed query {i}" for i in range(args.requests)]
        faults.append(await open_loop(session, router, f"{args.kill_replica} killed",
                                      fault_rate, texts, args.requests, args.max_seconds))
        faults.append(await open_loop(session, router, f"{args.kill_replica} killed, 2nd run",
                                      fault_rate, [t + " b" for t in texts], args.requests,
                                      args.max_seconds))

    print_header("Part 3: open-loop text queries through the router (client-observed ms, "
                 f"at most {args.requests} requests or {args.max_seconds:.0f} s each)", args_line)
    print_load_table(results)
    print_header(f"Part 4: one replica faulty, open loop at {fault_rate:.0f}/s (client ms)",
                 args_line)
    print_load_table(faults)
    print_header(f"Part 5: sequential, {k} requests each (ms)", args_line)
    p = percentile
    ratio50 = p(warm, 50) / p(direct, 50)
    ratio99 = p(warm, 99) / p(direct, 99)
    print_rows([
        ("direct to one shard replica (pre-encoded vector, msgpack) p50", f"{p(direct, 50):.2f}"),
        ("direct to one shard replica p99", f"{p(direct, 99):.2f}"),
        ("router, warm query cache (text) p50", f"{p(warm, 50):.2f}"),
        ("router, warm query cache p99", f"{p(warm, 99):.2f}"),
        ("router / direct shard, p50", f"{ratio50:.2f}x"),
        ("router / direct shard, p99", f"{ratio99:.2f}x"),
        ("router, warm, server took_ms p50", f"{p(warm_took, 50):.2f}"),
        ("router, cold query cache (text, unique) p50", f"{p(cold, 50):.2f}"),
        ("router, cold query cache p99 (target <= 15 ms at 1M)", f"{p(cold, 99):.2f}"),
        ("router, cold, server took_ms p50", f"{p(cold_took, 50):.2f}"),
        ("router, cold, server took_ms p99", f"{p(cold_took, 99):.2f}"),
        ("router, warm, mean ms encode/fanout/merge",
         "/".join(f"{warm_stages[f'{s}_ms']:.2f}" for s in STAGES)),
        ("router, cold, mean ms encode/fanout/merge",
         "/".join(f"{cold_stages[f'{s}_ms']:.2f}" for s in STAGES)),
        ("bad answers (non-200 / partial / empty): direct, warm, cold",
         f"{direct_bad}, {warm_bad}, {cold_bad}"),
    ])
    print_header(f"Part 6: recall@10 vs exact numpy top-10, {args.recall_queries} queries "
                 "of each kind, per-shard answers merged with merge_topk", args_line)
    print_rows([(name, f"{value:.4f}") for name, value in recall])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--rates", default="10,25,50", help="requests/s, comma separated")
    parser.add_argument("--deadline-ms", type=float, default=80.0, help="router deadline")
    parser.add_argument("--requests", type=int, default=300, help="max requests per scenario")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="max per scenario")
    parser.add_argument("--sequential", type=int, default=200, help="K for part 5")
    parser.add_argument("--recall-queries", type=int, default=50)
    parser.add_argument("--fault-rate", type=float, default=0, help="0: the lowest rate")
    parser.add_argument("--index-type", default="auto", help="VITRINE_INDEX_TYPE of the shards")
    parser.add_argument("--stall-replica", default="shard-1")
    parser.add_argument("--kill-replica", default="shard-0-r1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}",
          flush=True)

    with tempfile.TemporaryDirectory(prefix="vitrine-router-load-") as state:
        settings = StackSettings(num_shards=4, shard_replicas=2, router_port=0,
                                 state_dir=Path(state), kafka_bootstrap=None, redis_url=None,
                                 deadline_ms=args.deadline_ms,
                                 service_env={"VITRINE_INDEX_TYPE": args.index_type})
        stack = LocalStack(settings)
        started = time.perf_counter()
        stack.start()
        try:
            start_s = time.perf_counter() - started
            t = time.perf_counter()
            vectors, per_shard = generate_and_produce(stack, settings, args.vectors, args.seed)
            produce_s = time.perf_counter() - t
            index_s = wait_for_shards(stack, per_shard, timeout_s=max(300, args.vectors / 500))
            print_header("Part 1-2: stack start and load", f"{args.vectors:,} vectors")
            print_rows([
                ("stack start (4x2 shards, router, encoder, Tansu, Redis) s", f"{start_s:.1f}"),
                ("produce vectors (dim 384 f16, murmur2 partition) s", f"{produce_s:.1f}"),
                ("produce rate vec/s", f"{args.vectors / produce_s:,.0f}"),
                ("after that, until every replica's /stats matched s", f"{index_s:.1f}"),
                ("vectors per shard", " ".join(map(str, per_shard))),
            ])
            asyncio.run(measure(args, stack, vectors))
        finally:
            for child in stack.children.values():  # never leave a stopped process behind
                if child.process is not None and child.process.poll() is None:
                    with contextlib.suppress(OSError):
                        os.kill(child.process.pid, signal.SIGCONT)
            stack.stop()


if __name__ == "__main__":
    main()
