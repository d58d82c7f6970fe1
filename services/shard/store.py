"""A shard's content: which product holds which version, applied idempotently.

A record is applied only if its version is newer than the one held (deletes included, so a
replayed old upsert cannot resurrect a deleted product). Replays and duplicates change nothing.
"""

from __future__ import annotations

import numpy as np

from proto.vectors import VectorRecord
from services.shard.index import ExactIndex
from vitrine.errors import InvalidMessage


class ShardStore:
    def __init__(self, dim: int | None = None, use_gpu: bool | None = None) -> None:
        self._use_gpu = use_gpu
        self.index: ExactIndex | None = ExactIndex(dim, use_gpu) if dim else None
        self.versions: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else 0

    def apply(self, record: VectorRecord) -> bool:
        """True if the record changed the shard; False for a stale or duplicate record."""
        held = self.versions.get(record.product_id)
        if held is not None and held >= record.version:
            return False
        if record.op == "delete":
            if self.index is not None:
                self.index.remove(record.product_id)
        else:
            self._index_for(record.dim).upsert(record.product_id, record.as_array())
        self.versions[record.product_id] = record.version
        return True

    def live_versions(self) -> dict[str, int]:
        """product_id -> version of every product this shard would return: for audits."""
        if self.index is None:
            return {}
        ids, _ = self.index.export()
        return {pid: self.versions[pid] for pid in ids}

    def export(self) -> tuple[list[str], np.ndarray, dict[str, int]]:
        """(ids, vectors, versions) copied now: with the consumed offsets, a consistent cut."""
        if self.index is None:
            return [], np.zeros((0, 0), dtype=np.float32), dict(self.versions)
        ids, vectors = self.index.export()
        return ids, vectors, dict(self.versions)

    def load(self, ids: list[str], vectors: np.ndarray, versions: dict[str, int]) -> None:
        """Replace the content with a snapshot's."""
        self.index = ExactIndex.from_arrays(ids, vectors, self._use_gpu) if ids else None
        self.versions = dict(versions)

    def clear(self) -> None:
        self.index, self.versions = None, {}

    def nbytes(self) -> int:
        return self.index.nbytes() if self.index is not None else 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        if self.index is None:
            return np.zeros((len(queries), 0), dtype=np.float32), [[] for _ in queries]
        return self.index.search(queries, k)

    def _index_for(self, dim: int) -> ExactIndex:
        if self.index is None:
            self.index = ExactIndex(dim, self._use_gpu)
        elif self.index.dim != dim:
            raise InvalidMessage(f"record of dim {dim} for an index of dim {self.index.dim}")
        return self.index
