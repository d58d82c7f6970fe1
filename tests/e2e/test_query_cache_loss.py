"""Redis is only the query-vector cache: kill it under traffic and nothing but latency changes.

The shared stack's redis-server is SIGKILLed while shoppers query text (known and new) and load
product images, then started again, empty. Every answer along the way is a 200, complete, and
the same answer (ids, titles, image URIs) as before the kill: what a hit shows comes from the
shards, which rebuild it from the log, never from Redis.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis

from proto.catalog import CatalogEvent
from tests.conftest import stage_image
from tests.helpers import eventually, http_json, scrape
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack

pytestmark = pytest.mark.stack

ROWS = (4600, 4660)  # rows of products.csv that no other test publishes


def shown(answer: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(h["product_id"], h["title"], h["image_uri"]) for h in answer["results"]]


def query(router: str, text: str) -> tuple[int, dict[str, Any]]:
    return http_json(f"{router}/search?{urllib.parse.urlencode({'q': text, 'k': 8})}")


def image_status(router: str, product_id: str) -> int:
    try:
        with urllib.request.urlopen(f"{router}/images/{product_id}", timeout=30) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def redis_up(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def cache_errors(router: str) -> float:
    return sum(v for (name, _), v in scrape(router).items()
               if name == "vitrine_router_query_cache_errors_total")


@pytest.fixture(scope="module")
def products(stack: LocalStack, fashion_data: Path, image_root: Path) -> list[CatalogEvent]:
    rows = list(itertools.islice(events_from_csv(fashion_data / "products.csv", image_root), *ROWS))
    s = stack.settings
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
        publisher.publish(event)
    publisher.flush()
    for event in rows:  # each is on its shard, with its fields, before the test begins
        eventually(lambda e=event: image_status(stack.router_url, e.product_id) == 200,
                   what=f"{event.product_id} indexed")
    return rows


def test_losing_redis_under_traffic_costs_no_answer(
    stack: LocalStack, products: list[CatalogEvent]
) -> None:
    router = stack.router_url
    known = [event.title for event in products[:6]] + ["red dress", "leather watch"]
    before = {}
    for text in known:
        status, answer = query(router, text)
        assert status == 200 and not answer["partial"] and answer["results"], answer
        before[text] = shown(answer)
    assert any(title for _, title, _ in before[known[0]]), "hits show their titles"
    errors_before = cache_errors(router)

    seen: list[tuple[str, int, bool]] = []  # what, HTTP status, complete
    changed: list[str] = []
    stop = threading.Event()

    def shop() -> None:
        for n in itertools.count():
            if stop.is_set():
                return
            text = known[n % len(known)]
            status, answer = query(router, text)
            seen.append((text, status, status == 200 and not answer["partial"]))
            if status == 200 and shown(answer) != before[text]:
                changed.append(text)
            status, answer = query(router, f"blue shirt number {n}")  # new: asks Redis
            seen.append(("new text", status, status == 200 and not answer["partial"]))
            product = products[n % len(products)].product_id
            seen.append((f"image {product}", image_status(router, product), True))

    shopper = threading.Thread(target=shop)
    shopper.start()
    try:
        time.sleep(1.0)
        stack.stop_child("redis", sig=signal.SIGKILL)
        eventually(lambda: cache_errors(router) > errors_before, timeout_s=30,
                   what="the router to notice that Redis is gone")
        time.sleep(2.0)  # queries go on without it
        down = len(seen)
        stack.start_child("redis", wait=False)
        eventually(lambda: redis_up(stack.redis_url), timeout_s=30, what="redis back")
        time.sleep(2.0)
    finally:
        stop.set()
        shopper.join()
    bad = [entry for entry in seen if entry[1] != 200 or not entry[2]]
    assert not bad, bad[:10]
    assert not changed, changed
    assert down > 10 and len(seen) > down, "shoppers were served while Redis was down and after"
    for text in known:  # and after it is back, empty
        status, answer = query(router, text)
        assert status == 200 and shown(answer) == before[text]
    cache = redis.Redis.from_url(stack.redis_url)
    eventually(lambda: query(router, "a brand new query")[0] == 200 and cache.dbsize() > 0,
               timeout_s=30, what="the cache to fill again once Redis is back")
