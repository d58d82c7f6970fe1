"""Pipeline figures on the local stack (prints a table; not a test).

    .venv/bin/python benchmarks/pipeline.py [--data ../shared/data/fashion] [--throughput 1000]
        [--latency-only]

1. router latency p50/p99 over 200 sequential text queries, 2 shards, 300 products: new texts
   (the text tower runs each time) and repeated ones (the query cache answers, so the figure is
   the router's own path: fan-out, merge, HTTP and JSON);
2. encoder throughput: events/s from publish until every event is searchable;
3. publish-to-searchable time of a single event (p50 of 20).
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.main import wait_until_indexed
from vitrine.cli.stack import LocalStack, StackSettings

QUERIES = [
    "red dress", "black leather shoes", "blue denim jeans", "white sports shoes", "gold watch",
    "green t-shirt", "women handbag", "men formal shirt", "pink kurta", "sunglasses",
]


def get_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body else None
    headers = {"Content-Type": "application/json"} if body else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def router_latency(
    stack: LocalStack, n: int = 200, repeated: bool = False
) -> tuple[list[float], list[float]]:
    """(client-observed ms, router-reported took_ms) over n sequential text queries."""
    client, server = [], []
    for i in range(n):
        text = QUERIES[i % len(QUERIES)] + ("" if repeated else f" {i}")
        q = urllib.parse.urlencode({"q": text, "k": 10})
        started = time.perf_counter()
        answer = get_json(f"{stack.router_url}/search?{q}")
        client.append((time.perf_counter() - started) * 1000)
        server.append(answer["took_ms"])
    return client, server


def freshness(
    stack: LocalStack, publisher: EventPublisher, events: list, n: int = 20
) -> list[float]:
    """Publish one event at a time and poll image search until it is the top hit."""
    times = []
    for event in events[:n]:
        image = base64.b64encode(Path(urllib.parse.urlparse(event.image_uri).path).read_bytes())
        started = time.perf_counter()
        publisher.publish(event)
        publisher.flush()
        while True:
            answer = get_json(f"{stack.router_url}/search", {"image_b64": image.decode(), "k": 1})
            if answer["results"] and answer["results"][0]["product_id"] == event.product_id:
                break
            time.sleep(0.005)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion"))
    parser.add_argument("--throughput", type=int, default=1000, help="events for the rate run")
    parser.add_argument("--latency-only", action="store_true", help="part 1 only")
    args = parser.parse_args()
    data = args.data.resolve()
    events = list(events_from_csv(data / "products.csv", data / "images",
                                  300 + args.throughput + 20))
    with tempfile.TemporaryDirectory() as state:
        settings = StackSettings(num_shards=2, router_port=0, state_dir=Path(state),
                                 image_file_root=data, kafka_bootstrap=None, redis_url=None)
        stack = LocalStack(settings)
        stack.start()
        try:
            publisher = EventPublisher(stack.kafka_bootstrap, settings.events_topic,
                                       settings.event_partitions)
            for event in events[:300]:
                publisher.publish(event)
            publisher.flush()
            wait_until_indexed(stack, 300)
            client, server = router_latency(stack)
            router_latency(stack, len(QUERIES), repeated=True)  # fills the query cache
            warm_client, warm_server = router_latency(stack, repeated=True)
            if args.latency_only:  # the stack stops on the way out
                print_rows(latency_rows(client, server, warm_client, warm_server))
                return

            batch = events[300:300 + args.throughput]
            started = time.perf_counter()
            for event in batch:
                publisher.publish(event)
            publisher.flush()
            wait_until_indexed(stack, 300 + len(batch))
            rate = len(batch) / (time.perf_counter() - started)

            fresh = freshness(stack, publisher, events[300 + args.throughput:])
        finally:
            stack.stop()

    print_rows(latency_rows(client, server, warm_client, warm_server) + [
        (f"encoder throughput, {len(batch)} events (events/s, batch 32)", rate),
        ("publish-to-searchable p50 of 20 (ms)", statistics.median(fresh)),
        ("publish-to-searchable max of 20 (ms)", max(fresh)),
    ])


def latency_rows(
    client: list[float], server: list[float], warm_client: list[float], warm_server: list[float]
) -> list[tuple[str, float]]:
    return [
        ("router latency, new texts, client p50 (ms)", statistics.median(client)),
        ("router latency, new texts, client p99 (ms)", percentile(client, 99)),
        ("router took_ms, new texts, p50 (ms)", statistics.median(server)),
        ("router took_ms, new texts, p99 (ms)", percentile(server, 99)),
        ("router latency, cached texts, client p50 (ms)", statistics.median(warm_client)),
        ("router latency, cached texts, client p99 (ms)", percentile(warm_client, 99)),
        ("router took_ms, cached texts, p50 (ms)", statistics.median(warm_server)),
        ("router took_ms, cached texts, p99 (ms)", percentile(warm_server, 99)),
    ]


def print_rows(rows: list[tuple[str, float]]) -> None:
    print(f"\n{'figure':<58} {'value':>10}")
    print("-" * 69)
    for name, value in rows:
        print(f"{name:<58} {value:>10.2f}")


if __name__ == "__main__":
    main()
