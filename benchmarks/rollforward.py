"""Model roll-forward on the local stack: backfill rate, shard memory with one model and with
two, and query latency during the backfill against before (prints a table; not a test).

    .venv/bin/python benchmarks/rollforward.py [--products 1000] [--queries 300]
        [--data ../shared/data/fashion]

1. a 2-shard stack indexes `--products` real products with the shipped model;
2. sequential cold-cache text queries (every text new) through the router: p50/p99 before;
3. `ModelRollout.add` a candidate (the shipped model with its text tower in int8: a model id of
   its own that loads offline) and, while its encoder backfills from the active model's vector
   log, the same number of new texts: p50/p99 during, and the ratio to before;
4. the backfill rate (products/s from the add, and from its encoder being ready, until every
   shard holds the candidate in full) and, per shard, resident memory and index bytes with one
   model and with two.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.models import ModelRollout, ServingTarget, coverage
from vitrine.cli.stack import LocalStack, StackSettings
from vitrine.registry import read_registry, settings_entry

HERE = Path(__file__).resolve().parent


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def shard_memory(stack: LocalStack) -> list[tuple[float, int]]:
    """(resident MB, index bytes of every model) per shard."""
    import json

    found = []
    for s, url in enumerate(stack.shard_urls):
        with urllib.request.urlopen(f"{url}/stats", timeout=10) as response:
            stats = json.loads(response.read())
        process = stack.children[f"shard-{s}"].process
        assert process is not None
        found.append((rss_mb(process.pid), int(stats["total_index_bytes"])))
    return found


def latencies(router: str, texts: list[str], stop: threading.Event | None = None) -> np.ndarray:
    took = []
    for text in texts:
        if stop is not None and stop.is_set():
            break
        url = f"{router}/search?{urllib.parse.urlencode({'q': text, 'k': 10, 'mode': 'dense'})}"
        started = time.perf_counter()
        with urllib.request.urlopen(url, timeout=30) as response:
            response.read()
        took.append((time.perf_counter() - started) * 1000)
    return np.array(took)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared/data/fashion")
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    data = args.data.resolve()
    with tempfile.TemporaryDirectory() as state:
        settings = StackSettings(num_shards=2, router_port=0, state_dir=Path(state),
                                 image_file_root=data, kafka_bootstrap=None, redis_url=None,
                                 deadline_ms=5000)
        stack = LocalStack(settings)
        stack.start()
        try:
            run(stack, data, args.products, args.queries)
        finally:
            stack.stop()


def run(stack: LocalStack, data: Path, products: int, queries: int) -> None:
    events = list(events_from_csv(data / "products.csv", data / "images", products))
    publisher = EventPublisher(stack.kafka_bootstrap, stack.settings.events_topic,
                               stack.settings.event_partitions)
    for event in events:
        publisher.publish(event)
    publisher.flush()
    rollout = ModelRollout(stack)
    active = settings_entry(stack.kafka_settings()).model_id
    wait_for(lambda: covered(stack, active, len(events)), "catalog indexed")
    texts = [e.title for e in itertools.islice(
        events_from_csv(data / "products.csv", data / "images", products + 2 * queries),
        products, None)]  # titles of products not in the catalog: new texts, cold cache
    before_texts, during_texts = texts[:queries], texts[queries:]
    one_model = shard_memory(stack)
    before = latencies(stack.router_url, before_texts)

    added = time.monotonic()
    entry = rollout.add(None, settings_entry(stack.kafka_settings()).weights, 0, "onnx-int8",
                        lambda line: None)
    encoding = time.monotonic()  # its encoder loaded the model and is ready
    stop = threading.Event()
    during: list[np.ndarray] = []
    shopper = threading.Thread(target=lambda: during.append(
        latencies(stack.router_url, during_texts, stop)))
    shopper.start()
    wait_for(lambda: covered(stack, entry.model_id, len(events)), "candidate covering",
             timeout_s=3600)
    backfill_s, encoding_s = time.monotonic() - added, time.monotonic() - encoding
    stop.set()
    shopper.join()
    two_models = shard_memory(stack)
    measured = during[0]

    rows = [
        ("catalog", f"{len(events):,} products, 2 shards"),
        ("backfill: `add` until every shard holds the candidate in full",
         f"{backfill_s:.1f} s = {len(events) / backfill_s:.1f} products/s"),
        ("  of which its encoder, once loaded, re-encoding",
         f"{encoding_s:.1f} s = {len(events) / encoding_s:.1f} products/s"),
    ]
    for s, ((rss1, bytes1), (rss2, bytes2)) in enumerate(zip(one_model, two_models, strict=True)):
        rows.append((f"shard-{s} resident / index bytes, 1 model -> 2 models",
                     f"{rss1:,.0f} -> {rss2:,.0f} MB / {bytes1 / 2**20:.1f} -> "
                     f"{bytes2 / 2**20:.1f} MiB"))
    p50b, p99b = np.percentile(before, [50, 99])
    p50d, p99d = np.percentile(measured, [50, 99])
    rows += [
        (f"cold text queries before ({len(before)})", f"p50 {p50b:.1f} ms, p99 {p99b:.1f} ms"),
        (f"cold text queries during the backfill ({len(measured)})",
         f"p50 {p50d:.1f} ms, p99 {p99d:.1f} ms"),
        ("during / before", f"p50 {p50d / p50b:.2f}x, p99 {p99d / p99b:.2f}x"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'what'.ljust(width)} | measured |\n| {'-' * width} | --- |")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


def covered(stack: LocalStack, model_id: str, products: int) -> bool:
    registry = read_registry(stack.kafka_settings())
    found = {c.model_id: c for c in coverage(registry, ServingTarget.of_stack(stack))}
    return model_id in found and found[model_id].index.vectors >= products and \
        not found[model_id].problems()


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not after {timeout_s:g} s")
        time.sleep(0.5)


if __name__ == "__main__":
    main()
