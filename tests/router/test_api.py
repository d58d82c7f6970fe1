"""The storefront API over real HTTP: every bad query gets a 400 with a message."""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from PIL import Image

from tests.helpers import http_json, scrape
from vitrine.cli.stack import LocalStack

pytestmark = pytest.mark.stack


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/search?q=", None, "non-empty"),
        ("/search", None, "non-empty"),
        ("/search?q=boots&k=0", None, "between 1 and"),
        ("/search?q=boots&k=5000", None, "between 1 and"),
        ("/search?q=boots&k=many", None, "integer"),
        ("/search", {"text": "  ", "k": 3}, "non-empty"),
        ("/search", {"text": "boots", "k": 2.5}, "integer"),
        ("/search", {"text": "boots", "k": True}, "integer"),
        ("/search", {"text": "boots", "image_b64": "aGk="}, "exactly one"),
        ("/search", {"k": 3}, "exactly one"),
        ("/search", {"text": "boots", "colour": "red"}, "unknown fields"),
        ("/search", {"image_b64": "!!not base64!!"}, "not valid base64"),
        ("/search", {"image_b64": base64.b64encode(b"plain text").decode()}, "not an image"),
        ("/search", ["text"], "JSON object"),
    ],
)
def test_bad_queries_get_a_400_with_a_message(
    stack: LocalStack, path: str, body: object, message: str
) -> None:
    status, answer = http_json(f"{stack.router_url}{path}", body)  # type: ignore[arg-type]
    assert status == 400
    assert message in answer["error"]


def test_a_body_that_is_not_json_gets_a_400(stack: LocalStack) -> None:
    request = urllib.request.Request(
        f"{stack.router_url}/search", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=10)
    assert raised.value.code == 400
    assert b"not valid JSON" in raised.value.read()


def test_services_expose_probes_and_metrics(stack: LocalStack) -> None:
    for url in [stack.router_url, stack.encoder_url, *stack.shard_urls]:
        assert http_json(f"{url}/healthz")[0] == 200
        assert http_json(f"{url}/readyz")[0] == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            assert b"vitrine_http_request_duration_seconds" in response.read()


@pytest.mark.parametrize("budget", ["soon", "0", "-5", "100000"])
def test_a_bad_client_budget_gets_a_400(stack: LocalStack, budget: str) -> None:
    status, answer = http_json(f"{stack.router_url}/search?q=boots&budget_ms={budget}")
    assert status == 400 and "budget" in answer["error"]


def test_a_budget_spent_by_the_routers_own_encoding_is_said_so_not_blamed_on_shards(
    stack: LocalStack,
) -> None:
    before = scrape(stack.router_url)
    request = urllib.request.Request(
        f"{stack.router_url}/search?q=never+cached+{time.monotonic_ns()}&k=3",
        headers={"X-Vitrine-Budget-Ms": "0.01"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["partial"] is True and answer["missing_shards"] == []
    assert "query encoding took" in answer["partial_reason"]
    assert answer["results"] == [] and answer["coverage"]["shards_answered"] == 0
    after = scrape(stack.router_url)
    overruns = ("vitrine_router_encode_overruns_total", ())
    assert after[overruns] == before.get(overruns, 0) + 1
    failures = {key: v for key, v in after.items()
                if key[0] == "vitrine_router_shard_failures_total"}
    assert failures == {key: v for key, v in before.items()
                        if key[0] == "vitrine_router_shard_failures_total"}


def test_a_client_budget_within_bounds_is_honoured(stack: LocalStack) -> None:
    status, answer = http_json(f"{stack.router_url}/search?q=boots&k=2&budget_ms=1500")
    assert status == 200 and not answer["partial"]


# -- hostile requests: whatever arrives, a 4xx with a JSON reason, never a 5xx ---------------


def _raw(router: str, method: str, path: str, body: bytes | None = None,
         headers: dict[str, bytes] | None = None) -> tuple[int, dict[str, object]]:
    """One request with raw header bytes (urllib refuses non-latin-1 values)."""
    parsed = urllib.parse.urlsplit(router)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"Content-Length": str(len(body or b"")).encode(),
                            **(headers or {})}.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        content_type = response.getheader("Content-Type", "")
        payload = response.read()
    finally:
        connection.close()
    assert content_type.startswith("application/json"), (response.status, content_type, payload)
    return response.status, json.loads(payload)


def _picture(width: int, height: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (180, 20, 40)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


JSON = {"Content-Type": b"application/json"}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "reason"),
    [
        ("POST", "/search", b"[" * 100_000, JSON, 400, "not valid JSON"),
        ("POST", "/search", b'{"text": ' * 5000 + b"1" + b"}" * 5000, JSON, 400, "JSON"),
        ("POST", "/search", b'{"text": "boots"}',
         {"Content-Type": b"application/json; charset=x-unheard-of"}, 400, "unknown charset"),
        ("POST", "/search", b'{"text": "boots", "k": Infinity}', JSON, 400, "Infinity"),
        ("POST", "/search", b'{"text": "boots", "k": NaN}', JSON, 400, "NaN"),
        ("POST", "/search", b'{"text": "boots", "k": 1e999}', JSON, 400, "beyond the range"),
        ("POST", "/search", b'{"text": "boots", "k": 1e300}', JSON, 400, "between 1 and"),
        ("POST", "/search", b'{"text": "boots \\ud800"}', JSON, 400, "not valid Unicode"),
        ("POST", "/search", b'{"text": "boots", "filters": {"colour": "\\udfff"}}', JSON, 400,
         "not valid Unicode"),
        ("POST", "/search", b'{"text": "boots", "filters": {"brand": "Nike"}}', JSON, 400,
         "cannot filter on 'brand'"),
        ("POST", "/search", b'{"text": "boots", "text": "shoes"}', JSON, 400, "repeats a key"),
        ("POST", "/search", b"\xff\xfe\x00", JSON, 400, "not valid utf-8"),
        ("GET", "/search?q=boots&brand=Nike", None, None, 400, "unknown parameter 'brand'"),
        ("GET", "/search?q=boots&page=2", None, None, 400, "unknown parameter 'page'"),
        ("GET", "/search?q=boots&offset=-1", None, None, 400, "offset must be between"),
        ("GET", "/search?q=boots&offset=100000", None, None, 400, "offset must be between"),
        ("GET", "/search?q=boots&offset=2.5", None, None, 400, "offset must be an integer"),
        ("GET", "/search?q=boots&mode=semantic", None, None, 400, "mode must be one of"),
        ("GET", "/search?q=boots&price_min=cheap", None, None, 400, "price_min must be a number"),
        ("GET", "/search?q=boots&price_max=nan", None, None, 400, "price_max must be between"),
        ("GET", "/search?q=boots&price_min=50&price_max=10", None, None, 400, "is above"),
        ("GET", "/search?q=boots&in_stock=yes", None, None, 400, "in_stock must be true or false"),
        ("GET", "/search?q=boots&facets=brand", None, None, 400, "cannot count facets of 'brand'"),
        ("GET", "/search?q=boots&collapse=0", None, None, 400, "collapse must be true or false"),
        ("POST", "/search", b'{"image_b64": "R0lGODlhAQABAAAAACw=", "mode": "lexical"}', JSON,
         400, "image"),
        ("POST", "/search", b'{"text": "boots", "in_stock": "true"}', JSON, 400,
         "in_stock must be a JSON number or boolean"),
        ("POST", "/search", b'{"text": "boots", "in_stock": 1}', JSON, 400,
         "in_stock must be true or false"),
        ("POST", "/search", b'{"text": "boots", "facets": [1]}', JSON, 400,
         "facets must be a list"),
        ("GET", "/search?q=boots&q=shoes", None, None, 400, "more than once"),
        ("GET", "/search?q=boots&k=inf", None, None, 400, "integer"),
        ("GET", "/search?q=boots&budget_ms=nan", None, None, 400, "budget"),
        ("GET", "/nowhere", None, None, 404, "no such route"),
        ("DELETE", "/search", None, None, 405, "not allowed"),
        ("POST", "/search", b"x" * 100, {**JSON, "Content-Length": b"99999999999"}, 413,
         "too large"),
        ("GET", "/admin/fleet", None, {"Authorization": b"Bearer \xc3\xa9\xff\x80"}, 403, "token"),
        ("GET", "/images/..%2F..%2Fetc%2Fpasswd", None, None, 400, "product id"),
        ("GET", "/images/" + "a" * 500, None, None, 400, "product id"),
    ],
)
def test_hostile_requests_get_a_json_4xx(
    stack: LocalStack, method: str, path: str, body: bytes | None,
    headers: dict[str, bytes] | None, status: int, reason: str,
) -> None:
    got, answer = _raw(stack.router_url, method, path, body, headers)
    assert got == status, answer
    assert isinstance(answer["error"], str) and reason in answer["error"], answer


@pytest.mark.parametrize(
    "request_id", [b"caf\xc3\xa9", b"\xff\xfe", b"a" * 5000, b"tab\there", b"has space"]
)
def test_a_request_id_that_is_not_a_short_ascii_token_changes_nothing(
    stack: LocalStack, request_id: bytes
) -> None:
    status, answer = _raw(stack.router_url, "GET", "/search?q=shirt&k=3",
                          headers={"X-Request-Id": request_id})
    assert status == 200 and not answer["partial"], answer
    assert answer["missing_shards"] == []


@pytest.mark.parametrize(("width", "height"), [(1, 2000), (3000, 1), (2, 1), (1, 1)])
def test_an_image_query_of_any_aspect_ratio_is_answered(
    stack: LocalStack, width: int, height: int
) -> None:
    status, answer = http_json(
        f"{stack.router_url}/search", {"image_b64": _picture(width, height), "k": 3}
    )
    assert status == 200 and not answer["partial"], answer
