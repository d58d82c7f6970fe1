from __future__ import annotations

from proto.search import SearchResponse
from proto.vectors import ProductFields
from services.router.merge import merge_topk


def fields(pid: str, shard: int) -> bytes:
    return ProductFields(title=f"{pid} as shard {shard} holds it", image_uri=f"file:///{pid}").pack()


def response(shard: int, hits: dict[str, float]) -> SearchResponse:
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    return SearchResponse(
        model_id="m", shard_id=shard, ids=[[p for p, _ in ranked]], scores=[[s for _, s in ranked]],
        fields=[[fields(p, shard) for p, _ in ranked]], searched=9,
    )


def test_merge_keeps_the_global_best_k() -> None:
    merged = merge_topk(
        [response(0, {"a": 0.9, "b": 0.5}), response(1, {"c": 0.95, "d": 0.1})], k=3
    )
    assert [(h.product_id, h.shard_id) for h in merged] == [("c", 1), ("a", 0), ("b", 0)]
    assert [h.fields for h in merged] == [fields("c", 1), fields("a", 0), fields("b", 0)]


def test_a_product_on_two_shards_appears_once_with_its_best_score() -> None:
    merged = merge_topk([response(0, {"a": 0.4}), response(1, {"a": 0.7, "b": 0.5})], k=5)
    assert [(h.product_id, h.score) for h in merged] == [("a", 0.7), ("b", 0.5)]
    assert merged[0].fields == fields("a", 1)  # the fields come with the hit that won


def test_a_version_1_answer_merges_without_fields() -> None:
    """A shard of the release before answers v1 during a rolling upgrade: hits, no fields."""
    old = SearchResponse(schema_version=1, shard_id=0, ids=[["a"]], scores=[[0.9]], searched=1)
    merged = merge_topk([old, response(1, {"b": 0.5})], k=5)
    assert [(h.product_id, h.fields) for h in merged] == [("a", b""), ("b", fields("b", 1))]


def test_merge_of_nothing_is_empty() -> None:
    assert merge_topk([], k=5) == []
