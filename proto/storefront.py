"""The router's public search API: what the storefront sends and what it gets back.

The answers are built from these types (services/router/app.py), and the OpenAPI document at
`GET /openapi.json` is generated from them (services/router/openapi.py), so the document
cannot drift from what the router says; tests/router/test_openapi.py checks real answers
against it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SearchBody(BaseModel):
    """POST /search: exactly one of `text` and `image_b64`."""

    model_config = ConfigDict(extra="forbid", title="SearchBody")

    text: str | None = Field(default=None, description="What the shopper typed")
    image_b64: str | None = Field(
        default=None, description="A picture (JPEG, PNG, WEBP, GIF or BMP), base64: shop the look"
    )
    k: int | None = Field(default=None, ge=1, description="How many results (default: setting)")
    filters: dict[str, list[str] | str] = Field(
        default_factory=dict,
        description="Attribute -> accepted values (any of them); every attribute must match",
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
    took_ms: float = Field(ge=0)


class ApiError(BaseModel):
    """Every error answer of every Vitrine service, whatever its status."""

    model_config = ConfigDict(extra="forbid")

    error: str = Field(description="What was wrong, in words")
