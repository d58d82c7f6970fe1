"""Router service: the storefront's search API. The handlers decode a query, ask the search
core (services/router/search.py) and encode its typed answer; the rest is lifecycle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from services.router.encoding import QueryEncoder
from services.router.fleet import FLEETS, FleetSwitch, add_fleet_routes
from services.router.metrics import EncodingMetrics, RouterMetrics
from services.router.openapi import openapi_document
from services.router.products import ProductLookup
from services.router.query import Query, budget_ms, query_from_body, query_from_params
from services.router.search import SearchCore
from services.router.settings import RouterSettings
from services.router.storefront import PRODUCT_IMAGES, ProductImages, add_storefront_routes
from vitrine.fetch import ImageFetcher, make_session
from vitrine.model import DualEncoder, load_dual_encoder
from vitrine.service import (
    READINESS,
    REGISTRY,
    base_app,
    limit_compute_threads,
    request_id,
    service_version,
)

log = structlog.get_logger()

SETTINGS = web.AppKey("settings", RouterSettings)
MODEL = web.AppKey("model", DualEncoder)
SHARDS = web.AppKey("shards", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", RouterMetrics)
QUERY_ENCODER = web.AppKey("query_encoder", QueryEncoder)
SEARCH = web.AppKey("search", SearchCore)
OPENAPI = web.AppKey("openapi", dict)


async def create_app(settings: RouterSettings) -> web.Application:
    app = base_app("router")
    app[SETTINGS] = settings
    app[METRICS] = RouterMetrics(app[REGISTRY])
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    add_fleet_routes(app, FleetSwitch(settings.shard_urls, settings.replica_policy()), token)
    app.cleanup_ctx.extend([_model, _query_encoder, _shard_session, _search_core, _image_session])
    app.router.add_get("/search", search_get)
    app.router.add_post("/search", search_post)
    app[OPENAPI] = openapi_document(settings, service_version())
    app.router.add_get("/openapi.json", openapi)
    add_storefront_routes(app)
    return app


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


async def search_get(request: web.Request) -> web.Response:
    started = time.monotonic()
    query = query_from_params(request.query, request.app[SETTINGS])
    return await _answered(request, query, started)


async def search_post(request: web.Request) -> web.Response:
    started = time.monotonic()
    query = await query_from_body(request, request.app[SETTINGS])
    return await _answered(request, query, started)


async def _answered(request: web.Request, query: Query, started: float) -> web.Response:
    budget = budget_ms(request, request.app[SETTINGS])
    answer = await request.app[SEARCH].answer(query, budget, request_id(request), started)
    return web.Response(body=answer.model_dump_json().encode(), content_type="application/json")


async def _model(app: web.Application) -> AsyncIterator[None]:
    model = await asyncio.to_thread(
        load_dual_encoder, app[SETTINGS].model_spec(), precision=app[SETTINGS].model_precision,
        text_runtime=app[SETTINGS].text_runtime, compute_threads=app[SETTINGS].compute_threads,
    )
    limit_compute_threads(app[SETTINGS].compute_threads)
    await asyncio.to_thread(model.warm_up)  # text and image queries: no cold first call
    app[MODEL] = model
    app[READINESS].set_ready()
    log.info("model loaded", model_id=model.model_id)
    yield


async def _query_encoder(app: web.Application) -> AsyncIterator[None]:
    """Text query encoding, with the shared query-vector cache in Redis where one is set:
    only ever an optimisation (services/router/encoding.py)."""
    settings = app[SETTINGS]
    client = aioredis.from_url(settings.redis_url) if settings.redis_url else None
    encoder = QueryEncoder(app[MODEL], client, settings, EncodingMetrics(app[REGISTRY]))
    app[QUERY_ENCODER] = encoder
    yield
    await encoder.aclose()
    if client is not None:
        await client.aclose()


async def _shard_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SHARDS] = session
        yield


async def _search_core(app: web.Application) -> AsyncIterator[None]:
    app[SEARCH] = SearchCore(
        app[QUERY_ENCODER], app[SHARDS], app[FLEETS], app[METRICS], app[SETTINGS]
    )
    yield


async def _image_session(app: web.Application) -> AsyncIterator[None]:
    """Product images for the storefront, fetched under the encoder's rules."""
    settings = app[SETTINGS]
    policy = settings.fetch_policy()
    products = ProductLookup(
        app[SHARDS], app[FLEETS], settings.vector_partitions, settings.fetch_timeout_s
    )
    async with make_session(policy) as session:
        app[PRODUCT_IMAGES] = ProductImages(products, ImageFetcher(policy, session))
        yield
