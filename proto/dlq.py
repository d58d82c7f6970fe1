"""`DeadLetter` on `catalog.events.dlq`: an event we could not process, kept whole with why.

The original bytes are preserved untouched so the catalog team can fix and replay them.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from proto.codec import check_schema_version, pack, unpack, validated

DEAD_LETTER_SCHEMA_VERSION = 1


class DeadLetter(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    reason: str
    stage: Literal["decode", "fetch", "image", "encode"] = Field(
        description="decode: not a valid event; fetch: image could not be read; "
        "image: bytes are not an acceptable image; encode: the model failed"
    )
    original: bytes
    key: bytes | None = None
    source_topic: str
    source_partition: int
    source_offset: int
    failed_at_ms: int = Field(default_factory=lambda: int(time.time() * 1000))

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> DeadLetter:
        payload = unpack(data)
        check_schema_version(payload, DEAD_LETTER_SCHEMA_VERSION, "DeadLetter")
        return validated(cls, payload)
