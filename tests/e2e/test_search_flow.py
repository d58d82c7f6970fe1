"""End to end on the real stack: events in through Kafka, products out through the router."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from PIL import Image

from proto.catalog import CatalogEvent
from proto.dlq import DeadLetter
from tests.conftest import stage_image
from tests.helpers import (
    DeadLetterReader,
    eventually,
    http_json,
    ids_of,
    scrape,
    search_image,
    search_text,
    shard_vectors,
)
from vitrine.catalog import events_from_csv
from vitrine.cli.ingest import EventPublisher
from vitrine.cli.stack import LocalStack
from vitrine.model import load_dual_encoder, product_text
from vitrine.settings import CommonSettings

pytestmark = pytest.mark.stack

CATALOG_SIZE = 300


@dataclass
class Catalog:
    events: list[CatalogEvent]
    unique_image_ids: list[str]
    dead: dict[bytes, DeadLetter]
    publisher: EventPublisher
    spare_image: Path  # an image no published product has
    baseline: int  # vectors already held before this module published


@pytest.fixture(scope="module")
def image_server(image_root: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving real images: the SSRF guard must refuse it."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _bad_events(image_root: Path, fashion_data: Path, image_server: str) -> dict[bytes, bytes]:
    """Key -> raw message value, one per kind of bad input."""
    (image_root / "big.jpg").write_bytes(b"\xff\xd8" + b"\0" * 600_000)
    bomb = io.BytesIO()
    Image.new("L", (8000, 8000)).save(bomb, format="PNG")
    (image_root / "bomb.png").write_bytes(bomb.getvalue())
    (image_root / "notes.jpg").write_text("this is not an image")

    def event(pid: str, uri: str) -> bytes:
        return CatalogEvent(op="upsert", product_id=pid, version=1, image_uri=uri).to_wire()

    good = event("bad-truncated", (image_root / "x.jpg").as_uri())
    return {
        b"bad-malformed": msgpack.packb(
            {"schema_version": 1, "op": "upsert", "product_id": "bad-malformed", "version": "x"}
        ),
        b"bad-truncated": good[: len(good) - 7],
        b"bad-version": msgpack.packb(
            {"schema_version": 99, "op": "upsert", "product_id": "bad-version", "version": 1}
        ),
        b"bad-missing-image": event("bad-missing-image", (image_root / "gone.jpg").as_uri()),
        b"bad-loopback": event("bad-loopback", f"{image_server}/big.jpg"),
        b"bad-outside-root": event(
            "bad-outside-root", (fashion_data / "images" / "10000.jpg").as_uri()
        ),
        b"bad-oversized": event("bad-oversized", (image_root / "big.jpg").as_uri()),
        b"bad-bomb": event("bad-bomb", (image_root / "bomb.png").as_uri()),
        b"bad-not-an-image": event("bad-not-an-image", (image_root / "notes.jpg").as_uri()),
    }


@pytest.fixture(scope="module")
def catalog(
    stack: LocalStack, fashion_data: Path, image_root: Path, image_server: str
) -> Iterator[Catalog]:
    rows = list(events_from_csv(fashion_data / "products.csv", image_root, CATALOG_SIZE + 1))
    events, spare = rows[:CATALOG_SIZE], rows[CATALOG_SIZE]
    for e in rows:
        stage_image(fashion_data, image_root, e.product_id)
    bad = _bad_events(image_root, fashion_data, image_server)
    bad_keys = set(bad)
    s = stack.settings
    baseline = shard_vectors(stack.shard_urls)  # other modules' products, if they ran first
    publisher = EventPublisher(stack.kafka_bootstrap, s.events_topic, s.event_partitions)
    for i, e in enumerate(events):
        publisher.publish(e)
        if i % 30 == 0 and bad:  # bad events interleaved with good ones
            key, value = bad.popitem()
            publisher.publish_raw(key, value)
    publisher.flush()

    reader = DeadLetterReader(stack.kafka_bootstrap, s.dlq_topic)
    eventually(
        lambda: shard_vectors(stack.shard_urls) == baseline + CATALOG_SIZE,
        what="300 products indexed",
    )
    dead = reader.wait_for(bad_keys)
    reader.close()

    digests = Counter(
        hashlib.sha256((image_root / f"{e.product_id}.jpg").read_bytes()).digest() for e in events
    )
    unique = [
        e.product_id
        for e in events
        if digests[hashlib.sha256((image_root / f"{e.product_id}.jpg").read_bytes()).digest()] == 1
    ]
    yield Catalog(events, unique, dead, publisher, image_root / f"{spare.product_id}.jpg", baseline)


def test_searching_by_a_products_own_image_finds_it_first(
    stack: LocalStack, catalog: Catalog, image_root: Path
) -> None:
    # The index holds fused product vectors (picture + the event's text), so the best score is
    # the cosine of the picture's vector with its product's fused vector, computed here with
    # the same model spec, independently of the services.
    model = load_dual_encoder(CommonSettings().model_spec(), "cpu")
    events = {event.product_id: event for event in catalog.events}
    for pid in catalog.unique_image_ids[:50]:
        answer = search_image(stack.router_url, image_root / f"{pid}.jpg", k=5)
        assert ids_of(answer)[0] == pid, (pid, answer["results"][:2])
        with Image.open(image_root / f"{pid}.jpg") as picture:
            image = picture.convert("RGB")
        product = model.encode_products([image], [product_text(events[pid].title,
                                                               events[pid].attributes)])
        expected = float(product[0] @ model.encode_images([image])[0])
        assert answer["results"][0]["score"] == pytest.approx(expected, abs=2e-3)


def test_text_query_returns_k_results_with_metadata(stack: LocalStack, catalog: Catalog) -> None:
    answer = search_text(stack.router_url, "red leather ankle boots", k=7)
    titles = {e.product_id: e.title for e in catalog.events}
    assert len(answer["results"]) == 7
    assert not answer["partial"] and answer["missing_shards"] == []
    assert answer["coverage"]["vectors_searched"] == catalog.baseline + CATALOG_SIZE
    scores = [hit["score"] for hit in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    attributes = {e.product_id: e.attributes for e in catalog.events}
    for hit in answer["results"]:  # other modules' products may rank too: check ours exactly
        assert hit["image_uri"].endswith(f"/{hit['product_id']}.jpg")
        if hit["product_id"] in titles:
            assert hit["title"] == titles[hit["product_id"]]
            assert hit["attributes"] == attributes[hit["product_id"]]
    assert any(hit["product_id"] in titles for hit in answer["results"])
    assert answer["took_ms"] > 0


def test_filters_narrow_results_before_the_top_k_is_cut(
    stack: LocalStack, catalog: Catalog
) -> None:
    attributes = {e.product_id: e.attributes for e in catalog.events}
    women = [pid for pid, a in attributes.items() if a.get("gender") == "Women"]
    assert len(women) >= 20  # the first 300 rows of the catalog hold plenty
    status, answer = http_json(
        f"{stack.router_url}/search",
        {"text": "shirt", "k": 20, "filters": {"gender": "women"}},  # values match any case
    )
    assert status == 200, answer
    assert len(answer["results"]) == 20
    assert all(hit["attributes"]["gender"] == "Women" for hit in answer["results"])
    assert all(attributes[pid]["gender"] == "Women" for pid in ids_of(answer) if pid in attributes)

    colours = ["Black", "Blue"]
    query = urllib.parse.urlencode({"q": "shoes", "k": 15, "colour": ",".join(colours)})
    status, answer = http_json(f"{stack.router_url}/search?{query}")
    assert status == 200 and len(answer["results"]) == 15, answer
    assert all(hit["attributes"].get("colour") in colours for hit in answer["results"])
    ours = [pid for pid in ids_of(answer) if pid in attributes]
    assert all(attributes[pid].get("colour") in colours for pid in ours)

    status, answer = http_json(
        f"{stack.router_url}/search", {"text": "shirt", "filters": {"brand": ["Nike"]}}
    )
    assert status == 400 and "cannot filter on 'brand'" in answer["error"]
    status, answer = http_json(
        f"{stack.router_url}/search", {"text": "shirt", "filters": {"colour": []}}
    )
    assert status == 400 and "colour" in answer["error"]


def test_every_good_event_is_indexed_around_the_bad_ones(
    stack: LocalStack, catalog: Catalog
) -> None:
    assert shard_vectors(stack.shard_urls) == catalog.baseline + CATALOG_SIZE
    assert len(catalog.dead) == 9


@pytest.mark.parametrize(
    ("key", "stage", "reason"),
    [
        (b"bad-malformed", "decode", "invalid CatalogEvent"),
        (b"bad-truncated", "decode", "not valid msgpack"),
        (b"bad-version", "decode", "unknown schema version 99"),
        (b"bad-missing-image", "fetch", "image not found"),
        (b"bad-loopback", "fetch", "loopback address"),
        (b"bad-outside-root", "fetch", "outside the allowed root"),
        (b"bad-oversized", "fetch", "image too large"),
        (b"bad-bomb", "image", "decompression bomb"),
        (b"bad-not-an-image", "image", "not an image"),
    ],
)
def test_bad_event_is_dead_lettered_with_its_reason(
    catalog: Catalog, key: bytes, stage: str, reason: str
) -> None:
    letter = catalog.dead[key]
    assert letter.stage == stage
    assert reason in letter.reason, letter.reason
    assert letter.original  # the original bytes travel with the reason
    assert letter.source_topic == "catalog.events"


def test_update_with_a_new_image_changes_what_image_search_finds(
    stack: LocalStack, catalog: Catalog
) -> None:
    target = catalog.events[-1]
    assert target.product_id not in catalog.unique_image_ids[:61]
    before = search_image(stack.router_url, catalog.spare_image, k=3)
    assert ids_of(before)[0] != target.product_id
    updated = target.model_copy(
        update={"version": target.version + 1, "image_uri": catalog.spare_image.as_uri()}
    )
    catalog.publisher.publish(updated)
    catalog.publisher.flush()
    after = eventually(
        lambda: (
            (a := search_image(stack.router_url, catalog.spare_image, k=3))
            and ids_of(a)[0] == target.product_id
            and a
        ),
        what="the updated image to be searchable",
    )
    assert after["results"][0]["image_uri"] == catalog.spare_image.as_uri()


def test_delete_removes_the_product_from_every_answer(
    stack: LocalStack, catalog: Catalog, image_root: Path
) -> None:
    victim = catalog.unique_image_ids[60]  # not among the 50 above, nor the updated product
    image = image_root / f"{victim}.jpg"
    assert ids_of(search_image(stack.router_url, image, k=3))[0] == victim
    version = next(e.version for e in catalog.events if e.product_id == victim)
    catalog.publisher.publish(CatalogEvent(op="delete", product_id=victim, version=version + 1))
    catalog.publisher.flush()
    eventually(
        lambda: victim not in ids_of(search_image(stack.router_url, image, k=50)),
        what="the deleted product to disappear",
    )
    # the router hides it as soon as its metadata is a tombstone; the shard follows via the log
    eventually(
        lambda: shard_vectors(stack.shard_urls) == catalog.baseline + CATALOG_SIZE - 1,
        what="the shard to apply the tombstone",
    )
    answer = search_text(
        stack.router_url, next(e.title for e in catalog.events if e.product_id == victim), k=100
    )
    assert victim not in ids_of(answer)


def test_router_answers_partial_when_a_shard_is_stopped(
    stack: LocalStack, catalog: Catalog
) -> None:
    stack.stop_child("shard-1")
    try:
        started = time.monotonic()
        status, answer = http_json(f"{stack.router_url}/search?q=blue+shirt&k=5")
        assert status == 200
        assert answer["partial"] is True
        assert answer["missing_shards"] == [1]
        assert answer["coverage"]["shards_answered"] == 1
        coverage = answer["coverage"]
        assert coverage["vectors_searched"] < coverage["vectors_total"]  # shard 1's last size
        assert 0 < coverage["ratio"] < 1
        assert 0 < len(answer["results"]) <= 5
        assert time.monotonic() - started < stack.settings.deadline_ms / 1000 + 5
    finally:
        stack.start_child("shard-1")
    answer = search_text(stack.router_url, "blue shirt", k=5)
    assert not answer["partial"]


def test_freshness_and_lag_are_measured(stack: LocalStack, catalog: Catalog) -> None:
    freshness = 0.0
    for url in stack.shard_urls:
        samples = scrape(url)
        assert ("vitrine_shard_freshness_seconds_count", ()) in samples, "no freshness histogram"
        freshness += samples["vitrine_shard_freshness_seconds_count", ()]
    assert freshness >= CATALOG_SIZE  # every applied upsert carried its publication time
    eventually(
        lambda: all(
            (lag := http_json(f"{url}/stats")[1]["lag"]) and sum(lag.values()) == 0
            for url in [stack.encoder_url, *stack.shard_urls]
        ),
        timeout_s=30,
        what="lag gauges to report a caught-up pipeline",
    )


def test_the_request_id_travels_from_the_router_to_the_shards(
    stack: LocalStack, catalog: Catalog
) -> None:
    request = urllib.request.Request(
        f"{stack.router_url}/search?q=shoes&k=3", headers={"X-Request-Id": "trace-me-42"}
    )
    urllib.request.urlopen(request, timeout=30).read()
    stack.stop_child("shard-0")  # flushes its log
    try:
        lines = (stack.log_dir / "shard-0.log").read_text().splitlines()
    finally:
        stack.start_child("shard-0")
    assert any('"request_id": "trace-me-42"' in line for line in lines)
