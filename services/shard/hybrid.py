"""Fusing a shard's dense and lexical rankings, and counting facets over its candidates.

Two fusions, chosen by `VITRINE_HYBRID_FUSION` (benchmarks/hybrid.py measures both):

- reciprocal rank fusion (Cormack et al., 2009; what Elasticsearch, OpenSearch and Vespa
  offer): a product scores the sum of 1 / (rrf_k + rank) over the rankings it appears in, so
  neither retriever's scale matters, only its order;
- a weighted score: (1 - w) x cosine + w x BM25 / the query's best BM25 on this shard. A
  product one retriever did not return gets that retriever's floor (the lowest cosine it
  returned; BM25 0), so a rare word the shopper typed (a brand, a model name) can lift a
  product the vectors ranked low, which ranks alone cannot.

The fused score is what the router merges by. Covered by tests/shard/test_lexical.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from proto.vectors import ProductFields
from services.shard.attributes import normalise
from services.shard.store import Hits

TIE_SHARE = 1e-6  # of a lexical contribution: decides ties, never an order of ranks


def reciprocal_rank_fusion(dense: Hits, lexical: Hits, k: int, rrf_k: float) -> Hits:
    """Per query, the best k of the union of both rankings by fused score. A tie goes to the
    better lexical rank, through a share of its contribution far below any rank step: a
    product only BM25 found first ties with one only the vectors found first, and the words
    the shopper typed are the more specific evidence. In the score, so the router's merge
    across shards breaks the tie the same way."""
    fused = Hits([], [], [])
    for q in range(len(dense.ids)):
        scores: dict[str, float] = {}
        fields: dict[str, bytes] = {}
        for ranking, tie_share in ((dense, 0.0), (lexical, TIE_SHARE)):
            for rank, (pid, packed) in enumerate(
                zip(ranking.ids[q], ranking.fields[q], strict=True), start=1
            ):
                contribution = 1.0 / (rrf_k + rank)
                scores[pid] = scores.get(pid, 0.0) + contribution * (1.0 + tie_share)
                fields.setdefault(pid, packed)
        best = sorted(scores, key=lambda pid: (-scores[pid], pid))[:k]
        fused.scores.append([scores[pid] for pid in best])
        fused.ids.append(best)
        fused.fields.append([fields[pid] for pid in best])
    return fused


def weighted_fusion(dense: Hits, lexical: Hits, k: int, weight: float) -> Hits:
    """Per query, the best k of the union by (1 - weight) x cosine + weight x normalised BM25
    (see the module doc), ties to the product id."""
    fused = Hits([], [], [])
    for q in range(len(dense.ids)):
        cosines = dict(zip(dense.ids[q], dense.scores[q], strict=True))
        best_bm25 = max(lexical.scores[q], default=0.0)
        bm25 = {pid: score / best_bm25 for pid, score in
                zip(lexical.ids[q], lexical.scores[q], strict=True)} if best_bm25 > 0 else {}
        floor = min(dense.scores[q], default=0.0)
        fields = dict(zip(lexical.ids[q], lexical.fields[q], strict=True))
        fields.update(zip(dense.ids[q], dense.fields[q], strict=True))
        scores = {
            pid: (1 - weight) * cosines.get(pid, floor) + weight * bm25.get(pid, 0.0)
            for pid in fields
        }
        best = sorted(scores, key=lambda pid: (-scores[pid], pid))[:k]
        fused.scores.append([scores[pid] for pid in best])
        fused.ids.append(best)
        fused.fields.append([fields[pid] for pid in best])
    return fused


def count_facets(fields: Sequence[bytes], facets: Sequence[str]) -> dict[str, dict[str, int]]:
    """facet -> value -> how many of these products carry it. Values count case-insensitively
    and show as first spelled."""
    counts: dict[str, Counter[str]] = {name: Counter() for name in facets}
    shown: dict[str, dict[str, str]] = {name: {} for name in facets}
    for packed in fields:
        attributes = ProductFields.unpack(packed).attributes
        for name in facets:
            value = attributes.get(name)
            if value is not None and normalise(value):
                key = normalise(value)
                counts[name][key] += 1
                shown[name].setdefault(key, value.strip())
    return {
        name: {shown[name][key]: n for key, n in counts[name].most_common()} for name in facets
    }
