"""`DeadLetter` on `catalog.events.dlq`: an event we could not process, with the stage and why.

Version 2 bounds every dead letter, so one can always be produced, whatever the event: the
original bytes travel whole up to a limit, else their first bytes with the length and SHA-256
of the whole; the reason is capped; an oversized key is cut. Version 1 (always whole) still
reads. The catalog team fixes and replays from here.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from proto.codec import (
    MAX_REASON_CHARS,
    STRICT,
    capped,
    check_schema_version,
    pack,
    unpack,
    validated,
)

DEAD_LETTER_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_ORIGINAL_BYTES = 256 * 1024  # far below the broker's default 1 MB message limit
MAX_KEY_BYTES = 1024
TRUNCATED_PREFIX_BYTES = 4096

Stage = Literal[
    "decode", "fetch", "image", "preprocess", "encode", "serialise", "produce", "quarantine"
]
STAGES: dict[str, str] = {
    "decode": "not a valid event",
    "fetch": "the image could not be read",
    "image": "the bytes are not an acceptable image",
    "preprocess": "the picture could not be made model-ready",
    "encode": "the model failed on this product",
    "serialise": "the vector record could not be written",
    "produce": "the broker refused the vector record",
    "quarantine": "the event failed or crashed the encoder repeatedly",
}


class DeadLetter(BaseModel):
    model_config = STRICT

    schema_version: Literal[1, 2] = 2
    reason: str = Field(max_length=MAX_REASON_CHARS)
    stage: Stage = Field(description="; ".join(f"{k}: {v}" for k, v in STAGES.items()))
    original: bytes = Field(description="The event's bytes, or their first bytes if truncated")
    original_length: int = Field(ge=0, description="Length of the whole original")
    original_sha256: str = Field(description="Hex SHA-256 of the whole original")
    truncated: bool = False
    key: bytes | None = Field(default=None, max_length=MAX_KEY_BYTES)
    key_truncated: bool = False
    source_topic: str
    source_partition: int
    source_offset: int
    attempts: int = Field(default=1, ge=1, description="Times the encoder tried this event")
    failed_at_ms: int = Field(default_factory=lambda: int(time.time() * 1000))

    @model_validator(mode="before")
    @classmethod
    def _complete_version_1(cls, payload: Any) -> Any:
        """A version-1 letter always carried the whole original: derive what v2 adds."""
        if isinstance(payload, dict) and payload.get("schema_version") == 1:
            original = payload.get("original")
            if isinstance(original, bytes):
                payload = {
                    **payload,
                    "original_length": len(original),
                    "original_sha256": hashlib.sha256(original).hexdigest(),
                }
        return payload

    @classmethod
    def bounded(
        cls,
        *,
        original: bytes,
        key: bytes | None,
        stage: Stage,
        reason: str,
        source_topic: str,
        source_partition: int,
        source_offset: int,
        attempts: int = 1,
        max_original_bytes: int = MAX_ORIGINAL_BYTES,
    ) -> DeadLetter:
        """A dead letter that fits in one Kafka message, whatever the event was."""
        truncated = len(original) > max_original_bytes
        return cls(
            reason=capped(reason),
            stage=stage,
            original=original[:TRUNCATED_PREFIX_BYTES] if truncated else original,
            original_length=len(original),
            original_sha256=hashlib.sha256(original).hexdigest(),
            truncated=truncated,
            key=key[:MAX_KEY_BYTES] if key is not None else None,
            key_truncated=key is not None and len(key) > MAX_KEY_BYTES,
            source_topic=source_topic,
            source_partition=source_partition,
            source_offset=source_offset,
            attempts=attempts,
        )

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> DeadLetter:
        payload = unpack(data)
        check_schema_version(payload, READABLE_VERSIONS, "DeadLetter")
        return validated(cls, payload)
