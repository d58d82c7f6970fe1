from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np
import pytest

from proto.catalog import CatalogEvent, catalog_event_json_schema
from proto.dlq import DeadLetter
from proto.search import SearchRequest, SearchResponse
from proto.stats import EncoderStats, ShardStats
from proto.vectors import ProductFields, VectorRecord
from vitrine.errors import InvalidMessage


def upsert(**overrides: object) -> CatalogEvent:
    fields: dict[str, object] = {
        "op": "upsert", "product_id": "sku-1", "version": 5,
        "image_uri": "https://img.example.com/1.jpg", "title": "Red Boots",
        "attributes": {"colour": "Red"},
    }
    return CatalogEvent.model_validate({**fields, **overrides})


def test_catalog_event_round_trips() -> None:
    event = upsert()
    assert CatalogEvent.from_wire(event.to_wire()) == event
    delete = CatalogEvent(op="delete", product_id="sku-1", version=6)
    assert CatalogEvent.from_wire(delete.to_wire()) == delete


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"op": "upsert", "product_id": "a", "version": 1}, "needs an image_uri"),
        ({"op": "upsert", "product_id": "a", "version": 1, "image_uri": "ftp://x"}, "http"),
        ({"op": "rename", "product_id": "a", "version": 1}, "op"),
        ({"op": "delete", "product_id": "", "version": 1}, "product_id"),
        ({"op": "delete", "product_id": "a b", "version": 1}, "product_id"),
        ({"op": "delete", "product_id": "a", "version": -1}, "version"),
        ({"op": "delete", "product_id": "a", "version": 1, "colour": "red"}, "colour"),
    ],
)
def test_catalog_event_rejections_say_why(payload: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        CatalogEvent.from_wire(msgpack.packb({"schema_version": 1, **payload}))


@pytest.mark.parametrize("version", [None, 0, 3, "1", True, 2.0])
def test_unknown_schema_version_is_refused(version: object) -> None:
    payload = {**upsert().model_dump(), "schema_version": version}
    with pytest.raises(InvalidMessage, match="unknown schema version"):
        CatalogEvent.from_wire(msgpack.packb(payload))


def test_catalog_event_version_2_carries_price_and_stock_and_version_1_still_reads() -> None:
    v1 = {"schema_version": 1, "op": "upsert", "product_id": "p1", "version": 3,
          "image_uri": "file:///p1.jpg", "title": "Red kurta", "attributes": {}}
    old = CatalogEvent.from_wire(msgpack.packb(v1))
    assert (old.schema_version, old.price, old.in_stock) == (1, None, None)
    new = CatalogEvent.from_wire(msgpack.packb(v1 | {"schema_version": 2, "price": 1299,
                                                     "in_stock": False}))
    assert (new.price, new.in_stock) == (1299.0, False)
    assert CatalogEvent.from_wire(new.to_wire()) == new
    with pytest.raises(InvalidMessage, match="need schema_version 2"):
        CatalogEvent.from_wire(msgpack.packb(v1 | {"price": 10.0}))
    for bad in ({"price": -1.0}, {"price": float("nan")}, {"price": "12"}, {"in_stock": 1},
                {"price": 1e13}):
        with pytest.raises(InvalidMessage):
            CatalogEvent.from_wire(msgpack.packb(v1 | {"schema_version": 2} | bad))


def test_a_message_without_schema_version_is_refused() -> None:
    payload = upsert().model_dump()
    del payload["schema_version"]
    with pytest.raises(InvalidMessage, match="no schema_version"):
        CatalogEvent.from_wire(msgpack.packb(payload))


@pytest.mark.parametrize(
    "data", [b"", b"\x85\xa2op", msgpack.packb([1, 2]), upsert().to_wire() + b"\x00"]
)
def test_undecodable_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidMessage):
        CatalogEvent.from_wire(data)


def test_json_schema_requires_the_contract_fields() -> None:
    schema = catalog_event_json_schema()
    assert {"schema_version", "op", "product_id", "version"} <= set(schema["required"])
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_vector_record_round_trips(dtype: str) -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    record = VectorRecord.upsert("sku-1", 3, "m@1", vector, dtype)
    back = VectorRecord.from_wire(record.to_wire())
    assert back == record
    np.testing.assert_allclose(back.as_array(), vector, rtol=1e-3 if dtype == "f16" else 0)
    tomb = VectorRecord.tombstone("sku-1", 4, "m@1")
    assert VectorRecord.from_wire(tomb.to_wire()).op == "delete"


def test_vector_record_carries_the_product_fields() -> None:
    record = VectorRecord.upsert(
        "sku-1", 3, "m@1", np.ones(4), title="Red kurta", image_uri="file:///k.jpg",
        attributes={"colour": "Red"},
    )
    back = VectorRecord.from_wire(record.to_wire())
    assert back.schema_version == 2
    assert back.fields() == ProductFields(
        title="Red kurta", image_uri="file:///k.jpg", attributes={"colour": "Red"}
    )
    assert ProductFields.unpack(back.fields().pack()) == back.fields()


def test_a_version_1_vector_record_still_reads() -> None:
    """Exactly what the release before wrote to catalog.vectors (no title, no image_uri)."""
    written_by_v1 = msgpack.packb({
        "schema_version": 1, "op": "upsert", "product_id": "sku-1", "version": 7,
        "model_id": "m@1", "dim": 2, "dtype": "f32",
        "vector": np.array([0.6, 0.8], dtype=np.float32).tobytes(), "event_time_ms": 12,
        "attributes": {"colour": "Red"},
    }, use_bin_type=True)
    record = VectorRecord.from_wire(written_by_v1)
    assert (record.schema_version, record.version, record.attributes) == (1, 7, {"colour": "Red"})
    np.testing.assert_allclose(record.as_array(), [0.6, 0.8])
    assert record.fields() == ProductFields(attributes={"colour": "Red"})
    tombstone_v1 = msgpack.packb({"schema_version": 1, "op": "delete", "product_id": "sku-1",
                                  "version": 8, "model_id": "m@1"})
    assert VectorRecord.from_wire(tombstone_v1).op == "delete"


@pytest.mark.parametrize("data", [b"\x93", msgpack.packb([1, 2]), msgpack.packb(["t", "u", 3])])
def test_unreadable_product_fields_are_an_invalid_message(data: bytes) -> None:
    with pytest.raises(InvalidMessage, match="product fields"):
        ProductFields.unpack(data)


def test_vector_record_rejects_a_vector_of_the_wrong_size() -> None:
    payload = VectorRecord.upsert("a", 1, "m", np.ones(4)).model_dump() | {"dim": 5}
    with pytest.raises(InvalidMessage, match="expected 20"):
        VectorRecord.from_wire(msgpack.packb(payload))


def test_search_request_and_response_round_trip() -> None:
    queries = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = SearchRequest.build(queries, k=4, budget_ms=50, request_id="r1")
    back = SearchRequest.from_wire(request.to_wire())
    np.testing.assert_array_equal(back.query_matrix(), queries)
    fields = [[ProductFields(title="A", image_uri="file:///a").pack()], [b""]]
    response = SearchResponse(
        model_id="m", shard_id=1, ids=[["a"], ["b"]], scores=[[0.5], [0.25]], fields=fields,
        searched=9,
    )
    assert SearchResponse.from_wire(response.to_wire()) == response
    assert ProductFields.unpack(response.fields_of(0, 0)).title == "A"
    assert ProductFields.unpack(response.fields_of(1, 0)) == ProductFields()


def test_version_1_search_messages_still_read() -> None:
    """A router or shard of the release before speaks v1: its messages still decode."""
    request = SearchRequest.build(np.ones((1, 3)), 4, 50).model_dump() | {"schema_version": 1}
    assert SearchRequest.from_wire(msgpack.packb(request)).schema_version == 1
    old = {"schema_version": 1, "shard_id": 0, "ids": [["a"]], "scores": [[0.5]], "searched": 1}
    response = SearchResponse.from_wire(msgpack.packb(old))
    assert response.fields_of(0, 0) == b""
    with pytest.raises(InvalidMessage, match="same shape"):  # v2 must carry every hit's fields
        SearchResponse.from_wire(msgpack.packb(old | {"schema_version": 2}))


def test_search_messages_reject_inconsistent_shapes() -> None:
    payload = SearchRequest.build(np.ones((2, 3)), 4, 50).model_dump() | {"nq": 3}
    with pytest.raises(InvalidMessage, match="nq"):
        SearchRequest.from_wire(msgpack.packb(payload))
    with pytest.raises(InvalidMessage, match="same shape"):
        SearchResponse.from_wire(
            msgpack.packb(
                {"schema_version": 1, "shard_id": 0, "ids": [["a"]], "scores": [[]], "searched": 1}
            )
        )


def dead_letter(original: bytes, key: bytes | None = b"k", reason: str = "bad") -> DeadLetter:
    return DeadLetter.bounded(
        original=original, key=key, stage="decode", reason=reason,
        source_topic="catalog.events", source_partition=2, source_offset=17,
    )


def test_dead_letter_keeps_the_original_bytes() -> None:
    letter = dead_letter(b"\xc1garbage", reason="not valid msgpack")
    back = DeadLetter.from_wire(letter.to_wire())
    assert back.original == b"\xc1garbage" and back.reason == "not valid msgpack"
    assert back.original_length == 8 and not back.truncated
    assert back.original_sha256 == hashlib.sha256(b"\xc1garbage").hexdigest()


def test_a_dead_letter_of_anything_fits_one_kafka_message() -> None:
    huge = b"\x81" + b"x" * (5 * 1024**2)
    letter = dead_letter(huge, key=b"k" * 100_000, reason="r" * 1_000_000)
    wire = letter.to_wire()
    assert len(wire) < 64 * 1024  # the broker's default limit is 1 MB
    back = DeadLetter.from_wire(wire)
    assert back.truncated and back.original == huge[: len(back.original)]
    assert back.original_length == len(huge)
    assert back.original_sha256 == hashlib.sha256(huge).hexdigest()
    assert back.key_truncated and back.key == b"k" * len(back.key or b"")
    assert back.reason.endswith("(truncated)") and len(back.reason) <= 2000


def test_version_1_dead_letters_still_read() -> None:
    written_by_v1 = msgpack.packb({
        "schema_version": 1, "reason": "not valid msgpack", "stage": "decode",
        "original": b"\xc1", "key": None, "source_topic": "catalog.events",
        "source_partition": 0, "source_offset": 3, "failed_at_ms": 1,
    })
    back = DeadLetter.from_wire(written_by_v1)
    assert back.schema_version == 1 and back.original == b"\xc1"
    assert back.original_length == 1 and not back.truncated


# strict contracts: nothing is coerced


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", True), ("version", "7"), ("version", 3.0), ("version", 2**63),
        ("title", b"Red Boots"), ("product_id", 5), ("attributes", {"colour": 3}),
        ("attributes", {f"a{i}": "x" for i in range(65)}), ("attributes", {"": "x"}),
        ("attributes", {"colour": "x" * 513}),
    ],
)
def test_catalog_events_are_not_coerced(field: str, value: object) -> None:
    payload = {**upsert().model_dump(), field: value}
    with pytest.raises(InvalidMessage, match=field):
        CatalogEvent.from_wire(msgpack.packb(payload, use_bin_type=True))


@pytest.mark.parametrize("version", [1.0, True])
def test_a_schema_version_is_an_integer(version: object) -> None:
    payload = {**upsert().model_dump(), "schema_version": version}
    with pytest.raises(InvalidMessage, match="unknown schema version"):
        CatalogEvent.from_wire(msgpack.packb(payload))


def test_the_largest_version_fits_64_bits_and_round_trips() -> None:
    event = upsert(version=2**63 - 1)
    assert CatalogEvent.from_wire(event.to_wire()).version == 2**63 - 1
    vector = VectorRecord.upsert("a", 2**63 - 1, "m", np.ones(4))
    assert VectorRecord.from_wire(vector.to_wire()).version == 2**63 - 1


def test_a_validation_reason_stays_short_whatever_the_event() -> None:
    payload = {**upsert().model_dump(), **{f"unknown_{i}": "x" * 50 for i in range(30_000)}}
    with pytest.raises(InvalidMessage, match="and 29995 more problems") as caught:
        CatalogEvent.from_wire(msgpack.packb(payload))
    assert len(str(caught.value)) <= 2000


# JSON events, for stock clients


def test_a_json_event_is_read_like_a_msgpack_one() -> None:
    event = upsert()
    assert CatalogEvent.from_wire(event.model_dump_json().encode()) == event
    assert CatalogEvent.from_wire(b"\xef\xbb\xbf \n" + event.model_dump_json().encode()) == event


def test_a_kafka_connect_envelope_is_unwrapped() -> None:
    event = upsert()
    envelope = {"schema": {"type": "struct", "optional": False}, "payload": event.model_dump()}
    assert CatalogEvent.from_wire(json.dumps(envelope).encode()) == event


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"schema_version": 1, "op": "delete", "product_id": "a", "version": NaN}', "NaN"),
        (b'{"schema_version": 1, "schema_version": 1}', "repeats a key"),
        (b'{"schema_version": 1, "op": "delete", "product_id": "a", "version": 3.0}', "version"),
        (b'{"schema_version": 1.0, "op": "delete", "product_id": "a", "version": 3}',
         "unknown schema version"),
        (b"{" * 100_000, "not valid JSON"),
        (b'{"title": "\xff"}', "not valid JSON"),
        (b'{"a": 1} trailing', "not valid JSON"),
    ],
)
def test_bad_json_events_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        CatalogEvent.from_wire(data)


def test_stats_read_back_from_json_and_ignore_what_a_newer_service_adds() -> None:
    stats = ShardStats(shard_id=1, num_shards=2, vectors=5, ready=True, partitions=[1, 3],
                       next_offsets={1: 10, 3: 7}, lag={1: 0, 3: 2})
    wire = json.loads(json.dumps(stats.model_dump(mode="json")))  # JSON keys are strings
    back = ShardStats.model_validate({**wire, "added_in_a_later_release": True})
    assert back == stats and back.total_lag == 2
    encoder = EncoderStats.model_validate({"model_id": "m@1", "events": {"indexed": 3,
                                                                        "deleted": 1}})
    assert encoder.handled == 4


def test_stats_that_are_not_a_shards_are_refused() -> None:
    with pytest.raises(ValueError):
        ShardStats.model_validate({"shard_id": 0})
