"""`VectorRecord` on `catalog.vectors`: the latest embedding of a product and what a hit shows
of it, key = product_id.

The topic is log-compacted in production, so replaying it rebuilds any shard, fields and all:
it is the only home of a product's title, image and attributes (no side store to lose). A
delete is a tombstone record (op="delete", no vector) so it wins over older upserts during a
replay.

Schema versions: 2 adds what a hit shows and filters on beyond the attributes: `title`,
`image_uri`, `price`, `in_stock`, and `image_digest` (what duplicate collapse compares).
Version 1 records (written before) still read, with all of them empty: their products stay
searchable and show their fields once their next event is encoded.
"""

from __future__ import annotations

from typing import Literal

import msgpack
import numpy as np
from pydantic import BaseModel, Field, model_validator

from proto.catalog import MAX_IMAGE_URI_CHARS, MAX_PRICE, MAX_TITLE_CHARS
from proto.codec import MAX_VERSION, STRICT, check_schema_version, pack, unpack, validated
from proto.errors import InvalidMessage

VECTOR_RECORD_SCHEMA_VERSION: Literal[2] = 2
READABLE_VECTOR_RECORD_VERSIONS = (1, 2)
_DTYPES = {"f16": np.float16, "f32": np.float32}


class ProductFields(BaseModel):
    """What a hit shows and filters on. Shards keep it packed (`pack`) beside the vector and
    send it back as is; only the router unpacks it, for the hits that make the answer."""

    model_config = STRICT

    title: str = ""
    image_uri: str = ""
    attributes: dict[str, str] = Field(default_factory=dict)
    price: float | None = None
    in_stock: bool | None = None
    image_digest: str = ""

    def pack(self) -> bytes:
        """A msgpack array [title, image_uri, attributes, price, in_stock, image_digest]: no
        key names repeated per product."""
        return msgpack.packb(
            [self.title, self.image_uri, self.attributes, self.price, self.in_stock,
             self.image_digest],
            use_bin_type=True,
        )

    @staticmethod
    def digest_of(data: bytes) -> str:
        """Just the picture digest of packed fields ('' if none or unreadable): what collapse
        reads of every candidate, without decoding the rest."""
        try:
            values = msgpack.unpackb(data, raw=False) if data else None
            digest = values[_PACKED_ORDER.index("image_digest")] if values else ""
        except Exception:  # unreadable: the full unpack will say so
            return ""
        return digest if isinstance(digest, str) else ""

    @classmethod
    def unpack(cls, data: bytes) -> ProductFields:
        """The fields `pack` wrote; empty bytes (a shard's row from a v1 record) is no fields."""
        if not data:
            return cls()
        try:
            values = msgpack.unpackb(data, raw=False)
            return cls(**dict(zip(_PACKED_ORDER, values, strict=True)))
        except Exception as exc:  # any bytes: an answer or InvalidMessage, as in proto.codec
            raise InvalidMessage(f"product fields are not {list(_PACKED_ORDER)}: "
                                 f"{type(exc).__name__}") from exc


_PACKED_ORDER = ("title", "image_uri", "attributes", "price", "in_stock", "image_digest")



class VectorRecord(BaseModel):
    model_config = STRICT

    schema_version: Literal[1, 2] = VECTOR_RECORD_SCHEMA_VERSION
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
    title: str = Field(default="", max_length=MAX_TITLE_CHARS)
    image_uri: str = Field(default="", max_length=MAX_IMAGE_URI_CHARS)
    price: float | None = Field(default=None, ge=0, le=MAX_PRICE)
    in_stock: bool | None = None
    image_digest: str = Field(
        default="", max_length=64, pattern=r"^[0-9a-f]*$",
        description="Hex digest of the picture's bytes ('' unknown): equal pictures collapse",
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
        title: str = "",
        image_uri: str = "",
        price: float | None = None,
        in_stock: bool | None = None,
        image_digest: str = "",
    ) -> VectorRecord:
        data = np.ascontiguousarray(vector, dtype=_DTYPES[dtype]).reshape(-1)
        return cls(
            op="upsert", product_id=product_id, version=version, model_id=model_id,
            dim=int(data.shape[0]), dtype=dtype, vector=data.tobytes(),
            event_time_ms=event_time_ms, attributes=attributes or {},
            title=title, image_uri=image_uri, price=price, in_stock=in_stock,
            image_digest=image_digest,
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

    def fields(self) -> ProductFields:
        """Built without validating again: this record's fields were checked on decode."""
        return ProductFields.model_construct(
            title=self.title, image_uri=self.image_uri, attributes=self.attributes,
            price=self.price, in_stock=self.in_stock, image_digest=self.image_digest,
        )

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> VectorRecord:
        payload = unpack(data)
        check_schema_version(payload, READABLE_VECTOR_RECORD_VERSIONS, "VectorRecord")
        return validated(cls, payload)
