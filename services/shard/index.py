"""Exact inner-product index over a dense matrix this class owns: the growing segment.

Owning the storage makes upsert and delete O(1) (swap-remove), which no FAISS GPU index offers,
while the scan itself is FAISS's brute-force kNN: `faiss.knn` on CPU, `faiss.knn_gpu` when the
installed FAISS sees a GPU. Each row carries its attribute codes so filters apply before the
top-k. Covered by tests/shard/test_index.py.
"""

from __future__ import annotations

import functools
from typing import Any

import faiss
import numpy as np

from services.shard.attributes import CompiledFilter
from vitrine.errors import InvalidMessage


def gpu_available() -> bool:
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


@functools.cache
def gpu_resources() -> Any:
    """The process's FAISS GPU resources (scratch memory, streams): one for every index."""
    return faiss.StandardGpuResources()  # type: ignore[attr-defined]  # GPU builds only


class ExactIndex:
    def __init__(
        self, dim: int, use_gpu: bool | None = None, capacity: int = 1024, fields: int = 0
    ) -> None:
        self.dim = dim
        self.use_gpu = gpu_available() if use_gpu is None else use_gpu
        self._vectors = np.zeros((capacity, dim), dtype=np.float32)
        self._codes = np.full((capacity, fields), -1, dtype=np.int32)
        self._ids: list[str] = []
        self._slots: dict[str, int] = {}
        self._gpu_resources = gpu_resources() if self.use_gpu else None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._slots

    def upsert(self, product_id: str, vector: np.ndarray, codes: np.ndarray | None = None) -> None:
        if vector.shape != (self.dim,):
            raise InvalidMessage(f"vector of shape {vector.shape}, index dim is {self.dim}")
        slot = self._slots.get(product_id)
        if slot is None:
            slot = len(self._ids)
            self._grow_to(slot + 1)
            self._ids.append(product_id)
            self._slots[product_id] = slot
        self._vectors[slot] = vector
        if codes is not None:
            self._codes[slot] = codes

    def remove(self, product_id: str) -> bool:
        slot = self._slots.pop(product_id, None)
        if slot is None:
            return False
        last = len(self._ids) - 1
        if slot != last:
            moved = self._ids[last]
            self._vectors[slot] = self._vectors[last]
            self._codes[slot] = self._codes[last]
            self._ids[slot] = moved
            self._slots[moved] = slot
        self._ids.pop()
        return True

    def search(
        self, queries: np.ndarray, k: int, where: CompiledFilter | None = None
    ) -> tuple[np.ndarray, list[list[str]]]:
        """(scores (nq, k'), ids): best first, k' = min(k, rows passing the filter)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidMessage(f"queries of shape {queries.shape}, index dim is {self.dim}")
        n = len(self._ids)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        base = self._vectors[:n]
        slots = None if where is None else np.flatnonzero(where.mask(self._codes[:n]))
        if slots is not None:
            base = base[slots]
        k = min(k, len(base))
        if k == 0:
            return np.zeros((queries.shape[0], 0), dtype=np.float32), [[] for _ in queries]
        if self._gpu_resources is not None:
            scores, rows = faiss.knn_gpu(
                self._gpu_resources, queries, base, k, metric=faiss.METRIC_INNER_PRODUCT
            )
        else:
            scores, rows = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        if slots is not None:
            rows = np.where(rows >= 0, slots[np.maximum(rows, 0)], -1)
        ids = [[self._ids[r] for r in row if r >= 0] for row in rows]
        return scores, ids

    def export(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """A copy of (ids, vectors, codes) in slot order: a consistent cut for a snapshot."""
        n = len(self._ids)
        return list(self._ids), self._vectors[:n].copy(), self._codes[:n].copy()

    def vector_of(self, product_id: str) -> np.ndarray:
        return self._vectors[self._slots[product_id]]

    @classmethod
    def from_arrays(
        cls,
        ids: list[str],
        vectors: np.ndarray,
        codes: np.ndarray | None = None,
        use_gpu: bool | None = None,
    ) -> ExactIndex:
        if vectors.ndim != 2 or len(ids) != len(vectors) or len(set(ids)) != len(ids):
            raise InvalidMessage("snapshot ids and vectors do not line up")
        fields = 0 if codes is None else codes.shape[1]
        index = cls(vectors.shape[1], use_gpu, capacity=max(1024, len(ids)), fields=fields)
        index._vectors[: len(ids)] = vectors
        if codes is not None:
            index._codes[: len(ids)] = codes
        index._ids = list(ids)
        index._slots = {pid: slot for slot, pid in enumerate(ids)}
        return index

    def nbytes(self) -> int:
        return self._vectors.nbytes + self._codes.nbytes

    def shrink(self) -> None:
        """Give back the capacity a seal emptied (it only ever grew)."""
        n = len(self._ids)
        capacity = max(1024, 2 * n)
        if capacity < len(self._vectors):
            self._vectors = self._vectors[:capacity].copy()
            self._codes = self._codes[:capacity].copy()

    def _grow_to(self, size: int) -> None:
        if size <= len(self._vectors):
            return
        capacity = max(size, 2 * len(self._vectors))
        grown = np.zeros((capacity, self.dim), dtype=np.float32)
        grown[: len(self._vectors)] = self._vectors
        codes = np.full((capacity, self._codes.shape[1]), -1, dtype=np.int32)
        codes[: len(self._codes)] = self._codes
        self._vectors, self._codes = grown, codes
