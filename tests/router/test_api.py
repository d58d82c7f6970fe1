"""The storefront API over real HTTP: every bad query gets a 400 with a message."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import http_json
from vitrine.stack import LocalStack

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


def test_a_client_budget_too_small_for_any_shard_gives_a_partial_answer(
    stack: LocalStack,
) -> None:
    request = urllib.request.Request(
        f"{stack.router_url}/search?q=never+cached+{time.monotonic_ns()}&k=3",
        headers={"X-Vitrine-Budget-Ms": "0.01"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    assert answer["partial"] is True
    assert answer["missing_shards"] == list(range(stack.settings.num_shards))
    assert answer["results"] == [] and answer["coverage"]["shards_answered"] == 0


def test_a_client_budget_within_bounds_is_honoured(stack: LocalStack) -> None:
    status, answer = http_json(f"{stack.router_url}/search?q=boots&k=2&budget_ms=1500")
    assert status == 200 and not answer["partial"]
