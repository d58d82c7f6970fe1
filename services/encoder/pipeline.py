"""The encoder's transform, kept apart from the Kafka loop: raw events in, outputs out.

Every input message yields exactly one outcome, either records to publish or a dead letter,
so the loop can commit the whole batch once all outcomes are acknowledged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from proto.catalog import CatalogEvent
from proto.dlq import DeadLetter
from proto.vectors import VectorRecord
from vitrine.errors import ImageRejected, InvalidMessage
from vitrine.images import decode_image
from vitrine.metadata import ProductMetadata
from vitrine.model import product_text


@dataclass(frozen=True)
class RawEvent:
    """What the loop hands over from a Kafka message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int = 0  # the broker's record timestamp: when the catalog published it


@dataclass
class BatchOutput:
    vectors: list[VectorRecord] = field(default_factory=list)
    metadata: list[ProductMetadata] = field(default_factory=list)
    deletes: list[tuple[str, int]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)


def dead_letter(raw: RawEvent, stage: str, reason: str) -> DeadLetter:
    return DeadLetter(
        reason=reason, stage=stage, original=raw.value, key=raw.key,  # type: ignore[arg-type]
        source_topic=raw.topic, source_partition=raw.partition, source_offset=raw.offset,
    )


def parse_event(raw: RawEvent) -> CatalogEvent:
    event = CatalogEvent.from_wire(raw.value)
    if raw.key is not None and raw.key != event.product_id.encode():
        raise InvalidMessage(
            f"message key {raw.key!r} differs from product_id {event.product_id!r} "
            "(events must be keyed by product_id to keep per-product order)"
        )
    return event


class EventTransform:
    """Turns a batch of raw events into vector records, metadata and dead letters."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[bytes]],
        encode_products: Callable[[list[Image.Image], list[str]], np.ndarray],
        model_id: str,
        max_pixels: int,
        fetch_concurrency: int,
        vector_dtype: Literal["f16", "f32"] = "f16",
    ) -> None:
        self._fetch = fetch
        self._encode_products = encode_products  # the image plus the event's text, fused
        self._model_id = model_id
        self._max_pixels = max_pixels
        self._gate = asyncio.Semaphore(fetch_concurrency)
        self._dtype = vector_dtype

    async def run(self, batch: Sequence[RawEvent]) -> BatchOutput:
        out = BatchOutput()
        upserts: list[tuple[RawEvent, CatalogEvent]] = []
        for raw in batch:
            try:
                event = parse_event(raw)
            except InvalidMessage as exc:
                out.dead_letters.append(dead_letter(raw, "decode", str(exc)))
                continue
            if event.op == "delete":
                out.deletes.append((event.product_id, event.version))
                out.vectors.append(
                    VectorRecord.tombstone(
                        event.product_id, event.version, self._model_id, raw.timestamp_ms
                    )
                )
            else:
                upserts.append((raw, event))
        images = await asyncio.gather(*(self._load(raw, ev, out) for raw, ev in upserts))
        ready = [(raw, ev, img) for (raw, ev), img in zip(upserts, images, strict=True) if img]
        if ready:
            texts = [product_text(event.title, event.attributes) for _, event, _ in ready]
            vectors = await asyncio.to_thread(
                self._encode_products, [img for *_, img in ready], texts
            )
            for (raw, event, _), vector in zip(ready, vectors, strict=True):
                out.metadata.append(_metadata_of(event))
                out.vectors.append(
                    VectorRecord.upsert(
                        event.product_id, event.version, self._model_id, vector, self._dtype,
                        event_time_ms=raw.timestamp_ms, attributes=event.attributes,
                    )
                )
        return out

    async def _load(
        self, raw: RawEvent, event: CatalogEvent, out: BatchOutput
    ) -> Image.Image | None:
        assert event.image_uri is not None  # upserts are validated to carry one
        async with self._gate:
            try:
                data = await self._fetch(event.image_uri)
            except ImageRejected as exc:
                out.dead_letters.append(dead_letter(raw, "fetch", str(exc)))
                return None
        try:
            return await asyncio.to_thread(decode_image, data, self._max_pixels)
        except ImageRejected as exc:
            out.dead_letters.append(dead_letter(raw, "image", str(exc)))
            return None


def _metadata_of(event: CatalogEvent) -> ProductMetadata:
    return ProductMetadata(
        product_id=event.product_id,
        version=event.version,
        title=event.title,
        image_uri=event.image_uri or "",
        attributes=dict(event.attributes),
    )
