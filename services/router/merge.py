"""Merging per-shard top-k lists into one global top-k (FAISS contrib's result heap, in short)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from proto.search import SearchResponse


@dataclass(frozen=True)
class Merged:
    product_id: str
    score: float
    shard_id: int
    fields: bytes  # packed ProductFields, as the shard holds them
    vector: np.ndarray | None = None  # when asked for (duplicate collapse)


def merge_topk(responses: Iterable[SearchResponse], k: int, query: int = 0) -> list[Merged]:
    """Best k hits of one query over all shards; a product seen twice (e.g. mid re-shard)
    keeps its best score."""
    best: dict[str, Merged] = {}
    for response in responses:
        scored = zip(response.ids[query], response.scores[query], strict=True)
        for i, (pid, score) in enumerate(scored):
            if pid not in best or score > best[pid].score:
                best[pid] = Merged(pid, score, response.shard_id, response.fields_of(query, i),
                                   response.vector_of(query, i))
    return heapq.nlargest(k, best.values(), key=lambda hit: (hit.score, hit.product_id))
