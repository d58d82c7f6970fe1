"""Exact inner-product index over a dense matrix this class owns: the growing segment.

Owning the storage makes upsert and delete O(1) (swap-remove), which no FAISS GPU index offers,
while the scan itself is FAISS's brute-force kNN: `faiss.knn` on CPU, `faiss.knn_gpu` when the
installed FAISS sees a GPU. Each row carries its filter columns (services/shard/attributes.py),
so filters apply before the top-k, and its product's packed fields (what a hit shows). Covered by
tests/shard/test_index.py.
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
        self._codes = np.full((capacity, fields), -1, dtype=np.float32)
        self._ids: list[str] = []
        self._fields: list[bytes] = []  # slot -> packed ProductFields
        self._fields_bytes = 0
        self._slots: dict[str, int] = {}
        self._gpu_resources = gpu_resources() if self.use_gpu else None

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, product_id: str) -> bool:
        return product_id in self._slots

    def upsert(
        self,
        product_id: str,
        vector: np.ndarray,
        codes: np.ndarray | None = None,
        fields: bytes = b"",
    ) -> None:
        if vector.shape != (self.dim,):
            raise InvalidMessage(f"vector of shape {vector.shape}, index dim is {self.dim}")
        slot = self._slots.get(product_id)
        if slot is None:
            slot = len(self._ids)
            self._grow_to(slot + 1)
            self._ids.append(product_id)
            self._fields.append(b"")
            self._slots[product_id] = slot
        self._fields_bytes += len(fields) - len(self._fields[slot])
        self._fields[slot] = fields
        self._vectors[slot] = vector
        if codes is not None:
            self._codes[slot] = codes

    def remove(self, product_id: str) -> bool:
        slot = self._slots.pop(product_id, None)
        if slot is None:
            return False
        last = len(self._ids) - 1
        self._fields_bytes -= len(self._fields[slot])
        if slot != last:
            moved = self._ids[last]
            self._vectors[slot] = self._vectors[last]
            self._codes[slot] = self._codes[last]
            self._ids[slot] = moved
            self._fields[slot] = self._fields[last]
            self._slots[moved] = slot
        self._ids.pop()
        self._fields.pop()
        return True

    def search(
        self, queries: np.ndarray, k: int, where: CompiledFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) (nq, k'): best first, k' = min(k, rows passing the filter). Rows are
        slots, valid until the next change: read them (`product_id`, `fields`) right away."""
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
            nq = queries.shape[0]
            return np.zeros((nq, 0), dtype=np.float32), np.zeros((nq, 0), dtype=np.int64)
        if self._gpu_resources is not None:
            scores, rows = faiss.knn_gpu(
                self._gpu_resources, queries, base, k, metric=faiss.METRIC_INNER_PRODUCT
            )
        else:
            scores, rows = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
        if slots is not None:
            rows = np.where(rows >= 0, slots[np.maximum(rows, 0)], -1)
        return scores, rows

    def product_id(self, row: int) -> str:
        return self._ids[row]

    def product_fields(self, row: int) -> bytes:
        return self._fields[row]

    def vectors16(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors[rows].astype(np.float16)

    def fields_of(self, product_id: str) -> bytes:
        return self._fields[self._slots[product_id]]

    def codes_of(self, product_id: str) -> np.ndarray:
        return self._codes[self._slots[product_id]]

    def export(self) -> tuple[list[str], np.ndarray, np.ndarray, list[bytes]]:
        """A copy of (ids, vectors, codes, fields) in slot order: a consistent cut."""
        n = len(self._ids)
        return list(self._ids), self._vectors[:n].copy(), self._codes[:n].copy(), \
            list(self._fields)

    def vector_of(self, product_id: str) -> np.ndarray:
        return self._vectors[self._slots[product_id]]

    @classmethod
    def from_arrays(
        cls,
        ids: list[str],
        vectors: np.ndarray,
        codes: np.ndarray | None = None,
        use_gpu: bool | None = None,
        fields: list[bytes] | None = None,
    ) -> ExactIndex:
        if vectors.ndim != 2 or len(ids) != len(vectors) or len(set(ids)) != len(ids):
            raise InvalidMessage("snapshot ids and vectors do not line up")
        if fields is not None and len(fields) != len(ids):
            raise InvalidMessage("snapshot ids and fields do not line up")
        width = 0 if codes is None else codes.shape[1]
        index = cls(vectors.shape[1], use_gpu, capacity=max(1024, len(ids)), fields=width)
        index._vectors[: len(ids)] = vectors
        if codes is not None:
            index._codes[: len(ids)] = codes
        index._ids = list(ids)
        index._fields = list(fields) if fields is not None else [b""] * len(ids)
        index._fields_bytes = sum(map(len, index._fields))
        index._slots = {pid: slot for slot, pid in enumerate(ids)}
        return index

    def nbytes(self) -> int:
        return self._vectors.nbytes + self._codes.nbytes + self._fields_bytes

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
        codes = np.full((capacity, self._codes.shape[1]), -1, dtype=np.float32)
        codes[: len(self._codes)] = self._codes
        self._vectors, self._codes = grown, codes
