"""The encoder's transform on its own: a failure at any stage stays with its event."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from proto.catalog import CatalogEvent
from proto.vectors import VectorRecord
from services.encoder.pipeline import EventTransform, RawEvent, TransformLimits

DIM = 8


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (6, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


PICTURES = {f"https://img.example/{i}": _png((i * 20, 10, 10)) for i in range(6)}


async def fetch(uri: str) -> bytes:
    if uri == "https://img.example/explodes":
        raise RuntimeError("a fetcher bug")
    return PICTURES.get(uri, b"not an image")


def preprocess(image: Image.Image) -> torch.Tensor:
    red = image.getpixel((0, 0))[0]
    if red == 100:  # the picture of event 5 cannot be prepared
        raise ValueError("height and width must be > 0")
    return torch.full((3, 4, 4), float(red))


class Model:
    """Vectors that carry the picture's red value, so each output can be traced to its input;
    a batch holding the poisoned picture fails as a whole."""

    def __init__(self, poisoned: float | None = None, nan_for: float | None = None) -> None:
        self.calls: list[int] = []
        self._poisoned, self._nan_for = poisoned, nan_for

    def __call__(self, pixels: list[torch.Tensor], texts: list[str]) -> np.ndarray:
        self.calls.append(len(pixels))
        reds = [float(p[0, 0, 0]) for p in pixels]
        if self._poisoned in reds:
            raise RuntimeError("CUDA error: an illegal memory access")
        rows = np.zeros((len(pixels), DIM), dtype=np.float32)
        rows[:, 0] = reds
        rows[[red == self._nan_for for red in reds], 1] = np.nan
        return rows


def transform(model: Model, max_record_bytes: int = 1_000_000, model_id: str = "m@1",
              backfill_topic: str | None = None) -> EventTransform:
    limits = TransformLimits(max_pixels=10_000, fetch_concurrency=4,
                             max_record_bytes=max_record_bytes, vector_dtype="f32",
                             backfill_topic=backfill_topic)
    return EventTransform(fetch, preprocess, model, model_id, limits)


def raw(offset: int, event: CatalogEvent | bytes, key: bytes | None = None) -> RawEvent:
    value = event if isinstance(event, bytes) else event.to_wire()
    if key is None and isinstance(event, CatalogEvent):
        key = event.product_id.encode()
    return RawEvent("catalog.events", 0, offset, key, value)


def upsert(i: int, uri: str | None = None, attributes: dict[str, str] | None = None
           ) -> CatalogEvent:
    return CatalogEvent(op="upsert", product_id=f"p{i}", version=1,
                        image_uri=uri or f"https://img.example/{i}", attributes=attributes or {})


def published_reds(out: object) -> dict[str, float]:
    return {
        p.product_id: VectorRecord.from_wire(p.record).as_array()[0]
        for p in out.published  # type: ignore[attr-defined]
        if not p.deleted
    }


async def test_each_stage_fails_its_own_event_and_the_rest_go_on() -> None:
    batch = [
        raw(0, upsert(0)),
        raw(1, b"\x93garbage"),  # decode
        raw(2, upsert(2, "https://img.example/missing")),  # image: not an image
        raw(3, upsert(3, "https://img.example/explodes")),  # fetch: an exception nobody foresaw
        raw(4, upsert(4)),
        raw(5, upsert(5)),  # preprocess
        raw(6, CatalogEvent(op="delete", product_id="p9", version=3)),
        raw(7, upsert(1), key=b"someone-else"),  # decode: key differs from product_id
    ]
    out = await transform(Model()).run(batch)
    stages = {letter.source_offset: letter.stage for letter in out.dead_letters}
    assert stages == {1: "decode", 2: "image", 3: "fetch", 5: "preprocess", 7: "decode"}
    assert "RuntimeError: a fetcher bug" in next(
        letter.reason for letter in out.dead_letters if letter.source_offset == 3
    )
    assert published_reds(out) == {"p0": 0.0, "p4": 80.0}
    records = {p.product_id: VectorRecord.from_wire(p.record) for p in out.published}
    assert (records["p9"].op, records["p9"].version, records["p9"].vector) == ("delete", 3, b"")
    assert records["p0"].image_uri == "https://img.example/0"  # the fields travel with it


async def test_a_failed_model_pass_is_retried_event_by_event_to_find_the_culprit() -> None:
    model = Model(poisoned=40.0)  # the picture of event 2
    out = await transform(model).run([raw(i, upsert(i)) for i in range(5)])
    assert model.calls == [5, 1, 1, 1, 1, 1]
    assert [(d.source_offset, d.stage) for d in out.dead_letters] == [(2, "encode")]
    assert "illegal memory access" in out.dead_letters[0].reason
    assert published_reds(out) == {"p0": 0.0, "p1": 20.0, "p3": 60.0, "p4": 80.0}


async def test_a_non_finite_vector_is_not_published() -> None:
    out = await transform(Model(nan_for=20.0)).run([raw(i, upsert(i)) for i in range(3)])
    assert [(d.source_offset, d.stage) for d in out.dead_letters] == [(1, "encode")]
    assert set(published_reds(out)) == {"p0", "p2"}


async def test_a_record_too_large_for_the_producer_is_refused_before_anything_is_written() -> None:
    large = {f"note{i}": "x" * 500 for i in range(3)}  # attributes travel with the vector
    batch = [raw(0, upsert(0)), raw(1, upsert(1, attributes=large))]
    out = await transform(Model(), max_record_bytes=600).run(batch)
    assert [(d.source_offset, d.stage) for d in out.dead_letters] == [(1, "serialise")]
    assert "over the producer's limit of 600" in out.dead_letters[0].reason
    assert set(published_reds(out)) == {"p0"}


@pytest.mark.parametrize("attempts", [1, 3])
async def test_a_dead_letter_says_how_often_the_event_was_tried(attempts: int) -> None:
    out = await transform(Model()).run([raw(0, b"")], attempts=attempts)
    assert out.dead_letters[0].attempts == attempts


async def test_a_backfill_re_encodes_the_records_of_another_model_as_their_events() -> None:
    """A candidate model's encoder reads the active model's vector log as the events its
    records stand for: same product, version and fields, its own model's vector."""
    source = "catalog.vectors"
    old = VectorRecord.upsert("p3", 7, "old@1", np.ones(4), title="Red kurta",
                              image_uri="https://img.example/3", attributes={"colour": "Red"},
                              price=12.5, in_stock=True)
    gone = VectorRecord.tombstone("p4", 9, "old@1")
    before_v2 = VectorRecord.upsert("p1", 2, "old@1", np.ones(4)).model_copy(
        update={"schema_version": 1})  # a record of the release before: no image_uri
    batch = [RawEvent(source, 0, i, r.product_id.encode(), r.to_wire())
             for i, r in enumerate([old, gone, before_v2])]
    batch.append(raw(3, upsert(0)))  # a live event beside them
    out = await transform(Model(), model_id="new@2", backfill_topic=source).run(batch)
    records = {p.product_id: VectorRecord.from_wire(p.record) for p in out.published}
    assert set(records) == {"p3", "p4", "p0"}
    again = records["p3"]
    assert (again.model_id, again.version, again.title, again.attributes, again.price,
            again.in_stock) == ("new@2", 7, "Red kurta", {"colour": "Red"}, 12.5, True)
    assert again.as_array()[0] == 60.0, "encoded from the picture, not copied"
    assert (records["p4"].op, records["p4"].version) == ("delete", 9)
    (letter,) = out.dead_letters
    assert (letter.source_topic, letter.source_offset, letter.stage) == (source, 2, "decode")
    assert "carries no image_uri" in letter.reason
