"""What a filter reads of a row: its attribute codes and its numbers, one float32 column each.

A row holds one small integer code per filterable field (exact in float32), then the product's
price and availability (1 in stock, 0 not; NaN: unknown). A filter ("gender in {Women}" and
"colour in {Red, Maroon}" and "price in [20, 80]" and "in stock") becomes vectorised `np.isin`
and range tests over those columns, giving the row mask that FAISS applies *before* the top-k
is cut (an IDSelector), so a filter never returns fewer than k results while k matching
products exist. A row of unknown price or stock fails a filter on it. Values compare
case-insensitively and trimmed. Covered by tests/shard/test_segments.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from vitrine.errors import InvalidQuery

MISSING = -1  # the code of a field the product does not carry
NUMBERS = ("price", "in_stock")  # the columns after the codes, in this order


@dataclass(frozen=True)
class RowFilter:
    """What a query asks of a row before the top-k: attribute values (any of the listed, for
    every listed field), a price range, availability."""

    attributes: Mapping[str, Sequence[str]] = field(default_factory=dict)
    price_min: float | None = None
    price_max: float | None = None
    in_stock: bool | None = None

    def __bool__(self) -> bool:
        return bool(self.attributes) or self.in_stock is not None or \
            self.price_min is not None or self.price_max is not None

    def key(self) -> tuple[object, ...]:
        """Hashable and equal for equal filters: requests batch together on it."""
        attributes = tuple(sorted((f, tuple(v)) for f, v in self.attributes.items()))
        return attributes, self.price_min, self.price_max, self.in_stock


def normalise(value: str) -> str:
    return value.strip().casefold()


@dataclass(frozen=True)
class CompiledFilter:
    """Per filtered field: its column and the codes it accepts (empty: matches nothing); per
    filtered number: its column and the closed range it must lie in."""

    clauses: tuple[tuple[int, np.ndarray], ...]
    ranges: tuple[tuple[int, float, float], ...] = ()

    def mask(self, codes: np.ndarray) -> np.ndarray:
        """Rows of `codes` (n, width) that pass every clause and range."""
        passing = np.ones(len(codes), dtype=bool)
        for column, accepted in self.clauses:
            passing &= np.isin(codes[:, column], accepted)
        for column, low, high in self.ranges:
            values = codes[:, column]
            passing &= (values >= low) & (values <= high)  # NaN (unknown) fails both
        return passing


class AttributeCodes:
    """Vocabulary per field, append-only, so codes stay valid across segments and snapshots."""

    def __init__(self, fields: Sequence[str], vocab: Mapping[str, Sequence[str]] | None = None):
        self.fields = list(fields)
        self._codes: dict[str, dict[str, int]] = {name: {} for name in self.fields}
        for name, values in (vocab or {}).items():
            if name in self._codes:
                self._codes[name] = {value: code for code, value in enumerate(values)}

    @property
    def width(self) -> int:
        return len(self.fields) + len(NUMBERS)

    def encode(
        self, attributes: Mapping[str, str], price: float | None = None,
        in_stock: bool | None = None,
    ) -> np.ndarray:
        row = np.full(self.width, MISSING, dtype=np.float32)
        for column, name in enumerate(self.fields):
            value = attributes.get(name)
            if value is not None and normalise(value):
                known = self._codes[name]
                row[column] = known.setdefault(normalise(value), len(known))
        row[len(self.fields)] = np.nan if price is None else price
        row[len(self.fields) + 1] = np.nan if in_stock is None else float(in_stock)
        return row

    def check_fields(self, names: Sequence[str], what: str) -> None:
        """InvalidQuery for a name that is not a filterable field."""
        for name in names:
            if name not in self._codes:
                raise InvalidQuery(
                    f"cannot {what} on {name!r}: filterable fields are {', '.join(self.fields)}"
                )

    def compile(self, where: RowFilter | Mapping[str, Sequence[str]]) -> CompiledFilter | None:
        """None for no filter; InvalidQuery for a field the shards do not index."""
        if not isinstance(where, RowFilter):
            where = RowFilter(attributes=where)
        clauses = []
        self.check_fields(list(where.attributes), "filter")
        for name, values in where.attributes.items():
            known = self._codes[name]
            accepted = [known[normalise(v)] for v in values if normalise(v) in known]
            clauses.append((self.fields.index(name), np.array(accepted, dtype=np.float32)))
        price_column, stock_column = len(self.fields), len(self.fields) + 1
        ranges = []
        if where.price_min is not None or where.price_max is not None:
            low = -np.inf if where.price_min is None else where.price_min
            high = np.inf if where.price_max is None else where.price_max
            ranges.append((price_column, float(np.float32(low)), float(np.float32(high))))
        if where.in_stock is not None:
            ranges.append((stock_column, float(where.in_stock), float(where.in_stock)))
        if not clauses and not ranges:
            return None
        return CompiledFilter(tuple(clauses), tuple(ranges))

    def export(self) -> dict[str, list[str]]:
        """Values in code order per field: enough to rebuild the same codes."""
        return {name: list(codes) for name, codes in self._codes.items()}
