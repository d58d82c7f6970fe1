"""Merging per-shard top-k lists into one global top-k (FAISS contrib's result heap, in short)."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from proto.search import SearchResponse


@dataclass(frozen=True)
class Hit:
    product_id: str
    score: float
    shard_id: int


def merge_topk(responses: Iterable[SearchResponse], k: int, query: int = 0) -> list[Hit]:
    """Best k hits of one query over all shards; a product seen twice (e.g. mid re-shard)
    keeps its best score."""
    best: dict[str, Hit] = {}
    for response in responses:
        for pid, score in zip(response.ids[query], response.scores[query], strict=True):
            if pid not in best or score > best[pid].score:
                best[pid] = Hit(pid, score, response.shard_id)
    return heapq.nlargest(k, best.values(), key=lambda hit: (hit.score, hit.product_id))
