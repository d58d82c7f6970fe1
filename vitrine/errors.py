"""One error tree for Vitrine (rooted in `proto.errors`); `http_status` is how the HTTP layer
maps each family."""

from __future__ import annotations

from proto.errors import InvalidMessage, VitrineError

__all__ = [
    "ImageRejected", "ImageUnavailable", "InvalidMessage", "InvalidQuery", "ModelSpecError",
    "ProductNotFound", "ShardsUnavailable", "VitrineError",
]


class InvalidQuery(VitrineError):
    """A storefront query we refuse (empty text, k out of range, not an image)."""

    http_status = 400


class ImageRejected(VitrineError):
    """An image we will not fetch or decode: disallowed address, too large, not an image."""

    http_status = 422


class ProductNotFound(VitrineError):
    """No live product by that id: never published, or deleted."""

    http_status = 404


class ImageUnavailable(VitrineError):
    """The product exists but its image could not be fetched or is not a servable image."""

    http_status = 502


class ModelSpecError(VitrineError):
    """A model spec that names no architecture or weights we can load."""


class ShardsUnavailable(VitrineError):
    """No replica of the shard that owns the data answered: try again shortly."""

    http_status = 503
