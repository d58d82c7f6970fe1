"""A shard restarted on the real stack resumes from its snapshot and the log."""

from __future__ import annotations

import itertools
from pathlib import Path
from urllib.parse import quote_plus

import msgpack
import numpy as np
import pytest
from confluent_kafka import Producer

from proto.catalog import CatalogEvent
from proto.vectors import VectorRecord
from tests.conftest import stage_image
from tests.helpers import (
    eventually,
    http_json,
    latest_events,
    scrape,
    shard_vectors,
)
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack
from vitrine.kafka import partition_for, producer_config
from vitrine.registry import settings_entry

pytestmark = pytest.mark.stack

MODEL_DIM = 384  # the shipped model's vectors: a shard refuses another dimension


def records(shard_url: str, model_id: str, outcome: str = "applied") -> float:
    labels = (("model", model_id), ("outcome", outcome))
    return scrape(shard_url).get(("vitrine_shard_records_total", labels), 0.0)


def vectors(shard_url: str) -> int:
    return shard_vectors([shard_url])


def test_a_restarted_shard_resumes_from_its_snapshot(
    stack: LocalStack, fashion_data: Path, image_root: Path
) -> None:
    s = stack.settings
    shard0 = stack.shard_urls[0]

    def owned(pid: str) -> bool:
        return partition_for(pid, s.vector_partitions) % s.num_shards == 0

    rows = list(
        itertools.islice(events_from_csv(fashion_data / "products.csv", image_root), 600, 680)
    )
    for event in rows:
        stage_image(fashion_data, image_root, event.product_id)
    first, later = rows[:60], rows[60:]
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    before = vectors(shard0)
    for event in first:
        publisher.publish(event)
    publisher.flush()
    expected = before + sum(owned(e.product_id) for e in first)
    eventually(lambda: vectors(shard0) == expected, what="the first products on shard 0")

    stack.stop_child("shard-0")  # graceful: writes a snapshot on the way out
    snapshots = list((s.state_dir / "snapshots" / "shard-0").glob("snapshot-*"))
    assert snapshots, "no snapshot written on shutdown"

    victim = next(e for e in first if owned(e.product_id))
    retitled = [  # title-only updates of products the snapshot holds
        e.model_copy(update={"version": e.version + 1, "title": f"renamed {e.product_id}"})
        for e in first if owned(e.product_id) and e is not victim
    ][:5]
    deleted = CatalogEvent(op="delete", product_id=victim.product_id, version=victim.version + 1)
    for event in [*later, *retitled, deleted]:
        publisher.publish(event)
    publisher.flush()
    stack.start_child("shard-0")  # ready only once caught up with the log

    stats = http_json(f"{shard0}/stats")[1]
    assert stats["restored_from"] == "snapshot"
    new_products = sum(owned(e.product_id) for e in later)
    new_records = new_products + len(retitled) + 1  # + the tombstone
    eventually(
        lambda: vectors(shard0) == expected + new_products - 1,
        what="the later products and the delete on shard 0",
    )
    # it replayed only what came after the snapshot, not the whole log
    model = settings_entry(s).model_id
    eventually(lambda: records(shard0, model) == new_records, what="every later record")
    mine = [e for e in [*first, *later, *retitled, deleted] if owned(e.product_id)]
    renamed = retitled[0]  # the restarted shard's lexical index knows the new title only
    status, found = http_json(f"{stack.router_url}/search?q={quote_plus(renamed.title)}"
                              "&mode=lexical&collapse=false")
    assert status == 200 and renamed.product_id in [h["product_id"] for h in found["results"]]
    if victim.title.strip():  # the deleted product's words no longer find it
        status, gone = http_json(f"{stack.router_url}/search?q={quote_plus(victim.title)}"
                                 "&mode=lexical&k=100&collapse=false")
        assert status == 200
        assert victim.product_id not in [h["product_id"] for h in gone["results"]]
    for pid, event in latest_events(mine).items():
        status, held = http_json(f"{shard0}/products/{pid}")
        if event.op == "delete":
            assert status == 404
        else:
            assert status == 200 and (held["title"], held["version"]) == (event.title,
                                                                           event.version)


def test_a_vector_record_of_the_release_before_is_still_read(stack: LocalStack) -> None:
    """A version 1 record (no title, no image URI) straight into catalog.vectors, bytes as the
    release before wrote them: the owning shard applies it, then a v2 update on top."""
    s = stack.settings
    vector = np.zeros(MODEL_DIM, dtype=np.float32)
    vector[0] = 1.0
    pid = "legacy-v1-record"
    model = settings_entry(s).model_id  # the model the stack serves
    written_by_v1 = msgpack.packb({
        "schema_version": 1, "op": "upsert", "product_id": pid, "version": 5, "model_id": model,
        "dim": MODEL_DIM, "dtype": "f32", "vector": vector.tobytes(), "event_time_ms": 0,
        "attributes": {"colour": "Red"},
    }, use_bin_type=True)
    partition = partition_for(pid, s.vector_partitions)
    owner = stack.shard_urls[partition % s.num_shards]
    producer = Producer(producer_config(stack.kafka_bootstrap))
    producer.produce(s.vectors_topic, written_by_v1, key=pid.encode(), partition=partition)
    assert producer.flush(30) == 0

    def held() -> dict | None:
        status, product = http_json(f"{owner}/products/{pid}")
        return product if status == 200 else None

    eventually(held, what="the v1 record applied")
    assert held() == {"product_id": pid, "version": 5, "title": "", "image_uri": "",
                      "attributes": {"colour": "Red"}, "price": None, "in_stock": None,
                      "image_digest": ""}
    update = VectorRecord.upsert(pid, 6, model, vector, title="now titled",
                                 image_uri="file:///nowhere.jpg")
    producer.produce(s.vectors_topic, update.to_wire(), key=pid.encode(), partition=partition)
    assert producer.flush(30) == 0
    eventually(lambda: http_json(f"{owner}/products/{pid}")[1].get("title") == "now titled",
               what="the v2 update on top")
    tombstone = VectorRecord.tombstone(pid, 7, model)
    producer.produce(s.vectors_topic, tombstone.to_wire(), key=pid.encode(), partition=partition)
    assert producer.flush(30) == 0
    eventually(lambda: http_json(f"{owner}/products/{pid}")[0] == 404, what="deleted again")


def test_a_vector_of_another_model_on_the_topic_is_refused(stack: LocalStack) -> None:
    """One index never holds two models: a record naming another model is counted as
    rejected and leaves the product as it was."""
    s = stack.settings
    pid = "another-models-vector"
    partition = partition_for(pid, s.vector_partitions)
    owner = stack.shard_urls[partition % s.num_shards]
    rejected_before = records(owner, settings_entry(s).model_id, "rejected")
    stranger = VectorRecord.upsert(pid, 1, "some-other-model@v9", np.ones(MODEL_DIM),
                                   title="from elsewhere")
    producer = Producer(producer_config(stack.kafka_bootstrap))
    producer.produce(s.vectors_topic, stranger.to_wire(), key=pid.encode(), partition=partition)
    assert producer.flush(30) == 0
    eventually(lambda: records(owner, settings_entry(s).model_id, "rejected") > rejected_before,
               what="the record counted as rejected")
    assert http_json(f"{owner}/products/{pid}")[0] == 404
