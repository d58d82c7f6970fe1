"""The router's public search API: what the storefront sends and what it gets back.

The answers are built from these types (services/router/app.py), and the OpenAPI document at
`GET /openapi.json` is generated from them (services/router/openapi.py), so the document
cannot drift from what the router says; tests/router/test_openapi.py checks real answers
against it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.search import MAX_MODEL_ID_CHARS


class SearchBody(BaseModel):
    """POST /search: exactly one of `text` and `image_b64`; GET /search takes the same options
    as parameters (`q` for the text, filters as `field=value,value`)."""

    model_config = ConfigDict(extra="forbid", title="SearchBody")

    text: str | None = Field(default=None, description="What the shopper typed")
    image_b64: str | None = Field(
        default=None, description="A picture (JPEG, PNG, WEBP, GIF or BMP), base64: shop the "
        "look. A catalog picture, byte for byte, ranks its own product first",
    )
    k: int | None = Field(default=None, ge=1, description="How many results (default: setting)")
    filters: dict[str, list[str] | str] = Field(
        default_factory=dict,
        description="Attribute -> accepted values (any of them); every attribute must match",
    )
    mode: Literal["dense", "lexical", "hybrid"] | None = Field(
        default=None,
        description="Retrieval: dense (vectors), lexical (BM25), hybrid (both, fused by "
        "reciprocal rank); default: the setting for text, dense for images (the only one)",
    )
    offset: int | None = Field(default=None, ge=0, description="Skip this many results: pages")
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)
    in_stock: bool | None = Field(default=None, description="Only products in stock (true)")
    facets: list[str] | str | None = Field(
        default=None, description="Filterable fields to count values of among the candidates"
    )
    collapse: bool | None = Field(
        default=None, description="Show one result per picture, the others in `also`"
    )
    model: str | None = Field(
        default=None, min_length=1, max_length=MAX_MODEL_ID_CHARS,
        description="A served model's id (offline comparison, A/B); default: the active model",
    )


class Hit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_id: str
    score: float = Field(description="Cosine of the query and the product vectors")
    title: str
    image_uri: str
    attributes: dict[str, str] = Field(
        default_factory=dict, description="The product's attributes, as its latest event gave"
    )
    price: float | None = None
    in_stock: bool | None = None
    also: list[str] = Field(
        default_factory=list,
        description="Products with the same or a nearly identical picture, collapsed into this",
    )


class FacetValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: str
    count: int = Field(ge=0)


class Coverage(BaseModel):
    """Like Vespa's coverage report: how much of the catalog this answer looked at."""

    model_config = ConfigDict(extra="forbid")

    shards_answered: int = Field(ge=0)
    shards_total: int = Field(ge=0)
    vectors_searched: int = Field(ge=0)
    vectors_total: int = Field(ge=0, description="A missing shard counts its last known size")
    ratio: float = Field(ge=0, le=1)


class SearchAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[Hit] = Field(description="Best first")
    partial: bool = Field(description="Some shard did not answer within the deadline")
    missing_shards: list[int]
    partial_reason: str | None = Field(
        default=None,
        description="Why the answer is partial: each missing shard with its reason, or the "
        "router's own query encoding when it spent the whole budget",
    )
    coverage: Coverage
    mode: Literal["dense", "lexical", "hybrid"]
    offset: int = Field(ge=0)
    next_offset: int | None = Field(description="The next page's offset; null: no more")
    facets: dict[str, list[FacetValue]] = Field(
        default_factory=dict, description="Per facet asked, value counts, most frequent first"
    )
    facet_candidates: int = Field(
        default=0, ge=0, description="How many candidates the facets counted (over all shards)"
    )
    model_id: str = Field(
        default="", description="The model the query was encoded with and searched in"
    )
    took_ms: float = Field(ge=0)


class ApiError(BaseModel):
    """Every error answer of every Vitrine service, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="What was wrong, in words")
