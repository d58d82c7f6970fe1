"""vitrine.training.eval: queries, graded relevance and metrics on a hand-built mini catalog."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrine.training.data import Product, pattern_words
from vitrine.training.eval import (
    CONDITIONS,
    build_queries,
    condition_texts,
    evaluate,
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


def test_conditions_drop_attributes_then_sparsify_every_second_title_then_all_text() -> None:
    full, titles, sparse, none = (condition_texts(CATALOG, c) for c in CONDITIONS)
    assert full[0] == "Nike Men Red Shoes. Men Red Shoes"
    assert titles == [p.title for p in CATALOG]
    assert sparse == ["Nike Men Red Shoes", "Puma Women", "Levis Men Red Shirt"]
    assert none == ["", "", ""]
    with pytest.raises(ValueError, match="unknown condition"):
        condition_texts(CATALOG, "v")


PATTERNED = [
    product(1, "Roadster Men Striped Blue Shirt", colour="Blue", article_type="Shirts"),
    product(2, "Roadster Men Stripes Navy Shirt", colour="Navy", article_type="Shirts"),
    product(3, "Arrow Men Check Blue Shirt", colour="Blue", article_type="Shirts"),
    product(4, "Hidesign Women Leather Printed Bag", colour="Brown", article_type="Handbags"),
    product(5, "Woodland Men Brown Shoes", colour="Brown", article_type="Shoes"),
]


def test_pattern_words_are_canonical_and_whole_words() -> None:
    assert pattern_words("Roadster Men Stripes Navy Shirt") == ("Striped",)
    assert pattern_words("Hidesign Women Leather Printed Bag") == ("Printed", "Leather")
    assert pattern_words("Silky Smooth Footprints Socks") == ()  # not inside other words
    assert pattern_words("") == ()


def test_pattern_queries_come_from_titles_and_grade_by_title_words() -> None:
    queries = {q.text: q for q in build_queries(PATTERNED)}
    pattern = {text: q.kind for text, q in queries.items() if "pattern" in q.kind}
    assert pattern == {
        "Striped Shirts": "pattern type", "Checked Shirts": "pattern type",
        "Printed Handbags": "pattern type", "Leather Handbags": "pattern type",
        "Blue Striped Shirts": "colour pattern type", "Navy Striped Shirts": "colour pattern type",
        "Blue Checked Shirts": "colour pattern type",
        "Brown Printed Handbags": "colour pattern type",
        "Brown Leather Handbags": "colour pattern type",
    }
    picked = [queries[t] for t in ("Striped Shirts", "Blue Striped Shirts", "Leather Handbags")]
    assert grades(picked, PATTERNED).tolist() == [
        [2, 2, 1, 0, 0],  # both spellings of stripes; the checked shirt is a shirt only
        [2, 1, 1, 0, 0],
        [0, 0, 0, 2, 0],
    ]


def test_every_group_and_condition_is_measured_on_a_model_with_known_answers() -> None:
    """A stand-in text tower with one axis per query, and pictures that score each query by
    its grade: the image row ranks perfectly in every condition and group, the text row only
    where the product text names the query."""
    queries = build_queries(PATTERNED)
    axis = {q.text: i for i, q in enumerate(queries)}

    class Exact:
        fusion = None

        def encode_texts(self, texts: list[str]) -> np.ndarray:
            out = np.zeros((len(texts), len(axis)), dtype=np.float32)
            for row, text in enumerate(texts):
                out[row, axis.get(text, 0)] = 1
            return out

    graded = grades(queries, PATTERNED)
    images = graded.T.astype(np.float32)
    results = evaluate(Exact(), PATTERNED, image_vectors=images)  # type: ignore[arg-type]
    assert list(results) == list(CONDITIONS)
    assert list(results["iv"]) == ["image only"]  # no text: nothing else to rank by
    for condition in CONDITIONS:
        for group in ("all", "attributes", "pattern/material", "pattern type"):
            for metric in ("ndcg@10", "mrr"):
                assert results[condition]["image only"][group][metric] == pytest.approx(100)
    assert results["iv"]["image only"]["pattern/material"]["queries"] == 9
    assert results["i"]["text only"]["pattern/material"]["ndcg@10"] < 100  # texts miss them


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
    striped = Query("Striped Shirts", "pattern type", {"pattern": "Striped",
                                                         "article_type": "Shirts"})
    assert grade(striped, {"article_type": "Shirts"}, "Roadster Men Stripes Shirt") == 2
    assert grade(striped, {"article_type": "Shirts"}, "Roadster Men Solid Shirt") == 1
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
