"""The encoder's transform, kept apart from the Kafka loop: raw events in, outcomes out.

Every event yields exactly one outcome, a serialised vector record to publish or a bounded
dead letter that names the stage that failed, so the loop can commit the whole batch once all
outcomes are acknowledged. A failure stays with its event: each per-event stage (decode,
fetch, image, preprocess, serialise) turns any exception into that event's dead letter, and
the one batch step, the model pass, is retried event by event when it fails, to find the
culprit. Covered by tests/encoder/test_pipeline.py and tests/encoder/test_hostile_events.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import structlog
import torch
from PIL import Image

from proto.catalog import CatalogEvent
from proto.dlq import MAX_ORIGINAL_BYTES, DeadLetter, Stage
from proto.vectors import VectorRecord
from vitrine.errors import InvalidMessage, VitrineError
from vitrine.images import decode_image, image_digest
from vitrine.model import product_text

log = structlog.get_logger()

Preprocess = Callable[[Image.Image], torch.Tensor]
EncodeProducts = Callable[[list[torch.Tensor], list[str]], np.ndarray]


@dataclass(frozen=True)
class RawEvent:
    """What the loop hands over from a Kafka message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int = 0  # the broker's record timestamp: when the catalog published it


@dataclass(frozen=True)
class Publication:
    """A vector record ready for `catalog.vectors`: the product's vector and fields, or its
    tombstone."""

    raw: RawEvent
    product_id: str
    record: bytes
    deleted: bool = False


@dataclass
class BatchOutput:
    published: list[Publication] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    max_original_bytes: int = MAX_ORIGINAL_BYTES

    def refuse(self, raw: RawEvent, stage: Stage, reason: str, attempts: int = 1) -> None:
        self.dead_letters.append(dead_letter(raw, stage, reason, attempts, self.max_original_bytes))


class StageFailed(Exception):
    """One event's failure at one stage; carries the reason its dead letter gives."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


@contextlib.contextmanager
def stage(name: Stage) -> Iterator[None]:
    """Whatever goes wrong inside fails this event at this stage, and nothing else."""
    try:
        yield
    except StageFailed:
        raise
    except Exception as exc:
        raise StageFailed(name, reason_of(exc)) from exc


def reason_of(exc: BaseException) -> str:
    """Our own errors say why in words; anything else is named by its type too."""
    if isinstance(exc, VitrineError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def dead_letter(
    raw: RawEvent,
    stage: Stage,
    reason: str,
    attempts: int = 1,
    max_original_bytes: int = MAX_ORIGINAL_BYTES,
) -> DeadLetter:
    return DeadLetter.bounded(
        original=raw.value, key=raw.key, stage=stage, reason=reason,
        source_topic=raw.topic, source_partition=raw.partition, source_offset=raw.offset,
        attempts=attempts, max_original_bytes=max_original_bytes,
    )


def parse_event(raw: RawEvent, backfill_topic: str | None = None) -> CatalogEvent:
    """A catalog event, or (from `backfill_topic`) the event a vector record stands for."""
    event = CatalogEvent.from_wire(raw.value) if raw.topic != backfill_topic \
        else event_of_record(VectorRecord.from_wire(raw.value))
    if raw.key is not None and raw.key != event.product_id.encode():
        raise InvalidMessage(
            f"message key {raw.key[:200]!r} differs from product_id {event.product_id!r} "
            "(events must be keyed by product_id to keep per-product order)"
        )
    return event


def event_of_record(record: VectorRecord) -> CatalogEvent:
    """The catalog event a product's vector record was encoded from: its fields are all a
    new model needs, so a candidate backfills from the log, never from a side store. The
    version stays the product's, so a live event newer than it wins on every shard."""
    if record.op == "delete":
        return CatalogEvent(op="delete", product_id=record.product_id, version=record.version)
    if not record.image_uri:
        raise InvalidMessage(
            f"the vector record of {record.product_id!r} (version {record.version}) carries no "
            "image_uri (written before schema 2): its next catalog event will encode it"
        )
    return CatalogEvent(
        op="upsert", product_id=record.product_id, version=record.version,
        image_uri=record.image_uri, title=record.title, attributes=dict(record.attributes),
        price=record.price, in_stock=record.in_stock,
    )


@dataclass(frozen=True)
class TransformLimits:
    max_pixels: int
    fetch_concurrency: int
    max_record_bytes: int  # the producer's message.max.bytes: larger records are refused here
    max_original_bytes: int = MAX_ORIGINAL_BYTES
    vector_dtype: Literal["f16", "f32"] = "f16"
    backfill_topic: str | None = None  # read as the events its vector records stand for


@dataclass(frozen=True)
class _Upsert:
    raw: RawEvent
    event: CatalogEvent
    pixels: torch.Tensor
    image_digest: str  # of the picture's bytes: equal pictures collapse in answers


class EventTransform:
    """Turns a batch of raw events into publications and dead letters."""

    def __init__(
        self,
        fetch: Callable[[str], Awaitable[bytes]],
        preprocess: Preprocess,
        encode_products: EncodeProducts,
        model_id: str,
        limits: TransformLimits,
    ) -> None:
        self._fetch = fetch
        self._preprocess = preprocess  # one picture -> model-ready pixels
        self._encode_products = encode_products  # pixels plus the event's text, fused
        self._model_id = model_id
        self._limits = limits
        self._gate = asyncio.Semaphore(limits.fetch_concurrency)

    async def run(self, batch: Sequence[RawEvent], attempts: int = 1) -> BatchOutput:
        out = BatchOutput(max_original_bytes=self._limits.max_original_bytes)
        upserts: list[tuple[RawEvent, CatalogEvent]] = []
        for raw in batch:
            try:
                with stage("decode"):
                    event = parse_event(raw, self._limits.backfill_topic)
                if event.op == "delete":
                    out.published.append(self._tombstone(raw, event))
                else:
                    upserts.append((raw, event))
            except StageFailed as failed:
                out.refuse(raw, failed.stage, failed.reason, attempts)
        loaded = await asyncio.gather(*(self._load(raw, event) for raw, event in upserts))
        ready = []
        for (raw, _), item in zip(upserts, loaded, strict=True):
            if isinstance(item, StageFailed):
                out.refuse(raw, item.stage, item.reason, attempts)
            else:
                ready.append(item)
        for item, vector in zip(ready, await self._encode(ready), strict=True):
            try:
                if isinstance(vector, StageFailed):
                    raise vector
                out.published.append(self._upsert(item, vector))
            except StageFailed as failed:
                out.refuse(item.raw, failed.stage, failed.reason, attempts)
        return out

    async def _load(self, raw: RawEvent, event: CatalogEvent) -> _Upsert | StageFailed:
        """Fetch, decode and prepare one picture; a failure is this event's alone."""
        assert event.image_uri is not None  # upserts are validated to carry one
        try:
            with stage("fetch"):
                async with self._gate:
                    data = await self._fetch(event.image_uri)
            with stage("image"):
                image = await asyncio.to_thread(decode_image, data, self._limits.max_pixels)
            with stage("preprocess"):
                pixels = await asyncio.to_thread(self._preprocess, image)
        except StageFailed as failed:
            return failed
        return _Upsert(raw, event, pixels, image_digest(data))

    async def _encode(self, ready: list[_Upsert]) -> list[np.ndarray | StageFailed]:
        """One model pass for the batch; if it fails, one pass per event finds the culprit."""
        if not ready:
            return []
        texts = [product_text(item.event.title, item.event.attributes) for item in ready]
        try:
            with stage("encode"):
                vectors = await asyncio.to_thread(
                    self._encode_products, [item.pixels for item in ready], texts
                )
                if vectors.shape[0] != len(ready):
                    raise ValueError(f"the model gave {vectors.shape[0]} vectors for {len(ready)}")
        except StageFailed as failed:
            if len(ready) == 1:
                return [failed]
            log.warning("model pass failed, retrying event by event", error=failed.reason,
                        events=len(ready))
            return [(await self._encode([item]))[0] for item in ready]
        return [
            row if np.isfinite(row).all()
            else StageFailed("encode", "the model produced a non-finite vector")
            for row in vectors
        ]

    def _upsert(self, item: _Upsert, vector: np.ndarray) -> Publication:
        event = item.event
        with stage("serialise"):
            record = VectorRecord.upsert(
                event.product_id, event.version, self._model_id, vector,
                self._limits.vector_dtype, event_time_ms=item.raw.timestamp_ms,
                attributes=event.attributes, title=event.title, image_uri=event.image_uri or "",
                price=event.price, in_stock=event.in_stock, image_digest=item.image_digest,
            )
            return Publication(item.raw, event.product_id, self._fits(record))

    def _tombstone(self, raw: RawEvent, event: CatalogEvent) -> Publication:
        with stage("serialise"):
            record = VectorRecord.tombstone(
                event.product_id, event.version, self._model_id, raw.timestamp_ms
            )
            return Publication(raw, event.product_id, self._fits(record), deleted=True)

    def _fits(self, record: VectorRecord) -> bytes:
        wire = record.to_wire()
        if len(wire) > self._limits.max_record_bytes:
            raise StageFailed(
                "serialise",
                f"vector record is {len(wire)} bytes, over the producer's limit of "
                f"{self._limits.max_record_bytes}",
            )
        return wire
