"""vitrine.training.eval: queries, graded relevance and metrics on a hand-built mini catalog."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrine.training.data import Product
from vitrine.training.eval import (
    build_queries,
    condition_texts,
    grades,
    own_image_top1,
    retrieval_metrics,
    summarise,
)


def product(pid: int, title: str, **attributes: str) -> Product:
    return Product(pid, title, attributes, Path(f"{pid}.jpg"))


CATALOG = [
    product(1, "Nike Men Red Shoes", gender="Men", colour="Red", article_type="Shoes"),
    product(2, "Puma Women Blue Shoes", gender="Women", colour="Blue", article_type="Shoes"),
    product(3, "Levis Men Red Shirt", gender="Men", colour="Red", article_type="Shirts"),
]


def test_queries_are_distinct_attribute_combinations() -> None:
    texts = [(q.kind, q.text) for q in build_queries(CATALOG)]
    assert ("colour type", "Red Shoes") in texts
    assert ("gender colour type", "Men Red Shirts") in texts
    assert not any(kind == "usage type" for kind, _ in texts)  # nobody has a usage
    assert len(texts) == len(set(texts)) == 6


def test_grades_full_match_two_article_type_one() -> None:
    queries = [q for q in build_queries(CATALOG) if q.text == "Red Shoes"]
    assert grades(queries, CATALOG).tolist() == [[2, 1, 0]]


def test_metrics_of_known_rankings() -> None:
    graded = np.array([[2, 1, 0, 0], [0, 0, 1, 2]], dtype=np.int8)
    # query 0 ranked perfectly; query 1 ranks its only full match last, the partial one third
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.9, 0.8, 0.7, 0.1]])
    per_query = retrieval_metrics(scores, graded)
    assert per_query["ndcg@10"][0] == pytest.approx(1.0)
    ideal = 3 + 1 / np.log2(3)
    assert per_query["ndcg@10"][1] == pytest.approx((1 / 2 + 3 / np.log2(5)) / ideal)
    assert per_query["mrr"].tolist() == [1.0, 0.25]
    assert per_query["recall@10"].tolist() == [1.0, 1.0]  # within the top 10, out of 1
    summary = summarise(per_query, build_queries(CATALOG)[:2])
    assert summary["all"]["mrr"] == pytest.approx(62.5)
    assert summary["all"]["queries"] == 2


def test_recall_is_capped_by_k() -> None:
    graded = np.full((1, 200), 2, dtype=np.int8)
    per_query = retrieval_metrics(np.linspace(1, 0, 200)[None], graded)
    assert per_query["recall@10"][0] == 1.0 and per_query["recall@100"][0] == 1.0


def test_conditions_drop_attributes_then_sparsify_every_second_title() -> None:
    full, titles, sparse = (condition_texts(CATALOG, c) for c in ("i", "ii", "iii"))
    assert full[0] == "Nike Men Red Shoes. Men Red Shoes"
    assert titles == [p.title for p in CATALOG]
    assert sparse == ["Nike Men Red Shoes", "Puma Women", "Levis Men Red Shirt"]


def test_own_image_top1_counts_ties_as_found() -> None:
    images = np.eye(3, dtype=np.float32)
    assert own_image_top1(images, images) == 100.0
    assert own_image_top1(images, images[[1, 0, 2]]) == pytest.approx(100 / 3)
    assert own_image_top1(images, np.ones((3, 3), dtype=np.float32)) == 100.0


def test_live_eval_grades_hits_by_their_attributes_against_the_pooled_ideal() -> None:
    """Two models' answers to one query, judged from what the hits show: the pooled ideal is
    the best the two found together."""
    from vitrine.training.eval import Query
    from vitrine.training.live_eval import grade, live_metrics

    query = Query("red shirts", "colour type", {"colour": "Red", "article_type": "Shirts"})
    assert grade(query, {"colour": "red ", "article_type": "Shirts"}) == 2
    assert grade(query, {"colour": "Blue", "article_type": "Shirts"}) == 1
    assert grade(query, {"colour": "Red", "article_type": "Jeans"}) == 0
    both = live_metrics({
        "a": [("p1", 2), ("p2", 1), ("p3", 0)],
        "b": [("p3", 0), ("p4", 2), ("p1", 2)],
    })
    ideal = 3 / np.log2(2) + 3 / np.log2(3) + 1 / np.log2(4)  # p1, p4 (2, 2), p2 (1)
    assert both["a"]["ndcg@10 pooled"] == pytest.approx((3 + 1 / np.log2(3)) / ideal)
    assert both["b"]["ndcg@10 pooled"] == pytest.approx((3 / np.log2(3) + 3 / np.log2(4)) / ideal)
    assert (both["a"]["p@10"], both["a"]["mrr"]) == (0.1, 1.0)
    assert (both["b"]["p@10"], both["b"]["mrr"]) == (0.2, 0.5)
    assert live_metrics({"a": [("p9", 0)]})["a"] == {"ndcg@10 pooled": 0.0, "p@10": 0.0,
                                                     "mrr": 0.0}
