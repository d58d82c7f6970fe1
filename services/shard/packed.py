"""The sealed segment's per-row tables without a Python object per row: byte strings (product
ids, packed fields) in two numpy arrays, and an id -> row lookup over sorted id hashes.

A Python `str` or `bytes` costs about 50 bytes of header, a list slot 8 and a dict entry 40 or
more beyond its content; at millions of rows that overhead is larger than the data. Here a row
costs its content plus an int64 offset, and 16 bytes in the lookup; every table serialises as
plain arrays. Covered by tests/shard/test_fields.py.
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


# A product id's 64-bit hash: a polynomial over its UTF-8 bytes, then a finaliser (splitmix64)
# so nearby ids spread. The same function vectorised (`id_hashes`) and for one id (`id_hash`);
# it only places ids in `IdLookup`, which compares the ids themselves, so a collision costs a
# comparison, never a wrong answer.
_MULTIPLIER = 0x100000001B3
_MASK = (1 << 64) - 1


def id_hash(product_id: bytes) -> int:
    h = 0
    power = 1
    for byte in product_id:
        h = (h + (byte + 1) * power) & _MASK
        power = (power * _MULTIPLIER) & _MASK
    return _finalise(h)


def _finalise(h: int) -> int:
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def id_hashes(ids: PackedBytes, chunk_rows: int = 1 << 20) -> np.ndarray:
    """`id_hash` of every row (uint64), a chunk of rows at a time to bound the temporaries."""
    out = np.empty(len(ids), dtype=np.uint64)
    longest = int(np.diff(ids.offsets).max()) if len(ids) else 0
    powers = np.ones(max(1, longest), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(1, longest):
            powers[i] = powers[i - 1] * np.uint64(_MULTIPLIER)
        for start in range(0, len(ids), chunk_rows):
            stop = min(len(ids), start + chunk_rows)
            first, last = ids.offsets[start], ids.offsets[stop]
            lengths = np.diff(ids.offsets[start: stop + 1])
            row = np.repeat(np.arange(stop - start), lengths)
            position = np.arange(last - first) - (ids.offsets[start:stop] - first)[row]
            terms = (ids.data[first:last].astype(np.uint64) + np.uint64(1)) * powers[position]
            sums = np.zeros(stop - start, dtype=np.uint64)
            np.add.at(sums, row, terms)
            out[start:stop] = _finalise_all(sums)
    return out


def _finalise_all(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


class IdLookup:
    """Product id -> rows holding it, for an immutable column of ids: the rows sorted by id
    hash (12 bytes a row), searched with `searchsorted`. No Python object per product."""

    def __init__(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        self.hashes = hashes  # uint64, sorted
        self.rows = rows  # int64: the row of each sorted hash

    @classmethod
    def of(cls, ids: PackedBytes) -> IdLookup:
        hashes = id_hashes(ids)
        order = np.argsort(hashes, kind="stable")
        return cls(hashes[order], order.astype(np.int64))

    def extended(self, more: PackedBytes, offset: int) -> IdLookup:
        """This lookup plus `more` as rows offset.. (a sealed segment's merge): two sorted runs,
        which a stable sort merges in linear time."""
        added = IdLookup.of(more)
        hashes = np.concatenate([self.hashes, added.hashes])
        order = np.argsort(hashes, kind="stable")
        rows = np.concatenate([self.rows, added.rows + offset])
        return IdLookup(hashes[order], rows[order])

    def spans_of(self, product_ids: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) into `rows` of each id's hash: many ids in three numpy calls."""
        hashes = id_hashes(PackedBytes.of(product_ids))
        return (np.searchsorted(self.hashes, hashes, side="left"),
                np.searchsorted(self.hashes, hashes, side="right"))

    def rows_of(self, product_id: bytes) -> np.ndarray:
        h = np.uint64(id_hash(product_id))
        lo = int(np.searchsorted(self.hashes, h, side="left"))
        hi = int(np.searchsorted(self.hashes, h, side="right"))
        return self.rows[lo:hi]

    @property
    def nbytes(self) -> int:
        return int(self.hashes.nbytes + self.rows.nbytes)
