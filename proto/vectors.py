"""`VectorRecord` on `catalog.vectors`: the latest embedding of a product, key = product_id.

The topic is log-compacted in production, so replaying it rebuilds any shard. A delete is a
tombstone record (op="delete", no vector) so it wins over older upserts during a replay.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from proto.codec import MAX_VERSION, STRICT, check_schema_version, pack, unpack, validated

VECTOR_RECORD_SCHEMA_VERSION = 1
_DTYPES = {"f16": np.float16, "f32": np.float32}


class VectorRecord(BaseModel):
    model_config = STRICT

    schema_version: Literal[1] = 1
    op: Literal["upsert", "delete"]
    product_id: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=0, le=MAX_VERSION)
    model_id: str = Field(min_length=1)
    dim: int = Field(default=0, ge=0, le=65536)
    dtype: Literal["f16", "f32"] = "f32"
    vector: bytes = b""
    event_time_ms: int = Field(
        default=0, ge=0, le=MAX_VERSION,
        description="When the catalog event was published (0: unknown)",
    )
    attributes: dict[str, str] = Field(
        default_factory=dict, description="The event's attributes: what shards filter on"
    )

    @model_validator(mode="after")
    def _vector_matches_dim(self) -> VectorRecord:
        expected = self.dim * np.dtype(_DTYPES[self.dtype]).itemsize
        if self.op == "upsert" and (self.dim == 0 or len(self.vector) != expected):
            raise ValueError(
                f"vector has {len(self.vector)} bytes, expected {expected} for "
                f"dim={self.dim} {self.dtype}"
            )
        if self.op == "delete" and self.vector:
            raise ValueError("a delete tombstone carries no vector")
        return self

    @classmethod
    def upsert(
        cls,
        product_id: str,
        version: int,
        model_id: str,
        vector: np.ndarray,
        dtype: Literal["f16", "f32"] = "f32",
        event_time_ms: int = 0,
        attributes: dict[str, str] | None = None,
    ) -> VectorRecord:
        data = np.ascontiguousarray(vector, dtype=_DTYPES[dtype]).reshape(-1)
        return cls(
            op="upsert", product_id=product_id, version=version, model_id=model_id,
            dim=int(data.shape[0]), dtype=dtype, vector=data.tobytes(),
            event_time_ms=event_time_ms, attributes=attributes or {},
        )

    @classmethod
    def tombstone(
        cls, product_id: str, version: int, model_id: str, event_time_ms: int = 0
    ) -> VectorRecord:
        return cls(
            op="delete", product_id=product_id, version=version, model_id=model_id,
            event_time_ms=event_time_ms,
        )

    def as_array(self) -> np.ndarray:
        """The vector as float32, whatever its wire precision."""
        return np.frombuffer(self.vector, dtype=_DTYPES[self.dtype]).astype(np.float32)

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> VectorRecord:
        payload = unpack(data)
        check_schema_version(payload, VECTOR_RECORD_SCHEMA_VERSION, "VectorRecord")
        return validated(cls, payload)
