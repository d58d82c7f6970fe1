"""kill -9 a shard in the middle of an ingest: after its restart the fleet holds exactly the
products the events say, each at its latest version, each on one shard."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import urllib.request
from pathlib import Path

import msgpack
import pytest

from proto.catalog import CatalogEvent
from tests.conftest import stage_image
from tests.helpers import eventually
from vitrine.ingest import EventPublisher, events_from_csv
from vitrine.kafka import partition_for
from vitrine.stack import LocalStack
from vitrine.status import probe

pytestmark = pytest.mark.stack

PRODUCTS = 2000


def content(shard_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{shard_url}/content", timeout=30) as response:
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


def expected_content(stream: list[CatalogEvent]) -> dict[str, int]:
    latest: dict[str, CatalogEvent] = {}
    for event in stream:
        if event.product_id not in latest or event.version > latest[event.product_id].version:
            latest[event.product_id] = event
    return {pid: e.version for pid, e in latest.items() if e.op == "upsert"}


def test_kill_9_during_ingest_loses_and_duplicates_nothing(
    stack: LocalStack, fashion_data: Path, image_root: Path
) -> None:
    s = stack.settings
    rows = list(
        itertools.islice(
            events_from_csv(fashion_data / "products.csv", image_root), 1000, 1000 + PRODUCTS
        )
    )
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    stream = script(rows)
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)

    def publish_steadily() -> None:
        for i, event in enumerate(stream):
            publisher.publish(event)
            if i % 100 == 99:
                publisher.flush()
                time.sleep(0.3)
        publisher.flush()

    feeder = threading.Thread(target=publish_steadily)
    feeder.start()
    victim = stack.children["shard-0"]
    eventually(lambda: len(content(stack.shard_urls[0])) > 100, what="ingest under way")
    assert victim.process is not None
    old = victim.process
    os.kill(old.pid, signal.SIGKILL)
    old.wait()
    if stack._supervisor is None:
        stack.start_child("shard-0", wait=False)
    eventually(
        lambda: victim.process is not old and probe(f"{stack.shard_urls[0]}/readyz")[0] == 200,
        what="shard-0 back and caught up",
    )
    feeder.join()

    expected = expected_content(stream)
    ours = set(expected) | {e.product_id for e in stream}

    def fleet() -> dict[int, dict[str, int]]:
        return {
            shard: {pid: v for pid, v in content(url).items() if pid in ours}
            for shard, url in enumerate(stack.shard_urls)
        }

    def settled() -> dict[int, dict[str, int]] | None:
        held = fleet()
        merged = {pid: v for part in held.values() for pid, v in part.items()}
        return held if merged == expected else None

    held = eventually(settled, timeout_s=240, what="the fleet to hold exactly the expected set")
    assert sum(len(part) for part in held.values()) == len(expected)  # no product on two shards
    for shard, part in held.items():
        for pid in part:
            assert partition_for(pid, s.vector_partitions) % s.num_shards == shard
