"""An immutable column of byte strings in two numpy arrays: what a sealed segment keeps per row.

A Python `bytes` costs 33 bytes of header and a list slot of 8 beyond its content; at millions
of rows that overhead is larger than the product fields themselves. Here a row costs its
content plus one int64 offset, and the column serialises as two plain arrays.
Covered by tests/shard/test_segments.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class PackedBytes:
    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or \
                offsets[-1] != len(data) or np.any(np.diff(offsets) < 0):
            raise ValueError("packed offsets do not describe the data")
        self.data = data  # uint8: every row's bytes, back to back
        self.offsets = offsets  # int64 (rows + 1): row r is data[offsets[r]:offsets[r + 1]]

    @classmethod
    def of(cls, rows: Iterable[bytes]) -> PackedBytes:
        rows = list(rows)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(row) for row in rows], out=offsets[1:])
        return cls(np.frombuffer(b"".join(rows), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row: int) -> bytes:
        return self.data[self.offsets[row]: self.offsets[row + 1]].tobytes()

    def take(self, rows: Sequence[int] | np.ndarray) -> PackedBytes:
        return PackedBytes.of(self[int(r)] for r in rows)

    def concat(self, other: PackedBytes) -> PackedBytes:
        offsets = np.concatenate([self.offsets, other.offsets[1:] + self.offsets[-1]])
        return PackedBytes(np.concatenate([self.data, other.data]), offsets)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)
