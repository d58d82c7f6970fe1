"""One error tree for Vitrine; `http_status` is how the HTTP layer maps each family."""

from __future__ import annotations


class VitrineError(Exception):
    """Base of every error Vitrine raises on purpose."""

    http_status = 500


class InvalidMessage(VitrineError):
    """A wire message that cannot be accepted: unparseable, unknown version, bad fields."""

    http_status = 400


class InvalidQuery(VitrineError):
    """A storefront query we refuse (empty text, k out of range, not an image)."""

    http_status = 400


class ImageRejected(VitrineError):
    """An image we will not fetch or decode: disallowed address, too large, not an image."""

    http_status = 422


class ModelSpecError(VitrineError):
    """A model spec that names no architecture or weights we can load."""
