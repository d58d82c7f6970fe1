"""The storefront's query, validated: a clear 400 for anything we will not run.

Total: whatever the parameters or body, the answer is a `Query` or `InvalidQuery` /
`InvalidMessage` (both 400), never another exception (tests/router/test_query.py fuzzes it).
Nothing is ignored: an unknown parameter or field is a 400 that names it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, get_args

from aiohttp import web
from multidict import MultiMapping
from PIL import Image

from proto.catalog import MAX_PRICE
from proto.search import MAX_FACETS, MAX_MODEL_ID_CHARS, Mode
from services.router.settings import RouterSettings
from vitrine.errors import ImageRejected, InvalidQuery
from vitrine.images import decode_image, image_digest
from vitrine.service import json_body

MAX_FILTER_VALUES = 50
MAX_FILTER_VALUE_CHARS = 128


MODES: tuple[Mode, ...] = get_args(Mode)


@dataclass(frozen=True)
class Query:
    k: int
    text: str | None = None
    image: Image.Image | None = None
    image_digest: str = ""  # of the uploaded bytes: a catalog picture's own product leads
    filters: dict[str, list[str]] = field(default_factory=dict)
    mode: Mode = "dense"
    offset: int = 0
    price_min: float | None = None
    price_max: float | None = None
    in_stock: bool | None = None
    facets: list[str] = field(default_factory=list)
    collapse: bool = True
    model: str | None = None  # None: the active model

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "image"


# GET /search takes these and the filter fields; POST /search the body fields
OPTIONS = ("mode", "offset", "price_min", "price_max", "in_stock", "facets", "collapse",
           "model")
SEARCH_PARAMS = ("q", "k", "budget_ms", *OPTIONS)
BODY_FIELDS = ("text", "image_b64", "k", "filters", *OPTIONS)


def query_from_params(params: MultiMapping[str], settings: RouterSettings) -> Query:
    """GET /search?q=<text>&k=<n>&colour=Red,Maroon&gender=Women (any filter field)"""
    for name in params:
        if name not in SEARCH_PARAMS and name not in settings.filter_fields:
            raise InvalidQuery(
                f"unknown parameter {_shown(name)}: /search takes {', '.join(SEARCH_PARAMS)} "
                f"and the filter fields {', '.join(settings.filter_fields)}"
            )
    for name in SEARCH_PARAMS:
        if len(params.getall(name, ())) > 1:
            raise InvalidQuery(f"parameter {name!r} is given more than once")
    filters = {
        name: [v for value in params.getall(name) for v in value.split(",")]
        for name in settings.filter_fields
        if name in params
    }
    options: dict[str, Any] = {name: params[name] for name in OPTIONS if name in params}
    return _query(settings, k=_k(params.get("k"), settings),
                  text=_text(params.get("q"), settings), filters=_filters(filters, settings),
                  from_url=True, **options)


async def query_from_body(request: web.Request, settings: RouterSettings) -> Query:
    """POST /search with {"text": ..., "k": n} or {"image_b64": ..., "k": n}"""
    return query_from_json(await json_body(request), settings)


def query_from_json(body: dict[str, Any], settings: RouterSettings) -> Query:
    """The search a decoded JSON body asks for (see `query_from_body`)."""
    unknown = set(body) - set(BODY_FIELDS)
    if unknown:
        shown = ", ".join(_shown(name) for name in sorted(unknown)[:5])
        raise InvalidQuery(f"unknown fields: {shown} (a search takes {', '.join(BODY_FIELDS)})")
    if ("text" in body) == ("image_b64" in body):
        raise InvalidQuery('give exactly one of "text" or "image_b64"')
    k = _k(body.get("k"), settings)
    filters = _filters(body.get("filters", {}), settings)
    options = {name: body[name] for name in OPTIONS if name in body}
    if "text" in body:
        return _query(settings, k=k, text=_text(body["text"], settings), filters=filters,
                      **options)
    image, digest = _image(body["image_b64"], settings)
    return _query(settings, k=k, image=image, image_digest=digest, filters=filters, **options)


def _query(
    settings: RouterSettings,
    k: int,
    filters: dict[str, list[str]],
    text: str | None = None,
    image: Image.Image | None = None,
    image_digest: str = "",
    from_url: bool = False,
    **options: Any,
) -> Query:
    """The options as they arrived (JSON values, or strings from a URL), checked and typed.
    A JSON body says numbers and booleans as JSON does: "12" and "true" are refused there."""
    if not from_url:
        for name, value in options.items():
            if name not in ("mode", "facets", "model") and isinstance(value, str):
                raise InvalidQuery(f"{name} must be a JSON number or boolean, not a string")
    mode = _mode(options.get("mode"), text is not None, settings)
    price_min = _price(options.get("price_min"), "price_min")
    price_max = _price(options.get("price_max"), "price_max")
    if price_min is not None and price_max is not None and price_min > price_max:
        raise InvalidQuery(f"price_min {price_min:g} is above price_max {price_max:g}")
    return Query(
        k=k, text=text, image=image, image_digest=image_digest, filters=filters, mode=mode,
        offset=_offset(options.get("offset"), settings),
        price_min=price_min, price_max=price_max,
        in_stock=_flag(options.get("in_stock"), "in_stock"),
        facets=_facets(options.get("facets"), settings),
        collapse=bool(_flag(options.get("collapse"), "collapse", default=settings.collapse)),
        model=_model(options.get("model")),
    )


def _model(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not 1 <= len(raw) <= MAX_MODEL_ID_CHARS:
        raise InvalidQuery(f"model must be a model id of 1-{MAX_MODEL_ID_CHARS} characters, "
                           f"got {_shown(raw)}")
    return raw


def with_model_header(query: Query, header: str | None) -> Query:
    """The model the `X-Vitrine-Model` header names, unless the query names one already."""
    if header is None:
        return query
    named = _model(header)
    if query.model is not None and query.model != named:
        raise InvalidQuery(f"the model parameter {_shown(query.model)} and the model header "
                           f"{_shown(named)} disagree")
    return dataclasses.replace(query, model=named)


def _mode(raw: Any, is_text: bool, settings: RouterSettings) -> Mode:
    if raw is None:
        return settings.default_mode if is_text else "dense"
    if raw not in MODES:
        raise InvalidQuery(f"mode must be one of {', '.join(MODES)}, got {_shown(raw)}")
    if not is_text and raw != "dense":
        raise InvalidQuery("an image query is dense: mode lexical and hybrid need text")
    return raw  # type: ignore[no-any-return]  # one of MODES, checked above


def _offset(raw: Any, settings: RouterSettings) -> int:
    if raw is None:
        return 0
    offset = _integer(raw, "offset")
    if not 0 <= offset <= settings.max_offset:
        raise InvalidQuery(f"offset must be between 0 and {settings.max_offset}, got {offset}")
    return offset


def _price(raw: Any, name: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidQuery(f"{name} must be a number, got {_shown(raw)}")
    try:
        price = float(raw)
    except (ValueError, OverflowError) as exc:
        raise InvalidQuery(f"{name} must be a number, got {_shown(raw)}") from exc
    if not math.isfinite(price) or not 0 <= price <= MAX_PRICE:
        raise InvalidQuery(f"{name} must be between 0 and {MAX_PRICE:g}, got {_shown(raw)}")
    return price


def _flag(raw: Any, name: str, default: bool | None = None) -> bool | None:
    if raw is None:
        return default
    if isinstance(raw, bool):
        return raw
    if raw in ("true", "false"):
        return raw == "true"
    raise InvalidQuery(f"{name} must be true or false, got {_shown(raw)}")


def _facets(raw: Any, settings: RouterSettings) -> list[str]:
    if raw is None:
        return []
    listed = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(listed, list) or not all(isinstance(v, str) for v in listed):
        raise InvalidQuery('facets must be a list of field names like ["colour"]')
    names = list(dict.fromkeys(v.strip() for v in listed if v.strip()))
    for name in names:
        if name not in settings.filter_fields:
            raise InvalidQuery(
                f"cannot count facets of {_shown(name)}: facet fields are the filterable "
                f"fields {', '.join(settings.filter_fields)}"
            )
    if len(names) > MAX_FACETS:
        raise InvalidQuery(f"at most {MAX_FACETS} facets")
    return names


BUDGET_HEADER = "X-Vitrine-Budget-Ms"


def budget_ms(request: web.Request, settings: RouterSettings) -> float:
    """The client's end-to-end budget (header, or `budget_ms` parameter), else the setting.

    Capped at `max_budget_ms`: a client can ask for less time than the default, or a bit more
    for a batch job, but cannot pin router and shard resources indefinitely.
    """
    raw = request.headers.get(BUDGET_HEADER) or request.query.get("budget_ms")
    if raw is None:
        return settings.deadline_ms
    try:
        budget = float(raw)
    except ValueError as exc:
        raise InvalidQuery(f"budget must be a number of milliseconds, got {_shown(raw)}") from exc
    if not 0 < budget <= settings.max_budget_ms:
        limit = f"{settings.max_budget_ms:g}"
        raise InvalidQuery(f"budget must be in (0, {limit}] ms, got {_shown(raw)}")
    return budget


def _k(raw: Any, settings: RouterSettings) -> int:
    if raw is None:
        return settings.default_k
    k = _integer(raw, "k")
    if not 1 <= k <= settings.max_k:
        raise InvalidQuery(f"k must be between 1 and {settings.max_k}, got {k}")
    return k


def _integer(raw: Any, name: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise InvalidQuery(f"{name} must be an integer, got {_shown(raw)}")
    try:
        value = int(raw)
    except (ValueError, OverflowError) as exc:  # "many", NaN, infinity
        raise InvalidQuery(f"{name} must be an integer, got {_shown(raw)}") from exc
    if isinstance(raw, float) and raw != value:
        raise InvalidQuery(f"{name} must be an integer, got {_shown(raw)}")
    return value


def _filters(raw: Any, settings: RouterSettings) -> dict[str, list[str]]:
    """{"colour": ["Red", "Maroon"], "gender": "Women"}: any value of each, all fields."""
    if not isinstance(raw, dict):
        raise InvalidQuery('filters must be an object like {"colour": ["Red"]}')
    filters = {}
    for name, values in raw.items():
        if name not in settings.filter_fields:
            raise InvalidQuery(
                f"cannot filter on {_shown(name)}: filterable fields are "
                f"{', '.join(settings.filter_fields)}"
            )
        listed = [values] if isinstance(values, str) else values
        if not isinstance(listed, list) or not listed or not all(
            isinstance(v, str) and v.strip() for v in listed
        ):
            raise InvalidQuery(f"filter {name!r} needs one or more non-empty strings")
        if len(listed) > MAX_FILTER_VALUES or any(
            len(v) > MAX_FILTER_VALUE_CHARS for v in listed
        ):
            raise InvalidQuery(
                f"filter {name!r}: at most {MAX_FILTER_VALUES} values of "
                f"{MAX_FILTER_VALUE_CHARS} characters"
            )
        filters[name] = [_unicode(v.strip(), f"filter {name!r}") for v in listed]
    return filters


def _text(raw: Any, settings: RouterSettings) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidQuery("query text must be a non-empty string")
    text = " ".join(raw.split())
    if len(text) > settings.max_query_chars:
        raise InvalidQuery(f"query text is longer than {settings.max_query_chars} characters")
    return _unicode(text, "query text")


def _unicode(text: str, what: str) -> str:
    """Text that can be encoded: a lone surrogate (JSON's "\\ud800", undecodable URL bytes)
    would fail the tokenizer, the cache key and the shard request further on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidQuery(f"{what} is not valid Unicode: {exc.reason} at {exc.start}") from None
    return text


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _image(raw: Any, settings: RouterSettings) -> tuple[Image.Image, str]:
    """The decoded picture and the digest of its bytes (as the encoder takes a product's)."""
    if not isinstance(raw, str) or not raw:
        raise InvalidQuery("image_b64 must be a non-empty base64 string")
    if len(raw) > settings.max_image_bytes * 4 // 3 + 4:
        raise InvalidQuery(f"image is larger than {settings.max_image_bytes} bytes")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidQuery(f"image_b64 is not valid base64: {exc}") from exc
    try:
        return decode_image(data, settings.max_image_pixels), image_digest(data)
    except ImageRejected as exc:
        raise InvalidQuery(f"image_b64 is not an acceptable image: {exc}") from exc
