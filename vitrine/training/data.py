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
    ("pattern", "article_type"),
    ("colour", "pattern", "article_type"),
    ("gender", "pattern", "sub_category"),
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


# --- pattern and material words: what a title says that the picture shows --------------------

# Canonical word -> the title words that name it ("Stripes" is "Striped"). The eval asks for
# them ("Striped Shirts") and training predicts them from the picture: the image must carry them
# when the title is gone.
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "Striped": ("striped", "stripes", "stripe"),
    "Checked": ("checked", "check", "checks", "plaid"),
    "Printed": ("printed", "print", "prints"),
    "Solid": ("solid",),
    "Floral": ("floral",),
    "Graphic": ("graphic",),
    "Polka Dot": ("polka",),
    "Washed": ("washed",),
    "Embroidered": ("embroidered",),
    "Lace": ("lace",),
    "Metallic": ("metallic",),
    "Leather": ("leather",),
    "Denim": ("denim",),
    "Canvas": ("canvas",),
    "Suede": ("suede",),
    "Cotton": ("cotton",),
    "Silk": ("silk",),
    "Velvet": ("velvet",),
    "Satin": ("satin",),
    "Knitted": ("knit", "knitted"),
    "Woven": ("woven",),
    "Fleece": ("fleece",),
    "Crepe": ("crepe",),
}
_PATTERN_OF = {form: word for word, forms in PATTERN_WORDS.items() for form in forms}
PATTERN = "pattern"  # a fact that is not an attribute: a pattern/material word of the title


def pattern_words(title: str) -> tuple[str, ...]:
    """The canonical pattern/material words a title carries, in PATTERN_WORDS order."""
    found = {_PATTERN_OF[w] for w in re.findall(r"[a-z]+", title.lower()) if w in _PATTERN_OF}
    return tuple(word for word in PATTERN_WORDS if word in found)


def product_facts(product: Product) -> list[dict[str, str]]:
    """What a caption or query may say of a product: its attributes, once per pattern word of
    its title (a "Printed Leather" bag is both a printed and a leather bag)."""
    return [product.attributes | {PATTERN: word} for word in pattern_words(product.title)] or [
        product.attributes
    ]


# --- captions: what a shopper might type about a product ---------------------------------------


def attribute_phrase(attributes: dict[str, str], keys: Sequence[str]) -> str | None:
    """The values of `keys` joined by spaces, or None when the product lacks one of them."""
    if not all(attributes.get(key) for key in keys):
        return None
    return " ".join(attributes[key] for key in keys)


def attribute_captions(product: Product) -> dict[str, dict[str, str]]:
    """Each distinct phrase of every template the product has all keys for, with what it names
    (the facts another product must share to be described by it too)."""
    captions: dict[str, dict[str, str]] = {}
    for facts in product_facts(product):
        for keys in CAPTION_TEMPLATES:
            phrase = attribute_phrase(facts, keys)
            if phrase:
                captions.setdefault(phrase, {key: facts[key] for key in keys})
    return captions


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
