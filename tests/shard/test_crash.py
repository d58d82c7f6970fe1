"""kill -9 a shard in the middle of an ingest: after its restart the fleet holds exactly the
products the events say, each at its latest version, each on one shard."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import stage_image
from tests.helpers import content, eventually, expected_content, script
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack
from vitrine.cli.status import probe
from vitrine.kafka import partition_for

pytestmark = pytest.mark.stack

PRODUCTS = 2000


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
