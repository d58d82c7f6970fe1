"""`CatalogEvent` on `catalog.events`: what the catalog system publishes, key = product_id.

msgpack is the native encoding; a JSON object is accepted too, so a stock client (kcat, Kafka
Connect's JsonConverter, with or without its schema envelope) can publish. The encoder tells
them apart by the first byte (`proto.codec.looks_like_json`), and the same validation applies.
Publishers in other languages get the JSON Schema from `vitrine schema`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints, model_validator

from proto.codec import (
    MAX_VERSION,
    STRICT,
    check_schema_version,
    looks_like_json,
    pack,
    unpack,
    unpack_json,
    validated,
)

CATALOG_EVENT_SCHEMA_VERSION: Literal[2] = 2
READABLE_CATALOG_EVENT_VERSIONS = (1, 2)  # 2 adds price and in_stock
MAX_PRICE = 1e12
MAX_PRODUCT_ID_LEN = 128
MAX_TITLE_CHARS = 1024
MAX_IMAGE_URI_CHARS = 4096
# attributes travel with every vector record and hit: bounded so one event stays small
MAX_ATTRIBUTES = 64
MAX_ATTRIBUTE_NAME_CHARS = 64
MAX_ATTRIBUTE_VALUE_CHARS = 512

AttributeName = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ATTRIBUTE_NAME_CHARS)]
AttributeValue = Annotated[str, StringConstraints(max_length=MAX_ATTRIBUTE_VALUE_CHARS)]


class CatalogEvent(BaseModel):
    """One product create/update (`upsert`) or `delete`, versioned per product."""

    model_config = STRICT

    schema_version: Literal[1, 2] = CATALOG_EVENT_SCHEMA_VERSION
    op: Literal["upsert", "delete"]
    product_id: str = Field(
        min_length=1, max_length=MAX_PRODUCT_ID_LEN, pattern=r"^[A-Za-z0-9._:\-]+$"
    )
    version: int = Field(
        ge=0, le=MAX_VERSION, description="Monotonic per product, e.g. update time in ms"
    )
    image_uri: str | None = Field(
        default=None, max_length=MAX_IMAGE_URI_CHARS,
        description="http(s):// or file:// (required for upsert)",
    )
    title: str = Field(default="", max_length=MAX_TITLE_CHARS)
    attributes: dict[AttributeName, AttributeValue] = Field(
        default_factory=dict, max_length=MAX_ATTRIBUTES,
        description="Free-form: colour, category, gender, ...",
    )
    price: float | None = Field(
        default=None, ge=0, le=MAX_PRICE,
        description="In the catalog's currency (schema version 2; absent: unknown)",
    )
    in_stock: bool | None = Field(
        default=None, description="Available to buy now (schema version 2; absent: unknown)"
    )

    @model_validator(mode="after")
    def _upsert_needs_image(self) -> CatalogEvent:
        if self.schema_version == 1 and (self.price is not None or self.in_stock is not None):
            raise ValueError("price and in_stock need schema_version 2")
        if self.op == "upsert":
            if not self.image_uri:
                raise ValueError("an upsert needs an image_uri")
            if not self.image_uri.startswith(("http://", "https://", "file://")):
                raise ValueError("image_uri must be http://, https:// or file://")
        return self

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> CatalogEvent:
        """msgpack or JSON (see the module doc); a Kafka Connect envelope is unwrapped."""
        if looks_like_json(data):
            payload = _unwrap_connect_envelope(unpack_json(data))
        else:
            payload = unpack(data)
        check_schema_version(payload, READABLE_CATALOG_EVENT_VERSIONS, "CatalogEvent")
        return validated(cls, payload)


def _unwrap_connect_envelope(payload: dict[str, Any]) -> dict[str, Any]:
    """Kafka Connect's JsonConverter with schemas.enable=true sends {"schema", "payload"}."""
    if payload.keys() == {"schema", "payload"} and isinstance(payload["payload"], dict):
        return payload["payload"]  # type: ignore[no-any-return]
    return payload


def catalog_event_json_schema() -> dict[str, Any]:
    schema = CatalogEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["required"] = ["schema_version", *schema.get("required", [])]
    schema["description"] = (
        "Vitrine catalog event on topic catalog.events, key = product_id: msgpack, or a "
        "JSON object (optionally in a Kafka Connect {schema, payload} envelope)."
    )
    return schema
