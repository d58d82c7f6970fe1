"""Duplicate collapse and facet merging at the router: pure functions over merged hits."""

from __future__ import annotations

import numpy as np

from proto.search import SearchResponse
from proto.vectors import ProductFields
from services.router.merge import Merged
from services.router.search import collapse, exact_picture_first, merge_facets


def hit(pid: str, score: float, digest: str = "", vector: list[float] | None = None) -> Merged:
    fields = ProductFields(title=pid, image_digest=digest).pack()
    return Merged(pid, score, 0, fields, None if vector is None else np.array(vector, np.float32))


def test_equal_pictures_collapse_into_the_best_hit() -> None:
    groups = collapse([hit("a", 0.9, "d1"), hit("b", 0.8, "d2"), hit("c", 0.7, "d1"),
                       hit("d", 0.6, "d1")], cosine=0.99)
    assert [(g.best.product_id, g.also) for g in groups] == [("a", ["c", "d"]), ("b", [])]
    assert groups[0].fields().title == "a"


def test_nearly_identical_vectors_collapse_and_others_do_not() -> None:
    groups = collapse([hit("a", 0.9, vector=[1, 0]), hit("b", 0.8, vector=[0.999, 0.04]),
                       hit("c", 0.7, vector=[0.7, 0.7]), hit("e", 0.6)], cosine=0.99)
    assert [(g.best.product_id, g.also) for g in groups] == [("a", ["b"]), ("c", []), ("e", [])]


def test_hits_without_vectors_or_digests_stay_apart() -> None:
    groups = collapse([hit("a", 0.9), hit("b", 0.8), hit("c", 0.7, vector=[])], cosine=0.5)
    assert [g.best.product_id for g in groups] == ["a", "b", "c"]
    bad = Merged("x", 0.5, 0, b"\x93garbage", None)  # a shard's bug: kept, without fields
    (only,) = collapse([bad], cosine=0.9)
    assert only.fields() == ProductFields()


def test_facet_counts_sum_across_shards_case_insensitively() -> None:
    def answer(shard: int, facets: dict[str, dict[str, int]]) -> SearchResponse:
        return SearchResponse(model_id="m", shard_id=shard, ids=[[]], scores=[[]], fields=[[]],
                              facets=[facets], facet_candidates=[3], searched=3)

    merged = merge_facets([answer(0, {"colour": {"Red": 2, "Blue": 1}}),
                           answer(1, {"colour": {"red": 1, "Navy Blue": 2}})])
    assert [(v.value, v.count) for v in merged["colour"]] == [
        ("Red", 3), ("Navy Blue", 2), ("Blue", 1)
    ]


def test_an_uploaded_catalog_picture_puts_its_products_first_and_keeps_the_rest_in_order(
) -> None:
    hits = [hit("look-alike", 0.93, "d2"), hit("other", 0.90, "d3"), hit("own", 0.82, "d1"),
            hit("same-file", 0.5, "d1")]
    ranked = exact_picture_first(hits, "d1")
    assert [h.product_id for h in ranked] == ["own", "same-file", "look-alike", "other"]
    assert [h.score for h in ranked[2:]] == [0.93, 0.90]
    groups = collapse(ranked, cosine=0.99)
    assert [(g.best.product_id, g.also) for g in groups] == [
        ("own", ["same-file"]), ("look-alike", []), ("other", [])]
    assert exact_picture_first(hits, "") == hits  # a text query: score order
    assert exact_picture_first(hits, "d9") == hits  # a picture the catalog does not hold
