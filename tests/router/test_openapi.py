"""The router's OpenAPI document is valid and says what the router really answers."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from openapi_spec_validator import validate

from services.router.query import BODY_FIELDS, SEARCH_PARAMS
from tests.helpers import http_json
from vitrine.cli.stack import LocalStack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def document(stack: LocalStack) -> dict[str, Any]:
    status, document = http_json(f"{stack.router_url}/openapi.json")
    assert status == 200
    return document


def conforms(document: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """The body matches the schema the document gives for this path, method and status."""
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": document["components"]})


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_it_lists_every_parameter_and_field_the_parser_takes(
    document: dict[str, Any], stack: LocalStack
) -> None:
    names = {p["name"] for p in document["paths"]["/search"]["get"]["parameters"]
             if p["in"] == "query"}
    assert names == {*SEARCH_PARAMS, *stack.settings.filter_fields}
    body = document["components"]["schemas"]["SearchBody"]
    assert set(body["properties"]) == set(BODY_FIELDS)
    assert body["additionalProperties"] is False


def test_real_answers_match_the_document(
    document: dict[str, Any], stack: LocalStack, fashion_data: Path
) -> None:
    router = stack.router_url
    query = urllib.parse.urlencode({"q": "blue shirt", "k": 3, "colour": "Blue"})
    picture = base64.b64encode((fashion_data / "images" / "10000.jpg").read_bytes()).decode()
    exchanges = [
        ("/search", "get", f"/search?{query}", None, 200),
        ("/search", "post", "/search", {"text": "red shoes", "k": 2}, 200),
        ("/search", "post", "/search", {"image_b64": picture, "k": 2}, 200),
        ("/search", "get", "/search?q=shoes&k=0", None, 400),
        ("/search", "get", "/search?q=shoes&page=2", None, 400),
        ("/search", "post", "/search", {"text": "x", "sort": "price"}, 400),
        ("/images/{product_id}", "get", "/images/never-published-42", None, 404),
        ("/images/{product_id}", "get", "/images/bad%20id", None, 400),
    ]
    for path, method, url, body, expected in exchanges:
        status, answer = http_json(f"{router}{url}", body)
        assert status == expected, (url, answer)
        conforms(document, path, method, status, answer)


def test_a_wrong_answer_would_not_match(document: dict[str, Any]) -> None:
    """The check above can fail: an answer with a field the document lacks is refused."""
    with pytest.raises(jsonschema.ValidationError):
        conforms(document, "/search", "get", 200, {"results": [], "surprise": 1})
