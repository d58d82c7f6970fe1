"""Router -> shard search RPC: msgpack over HTTP POST /search.

The deadline travels as a relative budget (like gRPC's timeout header) so clock skew between
hosts cannot make a shard drop or keep work it should not.

Schema versions: in 2 every hit comes with its product's fields (`proto.vectors.ProductFields`,
packed), so the router needs nothing but the shards to answer; a request also carries the
retrieval mode (dense, lexical, hybrid) with each query's text, price and stock filters, the
facets to count, and whether to send each hit's vector (for duplicate collapse). A shard
answers in the version it was asked in, so during a rolling upgrade an old router still gets
the answers it reads.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from proto.codec import STRICT, check_schema_version, pack, unpack, validated

SEARCH_SCHEMA_VERSION: Literal[3] = 3
READABLE_SEARCH_VERSIONS = (1, 2, 3)
MAX_MODEL_ID_CHARS = 300
MAX_K = 1000
MAX_BATCH = 256
MAX_FACETS = 16
Mode = Literal["dense", "lexical", "hybrid"]


class SearchRequest(BaseModel):
    model_config = STRICT

    schema_version: Literal[1, 2, 3] = SEARCH_SCHEMA_VERSION
    model_id: str | None = Field(
        default=None, max_length=MAX_MODEL_ID_CHARS,
        description="v3: the model the query vectors come from; v1, v2: none (the active)",
    )
    queries: bytes = Field(description="float32 row-major (nq, dim)")
    nq: int = Field(ge=1, le=MAX_BATCH)
    dim: int = Field(ge=1, le=65536)
    k: int = Field(ge=1, le=MAX_K)
    budget_ms: float = Field(gt=0, description="Time left for this shard to answer")
    request_id: str = Field(default="", max_length=128)
    filters: dict[str, list[str]] = Field(
        default_factory=dict,
        description="attribute -> accepted values (any of); all attributes must match",
    )
    mode: Mode = "dense"
    texts: list[str] = Field(
        default_factory=list, description="lexical and hybrid: each query's text, in order"
    )
    price_min: float | None = Field(default=None, ge=0)
    price_max: float | None = Field(default=None, ge=0)
    in_stock: bool | None = None
    facets: list[str] = Field(default_factory=list, max_length=MAX_FACETS)
    facet_candidates: int = Field(
        default=0, ge=0, le=MAX_K, description="how many best candidates the facets count"
    )
    with_vectors: bool = Field(default=False, description="send each hit's vector (f16)")

    @model_validator(mode="after")
    def _shape(self) -> SearchRequest:
        _check_model_named(self.schema_version, self.model_id)
        if len(self.queries) != self.nq * self.dim * 4:
            raise ValueError(f"queries hold {len(self.queries)} bytes, not nq*dim float32")
        if self.mode != "dense" and len(self.texts) != self.nq:
            raise ValueError(f"{self.mode} search needs one text per query")
        if self.facets and not self.facet_candidates:
            raise ValueError("facets need facet_candidates")
        return self

    @classmethod
    def build(
        cls,
        queries: np.ndarray,
        k: int,
        budget_ms: float,
        request_id: str = "",
        filters: dict[str, list[str]] | None = None,
        **options: object,
    ) -> SearchRequest:
        """`options`: model_id and the version 2 fields (mode, texts, price_min, ...,
        with_vectors); without a model_id, a version 2 request."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError("queries must be a 2-d array (nq, dim)")
        return cls.model_validate({
            "queries": q.tobytes(), "nq": q.shape[0], "dim": q.shape[1], "k": k,
            "budget_ms": budget_ms, "request_id": request_id, "filters": filters or {},
            "schema_version": SEARCH_SCHEMA_VERSION if options.get("model_id") else 2,
            **options,
        })

    def query_matrix(self) -> np.ndarray:
        return np.frombuffer(self.queries, dtype=np.float32).reshape(self.nq, self.dim)

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> SearchRequest:
        payload = unpack(data)
        check_schema_version(payload, READABLE_SEARCH_VERSIONS, "SearchRequest")
        return validated(cls, payload)


class SearchResponse(BaseModel):
    """Per query, the shard's best ids, scores and fields (best first) and how much it
    searched."""

    model_config = STRICT

    schema_version: Literal[1, 2, 3] = SEARCH_SCHEMA_VERSION
    model_id: str | None = Field(
        default=None, max_length=MAX_MODEL_ID_CHARS,
        description="v3: the model whose index answered; v1, v2: none",
    )
    shard_id: int = Field(ge=0)
    ids: list[list[str]]
    scores: list[list[float]]
    fields: list[list[bytes]] = Field(
        default_factory=list,
        description="v2: per hit, its packed ProductFields (b'': none known); v1: absent",
    )
    vectors: list[list[bytes]] = Field(
        default_factory=list, description="v2, when asked: per hit, its vector as float16"
    )
    facets: list[dict[str, dict[str, int]]] = Field(
        default_factory=list,
        description="v2, when asked: per query, facet -> value -> count among the candidates",
    )
    facet_candidates: list[int] = Field(
        default_factory=list, description="per query, how many candidates the facets counted"
    )
    searched: int = Field(ge=0, description="Vectors this shard searched")

    @model_validator(mode="after")
    def _aligned(self) -> SearchResponse:
        _check_model_named(self.schema_version, self.model_id)
        shapes = [[len(row) for row in self.ids], [len(row) for row in self.scores]]
        if self.schema_version >= 2:
            shapes.append([len(row) for row in self.fields])
            if self.vectors:
                shapes.append([len(row) for row in self.vectors])
        elif self.fields or self.vectors or self.facets:
            raise ValueError("a version 1 answer carries no fields, vectors or facets")
        if any(shape != shapes[0] for shape in shapes):
            raise ValueError("ids, scores and fields must have the same shape")
        return self

    def fields_of(self, query: int, hit: int) -> bytes:
        return self.fields[query][hit] if self.fields else b""

    def vector_of(self, query: int, hit: int) -> np.ndarray | None:
        if not self.vectors:
            return None
        return np.frombuffer(self.vectors[query][hit], dtype=np.float16)  # as sent: float16

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> SearchResponse:
        payload = unpack(data)
        check_schema_version(payload, READABLE_SEARCH_VERSIONS, "SearchResponse")
        return validated(cls, payload)


def _check_model_named(version: int, model_id: str | None) -> None:
    if version >= 3 and not model_id:
        raise ValueError("a version 3 search names its model_id")
    if version < 3 and model_id is not None:
        raise ValueError(f"a version {version} search carries no model_id")
