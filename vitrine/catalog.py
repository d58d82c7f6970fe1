"""A catalog export as `CatalogEvent`s: the layout of the fashion dataset's products.csv.

Shared by `vitrine ingest` (which publishes them, as the catalog system would) and training
(vitrine/training/data.py), so both read the same title and attributes from the same row.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

from proto.catalog import CatalogEvent

ATTRIBUTE_COLUMNS = (
    "gender", "master_category", "sub_category", "article_type", "colour", "season", "year",
    "usage",
)
MISSING = {"", "NA"}


def events_from_csv(
    csv_path: Path, images_dir: Path, limit: int | None = None, version: int | None = None
) -> Iterator[CatalogEvent]:
    """One upsert per row; `version` defaults to now in ms, so a re-ingest is an update."""
    version = int(time.time() * 1000) if version is None else version
    images_dir = images_dir.resolve()
    with csv_path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if limit is not None and i >= limit:
                return
            title = (row.get("title") or "").strip()
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
            )


def count_rows(csv_path: Path) -> int:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return sum(1 for _ in csv.DictReader(f))
