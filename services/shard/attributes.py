"""Filterable product attributes as small integer codes, one column per field.

A filter ("gender in {Women}" and "colour in {Red, Maroon}") becomes a vectorised `np.isin` over
the code columns of a segment, giving the row mask that FAISS applies *before* the top-k is cut
(an IDSelector), so a filter never returns fewer than k results while k matching products exist.
Values compare case-insensitively and trimmed. Covered by tests/shard/test_segments.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vitrine.errors import InvalidQuery

MISSING = -1  # the code of a field the product does not carry


def normalise(value: str) -> str:
    return value.strip().casefold()


@dataclass(frozen=True)
class CompiledFilter:
    """Per filtered field: its column and the codes it accepts (empty: matches nothing)."""

    clauses: tuple[tuple[int, np.ndarray], ...]

    def mask(self, codes: np.ndarray) -> np.ndarray:
        """Rows of `codes` (n, fields) that pass every clause."""
        passing = np.ones(len(codes), dtype=bool)
        for column, accepted in self.clauses:
            passing &= np.isin(codes[:, column], accepted)
        return passing


class AttributeCodes:
    """Vocabulary per field, append-only, so codes stay valid across segments and snapshots."""

    def __init__(self, fields: Sequence[str], vocab: Mapping[str, Sequence[str]] | None = None):
        self.fields = list(fields)
        self._codes: dict[str, dict[str, int]] = {field: {} for field in self.fields}
        for field, values in (vocab or {}).items():
            if field in self._codes:
                self._codes[field] = {value: code for code, value in enumerate(values)}

    @property
    def width(self) -> int:
        return len(self.fields)

    def encode(self, attributes: Mapping[str, str]) -> np.ndarray:
        row = np.full(self.width, MISSING, dtype=np.int32)
        for column, field in enumerate(self.fields):
            value = attributes.get(field)
            if value is not None and normalise(value):
                known = self._codes[field]
                row[column] = known.setdefault(normalise(value), len(known))
        return row

    def compile(self, filters: Mapping[str, Sequence[str]]) -> CompiledFilter | None:
        """None for no filter; InvalidQuery for a field the shards do not index."""
        clauses = []
        for field, values in filters.items():
            if field not in self._codes:
                raise InvalidQuery(
                    f"cannot filter on {field!r}: filterable fields are {', '.join(self.fields)}"
                )
            known = self._codes[field]
            accepted = [known[normalise(v)] for v in values if normalise(v) in known]
            clauses.append((self.fields.index(field), np.array(accepted, dtype=np.int32)))
        return CompiledFilter(tuple(clauses)) if clauses else None

    def export(self) -> dict[str, list[str]]:
        """Values in code order per field: enough to rebuild the same codes."""
        return {field: list(codes) for field, codes in self._codes.items()}
