"""vitrine.training.data: the fixed splits, captions and degraded titles."""

from __future__ import annotations

import random
from pathlib import Path

from vitrine.training.data import (
    Product,
    attribute_captions,
    degraded_titles,
    split_of,
    strip_words,
)

SHIRT = Product(
    15970, "Turtle Check Men Navy Blue Shirt",
    {"gender": "Men", "colour": "Navy Blue", "article_type": "Shirts", "usage": "Casual"},
    Path("15970.jpg"),
)


def test_splits_are_fixed_by_id() -> None:
    assert [split_of(i) for i in (17, 13, 10, 29)] == ["test", "val", "train", "train"]


def test_attribute_captions_skip_templates_with_missing_keys() -> None:
    captions = attribute_captions(SHIRT)
    assert "Navy Blue Shirts" in captions and "Men Navy Blue Casual Shirts" in captions
    assert captions["Navy Blue Checked Shirts"] == {
        "colour": "Navy Blue", "pattern": "Checked", "article_type": "Shirts"}  # from the title
    assert not any("None" in caption for caption in captions)
    assert len(captions) == len(set(captions))


def test_strip_words_matches_singular_and_plural() -> None:
    assert strip_words(SHIRT.title, ["Navy Blue", "Shirts"]) == "Turtle Check Men"


def test_degraded_titles_vary_and_are_reproducible() -> None:
    first = degraded_titles(SHIRT, 20, random.Random(0))
    assert first == degraded_titles(SHIRT, 20, random.Random(0))
    assert len(set(first)) > 3
    assert all(set(t.split()) <= set(SHIRT.title.split()) for t in first)
