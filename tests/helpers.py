"""Small clients the end-to-end tests use to talk to the running stack."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgpack
from confluent_kafka import Consumer
from prometheus_client.parser import text_string_to_metric_families

from proto.catalog import CatalogEvent
from proto.dlq import DeadLetter
from vitrine.cli.control import ControlServer
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack, StackSettings
from vitrine.kafka import consumer_config, partition_for

T = TypeVar("T")


def http_json(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def search_text(router: str, text: str, k: int = 10) -> dict[str, Any]:
    status, answer = http_json(f"{router}/search?{urllib.parse.urlencode({'q': text, 'k': k})}")
    assert status == 200, answer
    return answer


def search_image(router: str, image: Path, k: int = 10, **options: Any) -> dict[str, Any]:
    encoded = base64.b64encode(image.read_bytes()).decode()
    status, answer = http_json(f"{router}/search", {"image_b64": encoded, "k": k, **options})
    assert status == 200, answer
    return answer


def ids_of(answer: dict[str, Any]) -> list[str]:
    return [hit["product_id"] for hit in answer["results"]]


@dataclass(frozen=True)
class Answered:
    status: int
    partial: bool
    shards_total: int
    model_id: str
    reason: str | None = None  # why it was partial, or the error


@dataclass
class Shopper:
    """Queries the router all along (in a thread: `run`), recording what each answer said."""

    router: str
    answers: list[Answered] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for text in itertools.cycle(["red dress", "black shoes", "blue jeans", "watch"]):
            if self.done.is_set():
                return
            url = f"{self.router}/search?{urllib.parse.urlencode({'q': text, 'k': 5})}"
            status, answer = http_json(url)
            self.answers.append(Answered(
                status, answer.get("partial", True),
                answer.get("coverage", {}).get("shards_total", 0), answer.get("model_id", ""),
                answer.get("partial_reason") or answer.get("error"),
            ))
            time.sleep(0.02)  # steady, and leaves the 2 cores to the work under test

    def served_throughout(self) -> bool:
        return bool(self.answers) and all(a.status == 200 and not a.partial
                                          for a in self.answers)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """A service's /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def eventually(check: Callable[[], T | None], timeout_s: float = 120, what: str = "") -> T:
    """Poll until `check` returns something truthy; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def shard_vectors(shard_urls: list[str]) -> int:
    total = 0
    for url in shard_urls:
        with urllib.request.urlopen(f"{url}/stats", timeout=10) as response:
            total += json.loads(response.read())["vectors"]
    return total


class DeadLetterReader:
    """Reads catalog.events.dlq from the start, indexing dead letters by message key."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        config = consumer_config(bootstrap, f"test-dlq-{time.monotonic_ns()}")
        self._consumer = Consumer(config)
        self._consumer.subscribe([topic])
        self.by_key: dict[bytes | None, DeadLetter] = {}

    def wait_for(self, keys: set[bytes], timeout_s: float = 120) -> dict[bytes, DeadLetter]:
        deadline = time.monotonic() + timeout_s
        while not keys <= self.by_key.keys() and time.monotonic() < deadline:
            for message in self._consumer.consume(100, 0.5):
                if message.error() is None:
                    letter = DeadLetter.from_wire(message.value())
                    self.by_key[letter.key] = letter
        missing = keys - self.by_key.keys()
        assert not missing, f"no dead letter for {sorted(missing)}"
        return {key: self.by_key[key] for key in keys}

    def close(self) -> None:
        self._consumer.close()


# auditing shard content against the events (tests/shard/test_crash.py, tests/e2e/test_reshard.py)


def content(shard_url: str, model_id: str | None = None) -> dict[str, int]:
    """Every live product id -> version a shard holds (of one model; default the active)."""
    query = f"?{urllib.parse.urlencode({'model': model_id})}" if model_id else ""
    with urllib.request.urlopen(f"{shard_url}/content{query}", timeout=30) as response:
        return msgpack.unpackb(response.read())  # type: ignore[no-any-return]


def script(events: list[CatalogEvent]) -> list[CatalogEvent]:
    """The upserts, with every 10th product updated and every 25th deleted later on."""
    stream = list(events)
    for i, event in enumerate(events):
        if i % 10 == 3:
            stream.append(event.model_copy(update={"version": event.version + 1, "title": "v2"}))
        if i % 25 == 7:
            stream.append(
                CatalogEvent(op="delete", product_id=event.product_id, version=event.version + 2)
            )
    return stream


def latest_events(stream: list[CatalogEvent]) -> dict[str, CatalogEvent]:
    latest: dict[str, CatalogEvent] = {}
    for event in stream:
        if event.product_id not in latest or event.version > latest[event.product_id].version:
            latest[event.product_id] = event
    return latest


def expected_content(stream: list[CatalogEvent]) -> dict[str, int]:
    return {pid: e.version for pid, e in latest_events(stream).items() if e.op == "upsert"}


def assert_shards_show_latest_fields(
    shard_urls: list[str], partitions: int, stream: list[CatalogEvent]
) -> None:
    """Each product's owning shard shows the fields of its latest event; deleted ones 404."""
    wrong = []
    for pid, event in latest_events(stream).items():
        owner = shard_urls[partition_for(pid, partitions) % len(shard_urls)]
        status, held = http_json(f"{owner}/products/{pid}")
        if event.op == "delete":
            if status != 404:
                wrong.append((pid, "deleted, still held", status))
            continue
        want = {"product_id": pid, "version": event.version, "title": event.title,
                "image_uri": event.image_uri, "attributes": event.attributes,
                "price": event.price, "in_stock": event.in_stock}
        digest = held.pop("image_digest", None) if status == 200 else None
        if (status, held) != (200, want) or not re.fullmatch(r"[0-9a-f]{32}", digest or ""):
            wrong.append((pid, want, held, digest))
    assert not wrong, wrong[:5]


# stacks of their own (tests/e2e/test_reshard.py, tests/e2e/test_models.py)


@contextlib.contextmanager
def supervised_stack(settings: StackSettings) -> Iterator[LocalStack]:
    """`vitrine up` in miniature: supervised, with the control server the CLI talks to."""
    stack = LocalStack(settings)
    stack.start()
    stack.supervise()
    control = ControlServer(stack)
    control.start()
    try:
        yield stack
    finally:
        control.stop()
        stack.stop()


def publish(stack: LocalStack, events: list[CatalogEvent]) -> None:
    s = stack.settings
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for event in events:
        publisher.publish(event)
    publisher.flush()
