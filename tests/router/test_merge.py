from __future__ import annotations

from proto.search import SearchResponse
from services.router.merge import merge_topk


def response(shard: int, hits: dict[str, float]) -> SearchResponse:
    ranked = sorted(hits.items(), key=lambda kv: -kv[1])
    return SearchResponse(
        shard_id=shard, ids=[[p for p, _ in ranked]], scores=[[s for _, s in ranked]], searched=9
    )


def test_merge_keeps_the_global_best_k() -> None:
    merged = merge_topk(
        [response(0, {"a": 0.9, "b": 0.5}), response(1, {"c": 0.95, "d": 0.1})], k=3
    )
    assert [(h.product_id, h.shard_id) for h in merged] == [("c", 1), ("a", 0), ("b", 0)]


def test_a_product_on_two_shards_appears_once_with_its_best_score() -> None:
    merged = merge_topk([response(0, {"a": 0.4}), response(1, {"a": 0.7, "b": 0.5})], k=5)
    assert [(h.product_id, h.score) for h in merged] == [("a", 0.7), ("b", 0.5)]


def test_merge_of_nothing_is_empty() -> None:
    assert merge_topk([], k=5) == []
