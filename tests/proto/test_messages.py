from __future__ import annotations

import msgpack
import numpy as np
import pytest

from proto.catalog import CatalogEvent, catalog_event_json_schema
from proto.dlq import DeadLetter
from proto.search import SearchRequest, SearchResponse
from proto.vectors import VectorRecord
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


@pytest.mark.parametrize("version", [None, 0, 2, "1", True])
def test_unknown_schema_version_is_refused(version: object) -> None:
    payload = {**upsert().model_dump(), "schema_version": version}
    with pytest.raises(InvalidMessage, match="unknown schema version"):
        CatalogEvent.from_wire(msgpack.packb(payload))


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


def test_vector_record_rejects_a_vector_of_the_wrong_size() -> None:
    payload = VectorRecord.upsert("a", 1, "m", np.ones(4)).model_dump() | {"dim": 5}
    with pytest.raises(InvalidMessage, match="expected 20"):
        VectorRecord.from_wire(msgpack.packb(payload))


def test_search_request_and_response_round_trip() -> None:
    queries = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = SearchRequest.build(queries, k=4, budget_ms=50, request_id="r1")
    back = SearchRequest.from_wire(request.to_wire())
    np.testing.assert_array_equal(back.query_matrix(), queries)
    response = SearchResponse(shard_id=1, ids=[["a"], ["b"]], scores=[[0.5], [0.25]], searched=9)
    assert SearchResponse.from_wire(response.to_wire()) == response


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


def test_dead_letter_keeps_the_original_bytes() -> None:
    letter = DeadLetter(
        reason="not valid msgpack", stage="decode", original=b"\xc1garbage", key=b"k",
        source_topic="catalog.events", source_partition=2, source_offset=17,
    )
    back = DeadLetter.from_wire(letter.to_wire())
    assert back.original == b"\xc1garbage" and back.reason == "not valid msgpack"
