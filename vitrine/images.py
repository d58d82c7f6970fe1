"""Decoding untrusted image bytes safely: the encoder, the router's search by image and the
storefront's image route share it, so they accept the same picture formats."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from vitrine.errors import ImageRejected

# PIL format -> the content type the storefront serves it as: one list for every role
CONTENT_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}
ACCEPTED_FORMATS = frozenset(CONTENT_TYPES)


def image_content_type(data: bytes) -> str | None:
    """The content type of bytes in an accepted format, read from the header only; else None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return CONTENT_TYPES.get(image.format or "")
    except Exception:  # not an image we know: the caller refuses it
        return None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode to RGB, refusing non-images and decompression bombs before any pixel is decoded.

    `Image.open` reads only the header, so the pixel count is checked before `load()`
    allocates anything.
    """
    if not data:
        raise ImageRejected("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageRejected(f"image has no pixels ({width}x{height})")
            if width * height > max_pixels:
                raise ImageRejected(
                    f"decompression bomb: {width}x{height} = {width * height} pixels "
                    f"exceeds the limit of {max_pixels}"
                )
            if image.format not in ACCEPTED_FORMATS:
                raise ImageRejected(f"unsupported image format {image.format}")
            image.seek(0)  # first frame of an animation
            return image.convert("RGB")
    except ImageRejected:
        raise
    except UnidentifiedImageError as exc:
        raise ImageRejected("not an image (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(f"decompression bomb: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"corrupt image: {exc}") from exc
    except Exception as exc:  # a decoder bug on hostile bytes is still this image's fault
        raise ImageRejected(f"image cannot be decoded: {exc!r}") from exc


def image_digest(data: bytes) -> str:
    """A picture's identity for duplicate collapse: 128 bits of BLAKE2b over its bytes, so two
    products listed with the same file collapse into one result (and 50M pictures do not
    collide by chance)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()
