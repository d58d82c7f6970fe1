"""The one place bytes become dicts and back: msgpack on the wire, never pickle.

Decoding is total: whatever the bytes, the answer is a dict or `InvalidMessage` with a short
reason, never another exception (covered by tests/proto/test_fuzz.py). Validation is strict:
no coercion of "7" or 7.0 into a version, no bytes into a title.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, ValidationError

from proto.errors import InvalidMessage

M = TypeVar("M", bound=BaseModel)

# every contract shares these: unknown fields refused, no coercion, no NaN or infinity
STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
MAX_VERSION = 2**63 - 1  # versions fit Kafka's and every client's signed 64-bit integer
MAX_REASON_CHARS = 2000
_MAX_PROBLEMS = 5  # validation problems named in one reason; the rest are counted


def pack(payload: dict[str, Any]) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    """Decode one msgpack map; anything else (truncated, trailing bytes, a list) is rejected."""
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for hostile bytes
        raise InvalidMessage(f"not valid msgpack: {_short(exc)}") from exc
    return _a_map(payload, "a msgpack map")


def looks_like_json(data: bytes) -> bool:
    """A JSON object starts with '{' (after whitespace or a BOM); a msgpack map never does
    (0x7b is the msgpack integer 123, never a whole message we accept)."""
    return data.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n").startswith(b"{")


def unpack_json(data: bytes | str) -> dict[str, Any]:
    """Decode one JSON object (bytes: UTF-8), refusing NaN, Infinity, numbers beyond a float
    and repeated keys (which JSON parsers disagree on)."""
    try:
        payload = json.loads(
            data.decode("utf-8-sig") if isinstance(data, bytes) else data,
            parse_float=_finite_float,
            parse_constant=_refuse_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise InvalidMessage(f"not valid JSON: {_short(exc)}") from exc
    return _a_map(payload, "a JSON object")


def check_schema_version(
    payload: dict[str, Any], supported: int | tuple[int, ...], what: str
) -> int:
    """An unknown schema version is refused, never guessed at (1.0 and true are not 1)."""
    accepted = (supported,) if isinstance(supported, int) else supported
    names = ", ".join(map(str, accepted))
    if "schema_version" not in payload:
        raise InvalidMessage(f"{what} has no schema_version (supported: {names})")
    version = payload["schema_version"]
    if type(version) is not int or version not in accepted:
        raise InvalidMessage(
            f"unknown schema version {_shown(version)} for {what} (supported: {names})"
        )
    return version


def validated(model: type[M], payload: dict[str, Any]) -> M:
    """Validate a decoded payload, turning pydantic's report into one bounded reason."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        problems = "; ".join(
            f"{'.'.join(_clip(str(p), 40) for p in err['loc']) or model.__name__}: {err['msg']}"
            for err in errors[:_MAX_PROBLEMS]
        )
        if len(errors) > _MAX_PROBLEMS:
            problems += f"; and {len(errors) - _MAX_PROBLEMS} more problems"
        raise InvalidMessage(capped(f"invalid {model.__name__}: {problems}")) from exc


def capped(reason: str, limit: int = MAX_REASON_CHARS) -> str:
    """A reason short enough to log and to dead-letter, whatever it quotes."""
    suffix = " ... (truncated)"
    return reason if len(reason) <= limit else reason[: limit - len(suffix)] + suffix


def _a_map(payload: Any, expected: str) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise InvalidMessage(f"expected {expected}, got {type(payload).__name__}")
    return payload


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{_clip(text, 40)} is beyond the range of a number")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("an object repeats a key")
    return found


def _shown(value: Any) -> str:
    return _clip(repr(value), 60)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(exc: BaseException) -> str:
    return capped(str(exc) or type(exc).__name__, 300)
