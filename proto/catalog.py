"""`CatalogEvent` on `catalog.events`: what the catalog system publishes, key = product_id.

Publishers in other languages get the JSON Schema from `vitrine schema`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from proto.codec import check_schema_version, pack, unpack, validated

CATALOG_EVENT_SCHEMA_VERSION = 1
MAX_PRODUCT_ID_LEN = 128


class CatalogEvent(BaseModel):
    """One product create/update (`upsert`) or `delete`, versioned per product."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    op: Literal["upsert", "delete"]
    product_id: str = Field(
        min_length=1, max_length=MAX_PRODUCT_ID_LEN, pattern=r"^[A-Za-z0-9._:\-]+$"
    )
    version: int = Field(ge=0, description="Monotonic per product, e.g. update time in ms")
    image_uri: str | None = Field(
        default=None, max_length=4096, description="http(s):// or file:// (required for upsert)"
    )
    title: str = Field(default="", max_length=1024)
    attributes: dict[str, str] = Field(
        default_factory=dict, description="Free-form: colour, category, gender, ..."
    )

    @model_validator(mode="after")
    def _upsert_needs_image(self) -> CatalogEvent:
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
        payload = unpack(data)
        check_schema_version(payload, CATALOG_EVENT_SCHEMA_VERSION, "CatalogEvent")
        return validated(cls, payload)


def catalog_event_json_schema() -> dict[str, Any]:
    schema = CatalogEvent.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["required"] = ["schema_version", *schema.get("required", [])]
    schema["description"] = (
        "Vitrine catalog event, msgpack-encoded on topic catalog.events, key = product_id."
    )
    return schema
