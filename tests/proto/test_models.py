"""The model registry's contract and its changes (pure logic), and v3 search messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from proto.models import ModelChangeRefused, ModelEntry, ModelRegistry, candidate_topic
from proto.search import SearchRequest, SearchResponse
from vitrine.errors import InvalidMessage


def entry(model_id: str, topic: str | None = None) -> ModelEntry:
    return ModelEntry(model_id=model_id, architecture="arch", weights="w.pt",
                      vectors_topic=topic or candidate_topic("catalog.vectors", model_id))


def test_a_registry_goes_through_add_promote_rollback_retire() -> None:
    start = ModelRegistry.initial(entry("old", "catalog.vectors"))
    assert (start.revision, start.active, start.candidates) == (0, "old", [])
    added = start.with_candidate(entry("new"))
    assert (added.revision, added.active, [m.model_id for m in added.candidates]) == (
        1, "old", ["new"])
    promoted = added.promoted("new")
    assert (promoted.revision, promoted.active, promoted.previous) == (2, "new", "old")
    back = promoted.rolled_back()
    assert (back.revision, back.active, back.previous) == (3, "old", "new")
    retired = back.retired("new")
    assert (retired.revision, [m.model_id for m in retired.models], retired.previous) == (
        4, ["old"], None)
    assert ModelRegistry.from_wire(retired.to_wire()) == retired


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda r: r.with_candidate(entry("old")), "already served"),
        (lambda r: r.promoted("old"), "already the active model"),
        (lambda r: r.promoted("nope"), "no model 'nope' is served"),
        (lambda r: r.rolled_back(), "nothing to roll back to"),
        (lambda r: r.retired("old"), "is active: promote another first"),
    ],
)
def test_changes_that_make_no_sense_are_refused_with_the_reason(change, reason) -> None:
    registry = ModelRegistry.initial(entry("old", "catalog.vectors"))
    with pytest.raises(ModelChangeRefused, match=reason):
        change(registry)


def test_a_registry_record_that_breaks_its_rules_is_refused() -> None:
    good = ModelRegistry.initial(entry("a", "t")).model_dump()
    for broken, reason in [
        (good | {"active": "b"}, "not among the models"),
        (good | {"models": [entry("a", "t").model_dump()] * 2}, "listed twice"),
        (good | {"models": [entry("a", "t").model_dump(), entry("b", "t").model_dump()]},
         "share a vector topic"),
        (good | {"schema_version": 2}, "unknown schema version"),
    ]:
        with pytest.raises(InvalidMessage, match=reason):
            ModelRegistry.from_wire(msgpack.packb(broken, use_bin_type=True))


def test_a_candidate_topic_is_a_valid_kafka_name_unique_per_model() -> None:
    ids = ["arch@ckpt~1a2b", "arch@ckpt~1a2b+onnx-int8", "arch@random#3", "x" * 300]
    topics = [candidate_topic("catalog.vectors", i) for i in ids]
    assert len(set(topics)) == len(ids)
    for topic in topics:
        assert topic.startswith("catalog.vectors.") and len(topic) <= 249
        ModelEntry(model_id="m", architecture="a", vectors_topic=topic)  # the pattern holds


def test_version_3_searches_name_their_model_and_older_ones_do_not() -> None:
    request = SearchRequest.build(np.ones((1, 3)), 4, 50, model_id="arch@w")
    assert request.schema_version == 3
    assert SearchRequest.from_wire(request.to_wire()).model_id == "arch@w"
    assert SearchRequest.build(np.ones((1, 3)), 4, 50).schema_version == 2  # names none
    v3 = request.model_dump()
    with pytest.raises(InvalidMessage, match="names its model_id"):
        SearchRequest.from_wire(msgpack.packb(v3 | {"model_id": None}))
    with pytest.raises(InvalidMessage, match="carries no model_id"):
        SearchRequest.from_wire(msgpack.packb(v3 | {"schema_version": 2}))
    answer = {"schema_version": 3, "shard_id": 0, "ids": [["a"]], "scores": [[0.5]],
              "fields": [[b""]], "searched": 1}
    with pytest.raises(InvalidMessage, match="names its model_id"):
        SearchResponse.from_wire(msgpack.packb(answer))
    assert SearchResponse.from_wire(msgpack.packb(answer | {"model_id": "m"})).model_id == "m"
