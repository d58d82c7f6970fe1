"""A catalog export as `CatalogEvent`s: the layout of the fashion dataset's products.csv.

Shared by `vitrine ingest` (which publishes them, as the catalog system would) and training
(vitrine/training/data.py), so both read the same title and attributes from the same row.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Iterator
from pathlib import Path

from proto.catalog import CatalogEvent
from vitrine.errors import VitrineError

ATTRIBUTE_COLUMNS = (
    "gender", "master_category", "sub_category", "article_type", "colour", "season", "year",
    "usage",
)
MISSING = {"", "NA"}


def events_from_csv(
    csv_path: Path,
    images_dir: Path,
    limit: int | None = None,
    version: int | None = None,
    price_column: str | None = None,
    stock_column: str | None = None,
) -> Iterator[CatalogEvent]:
    """One upsert per row; `version` defaults to now in ms, so a re-ingest is an update.
    The fashion CSV has no price or stock: a catalog that does names its columns (a price is
    a number, a stock value true/false, yes/no or 1/0; empty or NA: unknown)."""
    version = int(time.time() * 1000) if version is None else version
    images_dir = images_dir.resolve()
    with csv_path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for column in (price_column, stock_column):
            if column is not None and column not in (reader.fieldnames or []):
                raise VitrineError(f"{csv_path} has no column {column!r}")
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                return
            title = (row.get("title") or "").strip()
            line = f"{csv_path.name} row {i + 2}"
            yield CatalogEvent(
                op="upsert",
                product_id=row["id"].strip(),
                version=version,
                image_uri=(images_dir / f"{row['id'].strip()}.jpg").as_uri(),
                title="" if title in MISSING else title,
                attributes={
                    col: row[col].strip()
                    for col in ATTRIBUTE_COLUMNS
                    if (row.get(col) or "").strip() not in MISSING
                },
                price=_price(row[price_column], line) if price_column else None,
                in_stock=_stock(row[stock_column], line) if stock_column else None,
            )


def _price(raw: str | None, line: str) -> float | None:
    text = (raw or "").strip()
    if text in MISSING:
        return None
    try:
        price = float(text)
    except ValueError:
        raise VitrineError(f"{line}: price {text!r} is not a number") from None
    if not math.isfinite(price) or price < 0:
        raise VitrineError(f"{line}: price {text!r} is not a price")
    return price


def _stock(raw: str | None, line: str) -> bool | None:
    text = (raw or "").strip().lower()
    if text in {"", "na"}:
        return None
    if text in {"true", "yes", "1", "y"}:
        return True
    if text in {"false", "no", "0", "n"}:
        return False
    raise VitrineError(f"{line}: stock {text!r} is not true/false, yes/no or 1/0")


def count_rows(csv_path: Path) -> int:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))
