"""msgpack on the wire, never pickle: the one place bytes become dicts and back."""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from vitrine.errors import InvalidMessage

M = TypeVar("M", bound=BaseModel)


def pack(payload: dict[str, Any]) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one msgpack map; anything else (truncated, trailing bytes, a list) is rejected."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise InvalidMessage(f"not valid msgpack: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidMessage(f"expected a msgpack map, got {type(payload).__name__}")
    return payload


def check_schema_version(payload: dict[str, Any], supported: int, what: str) -> None:
    """An unknown schema version is refused, never guessed at."""
    if "schema_version" not in payload:
        raise InvalidMessage(f"{what} has no schema_version (supported: {supported})")
    version = payload["schema_version"]
    if version != supported or isinstance(version, bool):
        raise InvalidMessage(
            f"unknown schema version {version!r} for {what} (supported: {supported})"
        )


def validated(model: type[M], payload: dict[str, Any]) -> M:
    """Validate a decoded payload, turning pydantic's report into one readable reason."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or model.__name__}: {err['msg']}"
            for err in exc.errors()
        )
        raise InvalidMessage(f"invalid {model.__name__}: {problems}") from exc
