from __future__ import annotations

import pytest

from services.router.query import query_from_params
from services.router.settings import RouterSettings
from vitrine.errors import InvalidQuery

SETTINGS = RouterSettings(max_k=100, default_k=10, max_query_chars=50)


def test_a_plain_query_is_normalised() -> None:
    query = query_from_params({"q": "  red   leather\tboots ", "k": "5"}, SETTINGS)
    assert (query.text, query.k) == ("red leather boots", 5)
    assert query_from_params({"q": "boots"}, SETTINGS).k == 10


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
        query_from_params(params, SETTINGS)


def test_shard_urls_come_comma_separated_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VITRINE_SHARD_URLS", "http://a:1/, http://b:2")
    monkeypatch.setenv("VITRINE_DEADLINE_MS", "55")
    settings = RouterSettings()
    assert settings.shard_urls == ["http://a:1", "http://b:2"]
    assert settings.deadline_ms == 55
