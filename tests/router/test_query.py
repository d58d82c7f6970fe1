from __future__ import annotations

import base64
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import MultiDict
from PIL import Image

from services.router.query import query_from_json, query_from_params
from services.router.settings import RouterSettings
from vitrine.errors import InvalidMessage, InvalidQuery
from vitrine.images import image_digest

SETTINGS = RouterSettings(max_k=100, default_k=10, max_query_chars=50)


def test_a_plain_query_is_normalised() -> None:
    query = query_from_params(MultiDict({"q": "  red   leather\tboots ", "k": "5"}), SETTINGS)
    assert (query.text, query.k) == ("red leather boots", 5)
    assert query_from_params(MultiDict({"q": "boots"}), SETTINGS).k == 10


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "non-empty"),
        ({"q": "   "}, "non-empty"),
        ({"q": "x" * 51}, "longer than 50"),
        ({"q": "boots", "k": "0"}, "between 1 and 100"),
        ({"q": "boots", "k": "101"}, "between 1 and 100"),
        ({"q": "boots", "k": "ten"}, "integer"),
    ],
)
def test_bad_queries_are_refused_with_a_message(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidQuery, match=message):
        query_from_params(MultiDict(params), SETTINGS)


def test_an_image_query_carries_the_digest_the_encoder_gives_the_same_bytes() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 8), (200, 30, 40)).save(buffer, format="PNG")
    data = buffer.getvalue()
    query = query_from_json({"image_b64": base64.b64encode(data).decode(), "k": 3}, SETTINGS)
    assert query.image is not None and query.image.size == (6, 8)
    assert query.image_digest == image_digest(data) != ""
    assert query_from_json({"text": "red boots"}, SETTINGS).image_digest == ""


def test_shard_urls_come_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITRINE_SHARD_URLS", "http://a:1/, http://b:2")
    monkeypatch.setenv("VITRINE_DEADLINE_MS", "55")
    settings = RouterSettings()
    assert settings.shard_urls == ["http://a:1", "http://b:2"]
    assert settings.deadline_ms == 55


# property-based: whatever the parameters or body, a Query or a 400, nothing else

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=10,
)
BODY_KEYS = st.sampled_from(["text", "image_b64", "k", "filters", "colour"]) | st.text(max_size=6)
FILTERS = st.sampled_from(["colour", "gender", "brand"])


@given(st.dictionaries(BODY_KEYS, json_values | st.dictionaries(FILTERS, json_values),
                       max_size=5))
def test_any_json_body_gives_a_query_or_a_400(body: dict[str, object]) -> None:
    try:
        query = query_from_json(body, SETTINGS)
    except (InvalidQuery, InvalidMessage) as exc:
        assert exc.http_status == 400 and str(exc)
        return
    assert 1 <= query.k <= SETTINGS.max_k
    assert (query.text is None) != (query.image is None)


PARAM_NAMES = st.sampled_from(["q", "k", "budget_ms", "colour", "gender", "offset"])
PARAM_VALUES = st.text(max_size=20) | st.sampled_from(["inf", "nan", "-0", "1e309", "5", ","])


@given(st.lists(st.tuples(PARAM_NAMES | st.text(max_size=5), PARAM_VALUES), max_size=6))
def test_any_query_string_gives_a_query_or_a_400(pairs: list[tuple[str, str]]) -> None:
    try:
        query = query_from_params(MultiDict(pairs), SETTINGS)
    except InvalidQuery as exc:
        assert str(exc)
        return
    assert query.text and 1 <= query.k <= SETTINGS.max_k
    assert set(query.filters) <= set(SETTINGS.filter_fields)


def test_a_named_model_is_checked_and_the_header_may_not_contradict_it() -> None:
    from services.router.query import with_model_header

    named = query_from_params(MultiDict({"q": "red dress", "model": "arch@w"}), SETTINGS)
    assert named.model == "arch@w"
    assert with_model_header(named, None).model == "arch@w"
    assert with_model_header(named, "arch@w").model == "arch@w"
    with pytest.raises(InvalidQuery, match="disagree"):
        with_model_header(named, "other@v")
    plain = query_from_params(MultiDict({"q": "red dress"}), SETTINGS)
    assert plain.model is None and with_model_header(plain, "other@v").model == "other@v"
    for bad in ("", "x" * 301):
        with pytest.raises(InvalidQuery, match="model must be a model id"):
            query_from_params(MultiDict({"q": "red dress", "model": bad}), SETTINGS)
        with pytest.raises(InvalidQuery, match="model must be a model id"):
            with_model_header(plain, bad)
    with pytest.raises(InvalidQuery, match="model must be a model id"):
        query_from_json({"text": "red dress", "model": 7}, SETTINGS)
