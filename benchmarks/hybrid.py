"""Hybrid retrieval measured (prints tables; not a test): NDCG@10 of dense, lexical and hybrid
search per query type and catalog condition, duplicates in the top 10 before and after
collapse, and the latency of hybrid and facets as a ratio to dense in the same run.

    .venv/bin/python benchmarks/hybrid.py [--data ../shared/data/fashion] [--products 2000]
        [--queries 300]

A real shard store (flat index, real tantivy) is built per condition from the test split
(id % 10 == 7) with the shipped model's product vectors, each product's fields (as the encoder
writes them, picture digest included) and the eval's conditions: (i) title and attributes,
(ii) title only, (iii) every second title without its colour and type words. Queries: the
eval's attribute queries (graded 2 when every named attribute matches, 1 for the type), brand
queries "{brand} {type}" (2: that brand and type, 1: the type) and model-name queries (the
title's words beyond brand, gender, colour and type; 2: titles with all of them, 1: the type).
"""

from __future__ import annotations

import argparse
import functools
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from proto.vectors import ProductFields, VectorRecord
from services.router.merge import Merged
from services.router.search import collapse
from services.shard.hybrid import count_facets, reciprocal_rank_fusion, weighted_fusion
from services.shard.segments import IndexSpec
from services.shard.store import Hits, ShardStore
from vitrine.images import image_digest
from vitrine.model import DualEncoder, ModelSpec, load_dual_encoder
from vitrine.settings import CommonSettings
from vitrine.training.data import Product, in_split, load_products, strip_words
from vitrine.training.eval import (
    CONDITION_NAMES,
    CONDITIONS,
    Query,
    build_queries,
    condition_texts,
    grades,
    retrieval_metrics,
)
from vitrine.training.features import load_images

CANDIDATES = 100  # what each retriever hands the fusion (VITRINE_HYBRID_CANDIDATES)
WEIGHTS = (0.3, 0.5, 0.7)  # weighted fusion's share of BM25
GENDER_WORDS = {"men", "women", "boys", "girls", "unisex", "kids"}


def brand_and_model_queries(products: Sequence[Product], limit: int, seed: int) -> list[Query]:
    """Brand + type queries, and model-name queries from the titles' remaining words."""
    brands, models = {}, {}
    for product in products:
        words = product.title.split()
        kind = product.attributes.get("article_type", "")
        if len(words) < 2 or not kind:
            continue
        brand = words[0]
        brands.setdefault(f"{brand} {kind}", Query(f"{brand} {kind}", "brand",
                                                   {"brand": brand, "article_type": kind}))
        named = [product.attributes.get(k, "") for k in ("colour", "article_type")]
        rest = strip_words(" ".join(words[1:]), [n for n in named if n]).split()
        rest = [w for w in rest if w.lower() not in GENDER_WORDS]
        if len(rest) >= 2:
            text = " ".join([brand, *rest])
            models.setdefault(text, Query(text, "model name",
                                          {"title_words": text, "article_type": kind}))
    rng = random.Random(seed)
    picked = []
    for found in (list(brands.values()), list(models.values())):
        rng.shuffle(found)
        picked += found[:limit]
    return picked


def graded(queries: Sequence[Query], products: Sequence[Product]) -> np.ndarray:
    """The eval's grades, extended to brand and model-name queries."""
    attribute = [q for q in queries if q.kind not in ("brand", "model name")]
    out = np.zeros((len(queries), len(products)), dtype=np.int8)
    rows = {id(q): i for i, q in enumerate(queries)}
    if attribute:
        out[[rows[id(q)] for q in attribute]] = grades(attribute, products)
    types = np.array([p.attributes.get("article_type", "") for p in products])
    titles = [set(p.title.lower().split()) for p in products]
    firsts = np.array([p.title.split()[0].lower() if p.title else "" for p in products])
    for q in queries:
        if q.kind not in ("brand", "model name"):
            continue
        i = rows[id(q)]
        out[i, types == q.wanted["article_type"]] = 1
        if q.kind == "brand":
            full = (firsts == q.wanted["brand"].lower()) & (types == q.wanted["article_type"])
        else:
            words = set(q.wanted["title_words"].lower().split())
            full = np.array([words <= t for t in titles])
        out[i, full] = 2
    return out


def build_store(products: Sequence[Product], vectors: np.ndarray, texts: Sequence[str],
                with_attributes: bool, digests: Sequence[str], match_all: bool) -> ShardStore:
    store = ShardStore(IndexSpec(kind="flat"), CommonSettings().filter_fields,
                       seal_threshold=10**9, lexical_match_all=match_all)
    for product, vector, title, digest in zip(products, vectors, texts, digests, strict=True):
        store.apply(VectorRecord.upsert(
            str(product.id), 1, "m", vector, title=title, image_uri=str(product.image),
            attributes=product.attributes if with_attributes else {}, image_digest=digest,
        ))
    store.lexical.refresh(force=True)
    return store


def score_matrix(hits: Hits, index: dict[str, int], n: int) -> np.ndarray:
    scores = np.full((len(hits.ids), n), -np.inf, dtype=np.float32)
    for q, ids in enumerate(hits.ids):
        for rank, pid in enumerate(ids):
            scores[q, index[pid]] = -rank
    return scores


def per_kind(metric: np.ndarray, queries: Sequence[Query]) -> dict[str, float]:
    kinds = np.array([q.kind for q in queries])
    return {kind: float(100 * metric[kinds == kind].mean()) for kind in dict.fromkeys(kinds)}


def mean_ms(run: Callable[[int], object], n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        run(i)
    return (time.perf_counter() - started) * 1000 / n


def duplicates_in_top10(store: ShardStore, hits: Hits, with_collapse: bool) -> float:
    """Mean number of results per query whose picture (digest) a better one already shows."""
    repeats = []
    for ids, fields in zip(hits.ids, hits.fields, strict=True):
        vectors = store.vectors_of(ids)
        merged = [Merged(pid, 0.0, 0, packed, np.frombuffer(v, np.float16).astype(np.float32))
                  for pid, packed, v in zip(ids, fields, vectors, strict=True)]
        groups = collapse(merged, 0.97) if with_collapse else None
        shown = [g.best for g in groups][:10] if groups is not None else merged[:10]
        digests = [ProductFields.unpack(m.fields).image_digest for m in shown]
        repeats.append(len(digests) - len(set(digests)))
    return float(np.mean(repeats))


def _weighted(dense: Hits, lexical: Hits, weight: float) -> Hits:
    return weighted_fusion(dense, lexical, CANDIDATES, weight)


def latencies(store: ShardStore, vectors: np.ndarray, texts: Sequence[str]) -> dict[str, float]:
    """Mean ms per single query of each way to search, in this store."""
    n = min(200, len(texts))
    one = [vectors[i: i + 1] for i in range(n)]

    def hybrid(i: int, depth: int = 10) -> Hits:
        candidates = max(CANDIDATES, depth)
        return weighted_fusion(store.search(one[i], candidates),
                               store.lexical_search([texts[i]], candidates), depth, 0.5)

    return {
        "dense": mean_ms(lambda i: store.search(one[i], 10), n),
        "lexical": mean_ms(lambda i: store.lexical_search([texts[i]], 10), n),
        "hybrid": mean_ms(hybrid, n),
        "hybrid + facets (top 200)": mean_ms(
            lambda i: count_facets(hybrid(i, 200).fields[0], ["colour", "article_type"]), n
        ),
    }


DUPLICATE_GROUPS, DUPLICATE_CATALOG = 60, 2000


def duplicate_rates(
    encoder: DualEncoder, everything: Sequence[Product], seed: int
) -> dict[str, float]:
    """The issue's catalog: 60 groups of products sharing one picture file, among 2,000."""
    digests = {p.id: image_digest(p.image.read_bytes()) for p in everything}
    groups: dict[str, list[Product]] = {}
    for product in everything:
        groups.setdefault(digests[product.id], []).append(product)
    shared = [members for members in groups.values() if len(members) >= 3]
    rng = random.Random(seed)
    rng.shuffle(shared)
    picked = [p for members in shared[:DUPLICATE_GROUPS] for p in members[:3]]
    taken = {p.id for p in picked}
    others = [p for p in everything if p.id not in taken and len(groups[digests[p.id]]) == 1]
    catalog = picked + rng.sample(others, DUPLICATE_CATALOG - len(picked))
    texts = condition_texts(catalog, "i")
    images = encoder.encode_images(load_images([p.image for p in catalog]))
    vectors = encoder.fuse(images, encoder.encode_texts(texts), np.ones(len(texts), bool))
    store = build_store(catalog, vectors, [p.title for p in catalog], True,
                        [digests[p.id] for p in catalog], True)
    queries = [p.title for p in picked if p.title]
    hits = weighted_fusion(store.search(encoder.encode_texts(queries), 30),
                           store.lexical_search(queries, 30), 30, 0.5)
    return {"before": duplicates_in_top10(store, hits, False),
            "after": duplicates_in_top10(store, hits, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fashion"))
    parser.add_argument("--products", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=300, help="per brand / model kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lexical-match", choices=["all", "any"], default="all")
    args = parser.parse_args()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    products = in_split(load_products(args.data.resolve()), "test")[: args.products]
    encoder = load_dual_encoder(ModelSpec(CommonSettings().model_arch,
                                          CommonSettings().model_weights))
    images = load_images([p.image for p in tqdm(products, desc="images", file=sys.stderr)])
    image_vectors = encoder.encode_images(images)
    digests = [image_digest(p.image.read_bytes()) for p in products]
    queries = build_queries(products)
    queries += brand_and_model_queries(products, args.queries, args.seed)
    grade = graded(queries, products)
    texts = [q.text for q in queries]
    query_vectors = encoder.encode_texts(texts)
    index = {str(p.id): i for i, p in enumerate(products)}
    modes: dict[str, Callable[[Hits, Hits], Hits]] = {
        "dense": lambda d, lx: d, "lexical": lambda d, lx: lx,
        "hybrid rrf": lambda d, lx: reciprocal_rank_fusion(d, lx, CANDIDATES, 60.0),
        **{f"hybrid weighted {w}": functools.partial(_weighted, weight=w) for w in WEIGHTS},
    }
    table: dict[str, dict[str, dict[str, float]]] = {}
    timing: dict[str, float] = {}
    duplicates: dict[str, float] = {}
    for condition in CONDITIONS:
        product_texts = condition_texts(products, condition)
        titles = [p.title if condition != "iii" or i % 2 == 0 else t
                  for i, (p, t) in enumerate(zip(products, product_texts, strict=True))]
        has_text = np.array([bool(t.strip()) for t in product_texts])
        text_vectors = np.zeros_like(image_vectors)
        text_vectors[has_text] = encoder.encode_texts([t for t in product_texts if t.strip()])
        vectors = encoder.fuse(image_vectors, text_vectors, has_text)
        store = build_store(products, vectors, titles, condition == "i", digests,
                            args.lexical_match == "all")
        dense = store.search(query_vectors, CANDIDATES)
        lexical = store.lexical_search(texts, CANDIDATES)
        for mode, fuse in modes.items():
            ndcg = retrieval_metrics(score_matrix(fuse(dense, lexical), index, len(products)),
                                     grade)["ndcg@10"]
            table.setdefault(mode, {})[condition] = per_kind(ndcg, queries)
        if condition == "i":
            timing = latencies(store, query_vectors, texts)
    duplicates = duplicate_rates(encoder, load_products(args.data.resolve()), args.seed)
    kinds = list(dict.fromkeys(q.kind for q in queries))
    counts = {kind: sum(q.kind == kind for q in queries) for kind in kinds}
    print(f"\n{len(products)} test-split products, lexical match {args.lexical_match}; queries: "
          + ", ".join(f"{k} {counts[k]}" for k in kinds))
    for condition in CONDITIONS:
        print(f"\nNDCG@10, condition ({condition}) {CONDITION_NAMES[condition]}")
        print("| mode | " + " | ".join(kinds) + " |")
        print("|---|" + "---|" * len(kinds))
        for mode in modes:
            cells = " | ".join(f"{table[mode][condition][k]:.1f}" for k in kinds)
            print(f"| {mode} | {cells} |")
    print("\nlatency per query in the shard store, (i), same run")
    for name, ms in timing.items():
        print(f"| {name} | {ms:.2f} ms | {ms / timing['dense']:.2f}x dense |")
    print(f"\nrepeats of a picture already shown, per top 10 of a group member's title query "
          f"({DUPLICATE_GROUPS} groups of byte-identical pictures among {DUPLICATE_CATALOG} "
          "products, hybrid)")
    print(f"| before collapse | {duplicates['before']:.2f} | after | {duplicates['after']:.2f} |")


if __name__ == "__main__":
    main()
