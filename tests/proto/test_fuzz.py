"""Property-based: whatever bytes arrive on a topic or an RPC, decoding answers with a message
or `InvalidMessage`, nothing else; and every valid event survives both of its encodings."""

from __future__ import annotations

import json
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from proto.catalog import CatalogEvent
from proto.dlq import DeadLetter
from proto.search import SearchRequest, SearchResponse
from proto.vectors import VectorRecord
from vitrine.errors import InvalidMessage

DECODERS = [CatalogEvent, VectorRecord, SearchRequest, SearchResponse, DeadLetter]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12,
)
FIELDS = ["schema_version", "op", "product_id", "version", "image_uri", "title", "attributes",
          "vector", "dim", "dtype", "model_id", "queries", "nq", "k", "ids", "scores", "reason"]
# maps that look like messages: known field names with values of any type
message_like = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), values,
                               max_size=10)


def decodes_or_refuses(data: bytes) -> None:
    for model in DECODERS:
        try:
            model.from_wire(data)
        except InvalidMessage as exc:
            assert str(exc) and len(str(exc)) <= 2000


@given(st.binary(max_size=512))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@given(message_like)
def test_arbitrary_msgpack_maps_decode_or_are_refused(payload: dict[str, Any]) -> None:
    decodes_or_refuses(msgpack.packb(payload, use_bin_type=True))
    decodes_or_refuses(msgpack.packb({**payload, "schema_version": 1}, use_bin_type=True))


@given(message_like)
def test_arbitrary_json_objects_decode_or_are_refused(payload: dict[str, Any]) -> None:
    text = json.dumps(payload, default=lambda b: b.hex(), allow_nan=True)
    decodes_or_refuses(text.encode("utf-8", "surrogatepass"))


product_ids = st.from_regex(r"\A[A-Za-z0-9._:\-]{1,128}\Z")
events = st.builds(
    CatalogEvent,
    op=st.just("upsert"),
    product_id=product_ids,
    version=st.integers(min_value=0, max_value=2**63 - 1),
    image_uri=st.sampled_from(["https://img.example/", "http://x/", "file:///images/"]).flatmap(
        lambda prefix: st.text(max_size=40).map(lambda tail: prefix + tail)
    ),
    title=st.text(max_size=100),
    attributes=st.dictionaries(st.text(min_size=1, max_size=64), st.text(max_size=80),
                               max_size=8),
)


@given(events)
def test_every_valid_event_round_trips_through_msgpack_and_json(event: CatalogEvent) -> None:
    assert CatalogEvent.from_wire(event.to_wire()) == event
    try:
        as_json = event.model_dump_json().encode()
    except UnicodeEncodeError:  # a lone surrogate cannot be JSON on the wire, only msgpack
        return
    assert CatalogEvent.from_wire(as_json) == event
