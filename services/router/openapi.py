"""The router's API as an OpenAPI 3.1 document, served at `GET /openapi.json`.

Schemas come from the types the router answers with (`proto/storefront.py`), the GET
parameters and POST fields from the parser's own lists (`services/router/query.py`), so the
document says what the code does. tests/router/test_openapi.py validates the document and
checks real answers, good and bad, against it.
"""

from __future__ import annotations

from typing import Any

from pydantic.json_schema import models_json_schema

from proto.search import MAX_MODEL_ID_CHARS
from proto.storefront import ApiError, SearchAnswer, SearchBody
from services.router.models import MODEL_HEADER
from services.router.query import BODY_FIELDS, BUDGET_HEADER, SEARCH_PARAMS
from services.router.settings import RouterSettings
from vitrine.images import CONTENT_TYPES
from vitrine.service import REQUEST_ID_HEADER

REF = "#/components/schemas/{model}"


def openapi_document(settings: RouterSettings, version: str) -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(SearchBody, "validation"), (SearchAnswer, "serialization"), (ApiError, "serialization")],
        ref_template=REF,
    )
    assert set(SearchBody.model_fields) == set(BODY_FIELDS), "the body model and parser agree"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Vitrine search API",
            "version": version,
            "description": "Multimodal product search: text or a picture in, products out, "
            "under a deadline. Every error answer is {\"error\": reason}.",
        },
        "paths": {
            "/search": {"get": _search_get(settings), "post": _search_post()},
            "/images/{product_id}": {"get": _product_image()},
            "/healthz": {"get": _probe("Alive: 503 once the process should be restarted")},
            "/readyz": {"get": _probe("Ready for traffic: 503 while starting or stopping")},
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "Prometheus text format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1",
                                      "content": {"application/json": {"schema": {}}}}},
            }},
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }


def _search_get(settings: RouterSettings) -> dict[str, Any]:
    described = {
        "q": ("What the shopper typed", True, {"type": "string", "minLength": 1}),
        "k": ("How many results", False, {"type": "integer", "minimum": 1,
                                         "maximum": settings.max_k}),
        "budget_ms": ("End-to-end budget in ms (also the X-Vitrine-Budget-Ms header)", False,
                      {"type": "number", "exclusiveMinimum": 0,
                       "maximum": settings.max_budget_ms}),
        "mode": (f"dense, lexical or hybrid (default {settings.default_mode})", False,
                 {"type": "string", "enum": ["dense", "lexical", "hybrid"]}),
        "offset": ("Skip this many results: pages", False,
                   {"type": "integer", "minimum": 0, "maximum": settings.max_offset}),
        "price_min": ("Lowest price", False, {"type": "number", "minimum": 0}),
        "price_max": ("Highest price", False, {"type": "number", "minimum": 0}),
        "in_stock": ("true: only products in stock", False,
                     {"type": "string", "enum": ["true", "false"]}),
        "facets": ("Filterable fields to count values of, comma-separated", False,
                   {"type": "string"}),
        "collapse": (f"One result per picture (default {str(settings.collapse).lower()})",
                     False, {"type": "string", "enum": ["true", "false"]}),
        "model": ("A served model's id (also the X-Vitrine-Model header); default: the active",
                  False, {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_ID_CHARS}),
    }
    assert set(described) == set(SEARCH_PARAMS), "the document and the parser agree"
    parameters = [
        {"name": name, "in": "query", "required": required, "description": text,
         "schema": schema}
        for name, (text, required, schema) in described.items()
    ]
    parameters += [
        {"name": field, "in": "query", "required": False,
         "description": f"Filter: accepted values of {field}, comma-separated (any of them)",
         "schema": {"type": "string"}}
        for field in settings.filter_fields
    ]
    return {
        "summary": "Search by text",
        "description": "Any parameter not listed here is a 400.",
        "parameters": parameters + _headers(),
        "responses": _search_responses(),
    }


def _search_post() -> dict[str, Any]:
    return {
        "summary": "Search by text or by picture",
        "parameters": [*_headers(), {"name": "budget_ms", "in": "query", "required": False,
                                     "schema": {"type": "number", "exclusiveMinimum": 0}}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": REF.format(model="SearchBody")}}}},
        "responses": {**_search_responses(), "413": _error("The body is too large")},
    }


def _product_image() -> dict[str, Any]:
    return {
        "summary": "A product's picture, fetched under the encoder's rules",
        "parameters": [{"name": "product_id", "in": "path", "required": True,
                        "schema": {"type": "string", "pattern": r"^[A-Za-z0-9._:\-]{1,128}$"}}],
        "responses": {
            "200": {"description": "The picture, byte for byte",
                    "content": {kind: {"schema": {"type": "string", "format": "binary"}}
                                for kind in sorted(set(CONTENT_TYPES.values()))}},
            "400": _error("Not a product id"),
            "404": _error("No live product by that id"),
            "502": _error("The product's picture cannot be fetched or served"),
        },
    }


def _headers() -> list[dict[str, Any]]:
    return [
        {"name": BUDGET_HEADER, "in": "header", "required": False,
         "schema": {"type": "number", "exclusiveMinimum": 0}},
        {"name": MODEL_HEADER, "in": "header", "required": False,
         "description": "A served model's id; default: the active model",
         "schema": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_ID_CHARS}},
        {"name": REQUEST_ID_HEADER, "in": "header", "required": False,
         "description": "Kept if a printable ASCII token of at most 64 characters",
         "schema": {"type": "string"}},
    ]


def _search_responses() -> dict[str, Any]:
    return {
        "200": {"description": "The best products, best first; `partial` if a shard was late",
                "content": {"application/json": {
                    "schema": {"$ref": REF.format(model="SearchAnswer")}}}},
        "400": _error("A query the router will not run, and why"),
        "404": _error("The query names a model that is not served"),
        "503": _error("The named model is still loading here, or no shard replica answered"),
    }


def _probe(summary: str) -> dict[str, Any]:
    return {"summary": summary, "responses": {
        "200": {"description": "Yes", "content": {"application/json": {"schema": {}}}},
        "503": {"description": "No, with the reason",
                "content": {"application/json": {"schema": {}}}},
    }}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ApiError")}}}}
