from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vitrine.errors import ImageRejected
from vitrine.images import decode_image


def encoded(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_a_product_image_decodes_to_rgb(fashion_data: Path) -> None:
    image = decode_image((fashion_data / "images" / "10000.jpg").read_bytes(), 1_000_000)
    assert image.mode == "RGB" and image.size[0] * image.size[1] > 0


def test_grayscale_and_palette_images_become_rgb() -> None:
    assert decode_image(encoded(Image.new("L", (5, 7)), "PNG"), 100).mode == "RGB"
    assert decode_image(encoded(Image.new("P", (5, 7)), "GIF"), 100).mode == "RGB"


def test_a_bomb_is_refused_from_its_header() -> None:
    bomb = encoded(Image.new("1", (6000, 6000)), "PNG")  # tiny file, 36M pixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageRejected, match="decompression bomb"):
        decode_image(bomb, max_pixels=10_000_000)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, I am text", "not an image"),
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, "image"),
    ],
)
def test_non_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ImageRejected, match=message):
        decode_image(data, 1_000_000)


def test_a_truncated_jpeg_is_refused(fashion_data: Path) -> None:
    data = (fashion_data / "images" / "10000.jpg").read_bytes()
    with pytest.raises(ImageRejected):
        decode_image(data[: len(data) // 3], 1_000_000)
