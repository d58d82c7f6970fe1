"""Text-to-image retrieval over one split, with graded relevance from the attributes.

Queries are built from the products' own attributes ("{colour} {article_type}", ...) and from
the pattern or material words their titles carry ("Striped Shirts": `data.PATTERN_WORDS`). A
product is graded 2 when everything the query names matches, 1 when only its article type does.
Metrics, averaged over queries:

- Recall@K: fully relevant products in the top K over min(K, how many there are), so a
  perfect ranking scores 1 even when a query has hundreds of relevant products;
- NDCG@10 with gains 2^grade - 1; MRR: 1 / rank of the first fully relevant product.

Four product-side conditions: (i) image, title and attributes; (ii) image and title; (iii)
image and title, every second product's title without its colour and article-type words; (iv)
the image alone (no title, no attributes). Rows: text only, image only, the plain average, and
the model's product vectors. Query groups: "attributes" (the three attribute templates, the
headline figures comparable across releases), "pattern/material", "all", and each template.

Covered by tests/training/test_eval.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.model import DualEncoder, ModelSpec, load_dual_encoder, product_text
from vitrine.training.data import (
    PATTERN,
    PATTERN_WORDS,
    Product,
    Split,
    attribute_phrase,
    in_split,
    load_products,
    pattern_words,
    product_facts,
    sparse_title,
)

QUERY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour type": ("colour", "article_type"),
    "gender colour type": ("gender", "colour", "article_type"),
    "usage type": ("usage", "article_type"),
    "pattern type": (PATTERN, "article_type"),
    "colour pattern type": ("colour", PATTERN, "article_type"),
}
QUERY_GROUPS: dict[str, tuple[str, ...]] = {
    "attributes": ("colour type", "gender colour type", "usage type"),
    "pattern/material": ("pattern type", "colour pattern type"),
}
CONDITIONS = ("i", "ii", "iii", "iv")
CONDITION_NAMES = {
    "i": "image + title + attributes",
    "ii": "image + title",
    "iii": "image + sparse titles",
    "iv": "image alone",
}
METRICS = ("recall@10", "recall@100", "ndcg@10", "mrr")


@dataclass(frozen=True)
class Query:
    text: str
    kind: str
    wanted: dict[str, str]


def build_queries(products: Sequence[Product]) -> list[Query]:
    """One query per distinct combination of each template's keys among `products`."""
    queries: dict[str, Query] = {}
    for kind, keys in QUERY_TEMPLATES.items():
        for product in products:
            for facts in product_facts(product):
                text = attribute_phrase(facts, keys)
                if text and text not in queries:
                    queries[text] = Query(text, kind, {key: facts[key] for key in keys})
    return list(queries.values())


def grades(queries: Sequence[Query], products: Sequence[Product]) -> np.ndarray:
    """(queries, products) int8: 2 everything named matches, 1 the article type only."""
    keys = {key for query in queries for key in query.wanted} - {PATTERN} | {"article_type"}
    columns = {key: np.array([p.attributes.get(key, "") for p in products]) for key in keys}
    carries = {word: np.zeros(len(products), dtype=bool) for word in PATTERN_WORDS}
    for i, product in enumerate(products):
        for word in pattern_words(product.title):
            carries[word][i] = True
    out = np.zeros((len(queries), len(products)), dtype=np.int8)
    for q, query in enumerate(queries):
        if "article_type" in query.wanted:
            out[q, columns["article_type"] == query.wanted["article_type"]] = 1
        full = np.logical_and.reduce([carries[v] if k == PATTERN else columns[k] == v
                                      for k, v in query.wanted.items()])
        out[q, full] = 2
    return out


def retrieval_metrics(scores: np.ndarray, graded: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query metrics of a (queries, products) score matrix against its grades."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranked = np.take_along_axis(graded, order, axis=1)
    relevant = (graded == 2).sum(axis=1)
    full = ranked == 2
    out = {}
    for k in (10, 100):
        out[f"recall@{k}"] = full[:, :k].sum(axis=1) / np.maximum(np.minimum(relevant, k), 1)
    discount = 1 / np.log2(np.arange(2, 12))
    gains = (2.0 ** ranked[:, :10].astype(np.float64) - 1) @ discount[: ranked[:, :10].shape[1]]
    ideal = -np.sort(-graded, axis=1)[:, :10].astype(np.float64)
    ideal_gains = (2.0**ideal - 1) @ discount[: ideal.shape[1]]
    out["ndcg@10"] = gains / np.maximum(ideal_gains, 1e-12)
    first = np.where(full.any(axis=1), full.argmax(axis=1) + 1, np.inf)
    out["mrr"] = 1 / first
    return out


def summarise(per_query: dict[str, np.ndarray], queries: Sequence[Query]) -> dict[str, dict]:
    """Means over all queries ("all"), per QUERY_GROUPS and per query kind, in percent."""
    kinds = np.array([query.kind for query in queries])
    groups = {"all": np.ones(len(queries), dtype=bool)}
    groups |= {name: np.isin(kinds, members) for name, members in QUERY_GROUPS.items()}
    groups |= {kind: kinds == kind for kind in QUERY_TEMPLATES}
    return {
        name: {m: float(100 * per_query[m][mask].mean()) if mask.any() else float("nan")
               for m in METRICS} | {"queries": int(mask.sum())}
        for name, mask in groups.items()
    }


def condition_texts(products: Sequence[Product], condition: str) -> list[str]:
    """The product-side text of each product under a condition (every second: by position)."""
    if condition == "i":
        return [product_text(p.title, p.attributes) for p in products]
    if condition == "ii":
        return [p.title for p in products]
    if condition == "iii":
        return [sparse_title(p) if i % 2 else p.title for i, p in enumerate(products)]
    if condition == "iv":
        return ["" for _ in products]
    raise ValueError(f"unknown condition {condition!r}: one of {', '.join(CONDITIONS)}")


def evaluate(
    encoder: DualEncoder, products: Sequence[Product], image_vectors: np.ndarray | None = None
) -> dict[str, dict[str, dict[str, dict]]]:
    """{condition: {row: {query group: {metric: value}}}} for one model over `products`.

    `image_vectors` may be passed when the caller has them (training's validation);
    otherwise the images are encoded here through the serving path.
    """
    from vitrine.training.features import load_images

    queries = build_queries(products)
    graded = grades(queries, products)
    query_vectors = encoder.encode_texts([query.text for query in queries])
    if image_vectors is None:
        image_vectors = encoder.encode_images(load_images([p.image for p in products]))
    results: dict[str, dict[str, dict[str, dict]]] = {}
    for condition in CONDITIONS:
        texts = condition_texts(products, condition)
        has_text = np.array([bool(text.strip()) for text in texts])
        text_vectors = np.zeros_like(image_vectors)
        if has_text.any():
            text_vectors[has_text] = encoder.encode_texts([t for t in texts if t.strip()])
        rows = {"image only": image_vectors}
        if has_text.any():  # without text, the text row ranks nothing and the others equal images
            rows = {"text only": text_vectors} | rows | {
                "average": _average(image_vectors, text_vectors)}
        if encoder.fusion is not None:
            rows["fused"] = encoder.fuse(image_vectors, text_vectors, has_text)
        results[condition] = {
            row: summarise(retrieval_metrics(query_vectors @ vectors.T, graded), queries)
            | {"image query": {"self@1": own_image_top1(image_vectors, vectors)}}
            for row, vectors in rows.items()
        }
    return results


def own_image_top1(image_vectors: np.ndarray, product_vectors: np.ndarray) -> float:
    """Percent of products that a "more like this" query with their own picture ranks first
    (ties count: some products share a byte-identical picture)."""
    hits = 0
    for start in range(0, len(image_vectors), 1024):
        scores = image_vectors[start : start + 1024] @ product_vectors.T
        own = scores[np.arange(len(scores)), np.arange(start, start + len(scores))]
        hits += int((own >= scores.max(axis=1) - 1e-6).sum())
    return 100 * hits / max(1, len(image_vectors))


def _average(image_vectors: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    summed = image_vectors + text_vectors
    return summed / np.maximum(np.linalg.norm(summed, axis=1, keepdims=True), 1e-12)


def markdown_table(named: dict[str, dict[str, dict[str, dict[str, dict]]]]) -> str:
    """A line per (model, row): attribute queries (NDCG@10 / R@10 / R@100 / MRR), then NDCG@10
    of pattern/material queries, then image queries, each per condition ("-": no such row)."""
    conditions = " | ".join(f"({c})" for c in CONDITIONS)
    tables = [
        ("attribute queries, NDCG@10 / R@10 / R@100 / MRR",
         lambda row: " / ".join(f"{row['attributes'][m]:.1f}" for m in
                                ("ndcg@10", "recall@10", "recall@100", "mrr"))),
        ("pattern/material queries, NDCG@10",
         lambda row: f"{row['pattern/material']['ndcg@10']:.1f}"),
        ("an image query finds its own product first, %",
         lambda row: f"{row['image query']['self@1']:.1f}"),
    ]
    lines: list[str] = []
    for title, cell in tables:
        lines += [*([""] if lines else []), f"{title}:", f"| model | row | {conditions} |",
                  "|" + " --- |" * (2 + len(CONDITIONS))]
        for model, results in named.items():
            for row in results["i"]:
                cells = [cell(results[c][row]) if row in results[c] else "-" for c in CONDITIONS]
                lines.append(f"| {model} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_spec(
    spec: ModelSpec, data_dir: Path, split: Split = "test", threads: int | None = None
) -> dict[str, dict[str, dict[str, dict]]]:
    """Load a model exactly as the services do and evaluate it on one split."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    encoder = load_dual_encoder(spec)
    products = in_split(load_products(data_dir), split)
    return evaluate(encoder, products)
