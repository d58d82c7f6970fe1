"""Hostile catalog events among good ones, on the real stack: every good product is indexed,
every bad event is dead-lettered with its stage and reason, and the encoder neither dies, nor
restarts, nor stalls. Classes, not cases: each event stands for a way input can go wrong."""

from __future__ import annotations

import io
import itertools
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from confluent_kafka import Producer
from PIL import Image

from proto.dlq import DeadLetter
from tests.conftest import stage_image
from tests.helpers import DeadLetterReader, eventually, http_json, shard_vectors
from vitrine.catalog import events_from_csv
from vitrine.cli.stack import LocalStack
from vitrine.kafka import partition_for, producer_config

pytestmark = pytest.mark.stack

ROWS = (3600, 3700)  # rows of products.csv that no other test publishes: the 100 good products


@dataclass(frozen=True)
class Poison:
    value: bytes
    stage: str
    reason: str


@dataclass
class Outcome:
    good: list[str]
    letters: dict[bytes, DeadLetter]
    poison: dict[bytes, Poison]
    encoder_pid: int


def _upsert(uri: str, **fields: object) -> dict[str, object]:
    """An upsert's fields; its product_id is set from its key below."""
    return {"schema_version": 1, "op": "upsert", "version": 1, "image_uri": uri, **fields}


def _poison(root: Path, good_uri: str) -> dict[bytes, Poison]:
    """Key -> one event per class of bad input, each valid in every other respect."""
    os.mkfifo(root / "pipe.jpg")
    (root / "loop-a.jpg").symlink_to(root / "loop-b.jpg")
    (root / "loop-b.jpg").symlink_to(root / "loop-a.jpg")
    invalid = "invalid image_uri"
    cases: dict[str, tuple[dict[str, object] | bytes, str, str]] = {
        # fetch: URIs no parser foresaw, special files, addresses outside any list of ranges
        "port": (_upsert("http://example.com:99999/a.jpg"), "fetch", invalid),
        "bracket": (_upsert("http://[::1/a.jpg"), "fetch", invalid),
        "idna": (_upsert(f"http://{'x' * 70}.com/a.jpg"), "fetch", invalid),
        "nul": (_upsert(f"file://{root}/a%00.jpg"), "fetch", "NUL"),
        "loop": (_upsert((root / "loop-a.jpg").as_uri()), "fetch", "cannot be resolved"),
        "fifo": (_upsert((root / "pipe.jpg").as_uri()), "fetch", "not a regular file"),
        "cgnat": (_upsert("http://100.64.0.1/a.jpg"), "fetch", "not a globally"),
        "6to4": (_upsert("http://[2002:a00:1::1]/a.jpg"), "fetch", "6to4"),
        "sitelocal": (_upsert("http://[fec0::1]/a.jpg"), "fetch", "site-local"),
        # decode: sizes that would make the dead letter too large for the broker
        "near-limit": (_upsert(good_uri, blob="x" * 999_000), "decode", "blob"),
        "many-fields": (
            _upsert(good_uri, **{f"unknown_field_{i:06d}": "v" * 30 for i in range(30_000)}),
            "decode", "more problems",
        ),
        "10mb-title": (_upsert(good_uri, title="t" * 10_000_000), "decode", "title"),
        "huge-attributes": (
            _upsert(good_uri, attributes={f"a{i}": "v" for i in range(5000)}),
            "decode", "attributes",
        ),
        # decode: no coercion, versions within 64 bits
        "uint64-version": (_upsert(good_uri, version=2**64 - 1), "decode", "version"),
        "bool-version": (_upsert(good_uri, version=True), "decode", "version"),
        "str-version": (_upsert(good_uri, version="7"), "decode", "version"),
        "float-version": (_upsert(good_uri, version=3.0), "decode", "version"),
        "float-schema": (_upsert(good_uri, schema_version=1.0), "decode", "schema version"),
        "bytes-title": (_upsert(good_uri, title=b"Red Boots"), "decode", "title"),
        # decode: JSON that is not an event
        "json-huge-version": (
            json.dumps({**_upsert(good_uri, version=10**30), "product_id": "j"}).encode(),
            "decode", "version",
        ),
        "deep-json": (b'{"a":' * 200_000 + b"1" + b"}" * 200_000, "decode", "not valid JSON"),
        "nan-json": (b'{"schema_version": 1, "version": NaN}', "decode", "NaN"),
        "empty": (b"", "decode", "not valid msgpack"),
    }
    poison = {}
    for name, (event, stage, reason) in cases.items():
        pid = f"poison-{name}"
        if isinstance(event, dict):
            event = msgpack.packb({**event, "product_id": pid}, use_bin_type=True)
        poison[pid.encode()] = Poison(event, stage, reason)  # raw bytes fail before the key check
    return poison


def _picture(root: Path, name: str, size: tuple[int, int], fmt: str) -> str:
    path = root / name
    Image.new("RGB", size, (30, 90, 160)).save(path, format=fmt)
    return path.as_uri()


def _good(stack: LocalStack, fashion_data: Path, root: Path) -> dict[bytes, bytes]:
    """Key -> value of 100 good products: msgpack mostly, JSON and a Kafka Connect envelope
    too, and pictures of every accepted format and shape (a BMP, a 1 x 3000 banner)."""
    events = list(itertools.islice(events_from_csv(fashion_data / "products.csv", root), *ROWS))
    for event in events:
        stage_image(fashion_data, root, event.product_id)
    events[0] = events[0].model_copy(update={"image_uri": _picture(root, "g.bmp", (60, 80), "BMP")})
    events[1] = events[1].model_copy(
        update={"image_uri": _picture(root, "banner.png", (1, 3000), "PNG")}
    )
    events[2] = events[2].model_copy(
        update={"image_uri": _picture(root, "wide.png", (5000, 2), "PNG")}
    )
    values = {}
    for i, event in enumerate(events):
        if i % 10 == 5:
            values[event.product_id.encode()] = event.model_dump_json().encode()
        elif i % 10 == 6:
            envelope = {"schema": {"type": "struct"}, "payload": event.model_dump()}
            values[event.product_id.encode()] = json.dumps(envelope).encode()
        else:
            values[event.product_id.encode()] = event.to_wire()
    return values


@pytest.fixture(scope="module")
def outcome(stack: LocalStack, fashion_data: Path, image_root: Path) -> Iterator[Outcome]:
    root = image_root / "hostile"
    root.mkdir()
    good = _good(stack, fashion_data, root)
    poison = _poison(root, good_uri=(root / "g.bmp").as_uri())
    encoder = stack.children["encoder"].process
    assert encoder is not None
    s = stack.settings
    baseline = shard_vectors(stack.shard_urls)
    producer = Producer(producer_config(stack.kafka_bootstrap, **{"message.max.bytes": 20_000_000}))
    bad = list(poison.items())
    for i, (key, value) in enumerate(good.items()):  # poison interleaved: batches hold both
        producer.produce(s.events_topic, key=key, value=value,
                         partition=partition_for(key.decode(), s.event_partitions))
        if i % 4 == 0 and bad:
            bad_key, item = bad.pop()
            producer.produce(s.events_topic, key=bad_key, value=item.value,
                             partition=partition_for(bad_key.decode(), s.event_partitions))
    for bad_key, item in bad:
        producer.produce(s.events_topic, key=bad_key, value=item.value,
                         partition=partition_for(bad_key.decode(), s.event_partitions))
    assert producer.flush(60) == 0
    reader = DeadLetterReader(stack.kafka_bootstrap, s.dlq_topic)
    eventually(lambda: shard_vectors(stack.shard_urls) == baseline + len(good),
               what="every good product indexed")
    letters = reader.wait_for(set(poison))
    reader.close()
    yield Outcome([k.decode() for k in good], letters, poison, encoder.pid)


def test_every_good_product_is_indexed_and_no_bad_one(stack: LocalStack, outcome: Outcome) -> None:
    content: dict[str, int] = {}
    for url in stack.shard_urls:
        with urllib.request.urlopen(f"{url}/content", timeout=30) as response:
            content.update(msgpack.unpackb(response.read()))
    assert set(outcome.good) <= set(content)
    assert not {pid for pid in content if pid.startswith("poison-")}


def test_every_bad_event_is_dead_lettered_with_its_stage_and_reason(outcome: Outcome) -> None:
    wrong = {}
    for key, letter in outcome.letters.items():
        expected = outcome.poison[key]
        if letter.stage != expected.stage or expected.reason not in letter.reason:
            wrong[key] = (letter.stage, letter.reason[:200])
    assert not wrong


def test_dead_letters_are_bounded_and_name_the_whole_original(outcome: Outcome) -> None:
    for key, letter in outcome.letters.items():
        original = outcome.poison[key].value
        assert len(letter.to_wire()) < 300 * 1024, key
        assert letter.original_length == len(original)
        assert letter.truncated == (len(original) > 256 * 1024), key
        assert original.startswith(letter.original)
        assert len(letter.reason) <= 2000


def test_the_encoder_never_died_restarted_or_stalled(stack: LocalStack, outcome: Outcome) -> None:
    encoder = stack.children["encoder"].process
    assert encoder is not None and encoder.pid == outcome.encoder_pid and encoder.poll() is None
    assert http_json(f"{stack.encoder_url}/healthz") == (200, {"status": "ok"})
    assert http_json(f"{stack.encoder_url}/readyz")[0] == 200


def test_a_refused_event_leaves_nothing_behind(stack: LocalStack, outcome: Outcome) -> None:
    """Its vector record was never produced: no shard, so no storefront, knows the product."""
    for pid in ("poison-port", "poison-fifo", "poison-cgnat"):
        status, answer = http_json(f"{stack.router_url}/images/{pid}")
        assert status == 404 and "no product" in answer["error"]


def test_a_bmp_product_is_indexed_and_its_picture_served(
    stack: LocalStack, outcome: Outcome
) -> None:
    with urllib.request.urlopen(f"{stack.router_url}/images/{outcome.good[0]}", timeout=30) as r:
        assert r.headers["Content-Type"] == "image/bmp"
        assert Image.open(io.BytesIO(r.read())).size == (60, 80)
