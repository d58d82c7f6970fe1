"""The fashion catalog as training and evaluation data: splits, captions, degraded titles.

Products come through `vitrine.catalog.events_from_csv`, the same reading of the CSV that the
local stack publishes, so training sees exactly the title and attributes the encoder sees.
The split is fixed by the issue: `id % 10 == 7` is test, `== 3` validation, the rest training.

Covered by tests/training/test_data.py.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vitrine.catalog import events_from_csv

Split = Literal["train", "val", "test"]
TEST_REMAINDER, VAL_REMAINDER = 7, 3

# Query-like attribute phrases: the image head learns from these as well as from titles (the
# issue measured titles alone as much weaker). Varied on purpose: several key subsets and orders.
CAPTION_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("colour", "article_type"),
    ("gender", "colour", "article_type"),
    ("usage", "article_type"),
    ("gender", "article_type"),
    ("article_type",),
    ("colour", "sub_category"),
    ("season", "article_type"),
    ("gender", "usage", "article_type"),
    ("colour", "usage", "article_type"),
    ("gender", "colour", "usage", "article_type"),
    ("colour", "gender", "sub_category"),
)


@dataclass(frozen=True)
class Product:
    """One catalog row: what the encoder gets from a CatalogEvent, plus the image path."""

    id: int
    title: str
    attributes: dict[str, str] = field(hash=False)
    image: Path = field(hash=False)

    @property
    def split(self) -> Split:
        return split_of(self.id)


def split_of(product_id: int) -> Split:
    remainder = product_id % 10
    if remainder == TEST_REMAINDER:
        return "test"
    return "val" if remainder == VAL_REMAINDER else "train"


def load_products(data_dir: Path, limit: int | None = None) -> list[Product]:
    """Every product of `data_dir/products.csv` with its image path, in file order."""
    images = data_dir / "images"
    return [
        Product(int(event.product_id), event.title, dict(event.attributes),
                images / f"{event.product_id}.jpg")
        for event in events_from_csv(data_dir / "products.csv", images, limit, version=0)
    ]


def in_split(products: Sequence[Product], split: Split) -> list[Product]:
    return [product for product in products if product.split == split]


# --- captions: what a shopper might type about a product ---------------------------------------


def attribute_phrase(attributes: dict[str, str], keys: Sequence[str]) -> str | None:
    """The values of `keys` joined by spaces, or None when the product lacks one of them."""
    if not all(attributes.get(key) for key in keys):
        return None
    return " ".join(attributes[key] for key in keys)


def attribute_captions(product: Product) -> list[str]:
    """The distinct attribute phrases of every template the product has all keys for."""
    phrases = (attribute_phrase(product.attributes, keys) for keys in CAPTION_TEMPLATES)
    return list(dict.fromkeys(p for p in phrases if p))


# --- degraded titles: the sparse catalog the fusion module must cope with ----------------------


def _stem(word: str) -> str:
    word = re.sub(r"[^0-9a-z]", "", word.lower())
    return word[:-1] if word.endswith("s") and len(word) > 3 else word


def strip_words(title: str, phrases: Sequence[str]) -> str:
    """The title without the words of `phrases` ("Shirts" also removes "Shirt")."""
    stems = {_stem(word) for phrase in phrases for word in phrase.split()}
    return " ".join(word for word in title.split() if _stem(word) not in stems)


def sparse_title(product: Product) -> str:
    """The eval's short title (condition iii): no colour and no article-type words."""
    named = [product.attributes.get(key, "") for key in ("colour", "article_type")]
    return strip_words(product.title, [phrase for phrase in named if phrase])


def _drop_words(words: list[str], rng: random.Random) -> list[str]:
    kept = [word for word in words if rng.random() > 0.4]
    return kept or [rng.choice(words)]


def _truncate(words: list[str], rng: random.Random) -> list[str]:
    return words[: rng.randint(1, max(1, len(words) - 1))]


def _brand_only(words: list[str], rng: random.Random) -> list[str]:
    return words[: rng.choice((1, 1, 2))]


Degradation = Callable[[Product, random.Random], str]


def _words_degradation(edit: Callable[[list[str], random.Random], list[str]]) -> Degradation:
    return lambda product, rng: " ".join(edit(product.title.split(), rng)) if product.title else ""


def _strip_attribute(key: str) -> Degradation:
    def strip(product: Product, _: random.Random) -> str:
        value = product.attributes.get(key)
        return strip_words(product.title, [value]) if value else product.title

    return strip


# Varied on purpose, and not the eval's own perturbation (colour AND type words removed).
DEGRADATIONS: tuple[Degradation, ...] = (
    _words_degradation(_drop_words),
    _words_degradation(_truncate),
    _words_degradation(_brand_only),
    _strip_attribute("colour"),
    _strip_attribute("article_type"),
)


def degraded_titles(product: Product, count: int, rng: random.Random) -> list[str]:
    """`count` titles, each degraded by a randomly chosen edit."""
    return [rng.choice(DEGRADATIONS)(product, rng) for _ in range(count)]
