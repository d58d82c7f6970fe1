"""The root of Vitrine's one error tree, and the contracts' own error.

They live here so that `proto/` depends on nothing else of ours: a publisher in another
service can take the contracts alone. `vitrine.errors` re-exports both and grows the rest of
the tree from `VitrineError`; `http_status` is how the HTTP layer maps each family.
"""

from __future__ import annotations


class VitrineError(Exception):
    """Base of every error Vitrine raises on purpose."""

    http_status = 500


class InvalidMessage(VitrineError):
    """A wire message that cannot be accepted: unparseable, unknown version, bad fields."""

    http_status = 400
