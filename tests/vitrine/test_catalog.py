"""Reading a catalog export: the fashion CSV layout, with an optional price and stock mapping."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitrine.catalog import events_from_csv
from vitrine.errors import VitrineError

HEADER = ("id,gender,master_category,sub_category,article_type,colour,season,year,usage,title,"
          "cost,avail")


def write(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "products.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


def test_price_and_stock_columns_are_mapped(tmp_path: Path) -> None:
    csv = write(tmp_path,
                "1,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Shirt,1299.5,yes",
                "2,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,Red Top,NA,0",
                "3,Women,Apparel,Topwear,Tops,Red,Summer,2012,Casual,Red Top,,")
    events = list(events_from_csv(csv, tmp_path, price_column="cost", stock_column="avail"))
    assert [(e.price, e.in_stock) for e in events] == [(1299.5, True), (None, False),
                                                        (None, None)]
    assert events[0].schema_version == 2 and events[0].attributes["colour"] == "Navy Blue"
    plain = list(events_from_csv(csv, tmp_path))
    assert all(e.price is None and e.in_stock is None for e in plain)


@pytest.mark.parametrize(("row", "reason"), [
    ("1,Men,A,B,C,Red,Fall,2011,Casual,T,cheap,yes", "price 'cheap' is not a number"),
    ("1,Men,A,B,C,Red,Fall,2011,Casual,T,-5,yes", "price '-5' is not a price"),
    ("1,Men,A,B,C,Red,Fall,2011,Casual,T,5,maybe", "stock 'maybe' is not"),
])
def test_a_bad_price_or_stock_names_its_row(tmp_path: Path, row: str, reason: str) -> None:
    csv = write(tmp_path, row)
    with pytest.raises(VitrineError, match=f"products.csv row 2: {reason}"):
        list(events_from_csv(csv, tmp_path, price_column="cost", stock_column="avail"))


def test_a_mapped_column_must_exist(tmp_path: Path) -> None:
    with pytest.raises(VitrineError, match="no column 'price'"):
        list(events_from_csv(write(tmp_path), tmp_path, price_column="price"))
