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

from services.router.fleet import FLEETS, FleetSwitch, add_fleet_routes
from services.router.metrics import EncodingMetrics, RouterMetrics
from services.router.models import MODEL_HEADER, RouterModels
from services.router.openapi import openapi_document
from services.router.products import ProductLookup
from services.router.query import (
    Query,
    budget_ms,
    query_from_body,
    query_from_params,
    with_model_header,
)
from services.router.search import SearchCore
from services.router.settings import RouterSettings
from services.router.storefront import PRODUCT_IMAGES, ProductImages, add_storefront_routes
from vitrine.fetch import ImageFetcher, make_session
from vitrine.registry import RegistryFollower
from vitrine.service import (
    READINESS,
    REGISTRY,
    background,
    base_app,
    limit_compute_threads,
    request_id,
    service_version,
)

log = structlog.get_logger()

SETTINGS = web.AppKey("settings", RouterSettings)
SHARDS = web.AppKey("shards", aiohttp.ClientSession)
METRICS = web.AppKey("metrics", RouterMetrics)
MODELS = web.AppKey("models", RouterModels)
SEARCH = web.AppKey("search", SearchCore)
OPENAPI = web.AppKey("openapi", dict)


async def create_app(settings: RouterSettings) -> web.Application:
    app = base_app("router")
    app[SETTINGS] = settings
    app[METRICS] = RouterMetrics(app[REGISTRY])
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    add_fleet_routes(app, FleetSwitch(settings.shard_urls, settings.replica_policy()), token)
    app.cleanup_ctx.extend([_models, _shard_session, _search_core, _image_session, _canary])
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
    query = with_model_header(query, request.headers.get(MODEL_HEADER))
    answer = await request.app[SEARCH].answer(query, budget, request_id(request), started)
    return web.Response(body=answer.model_dump_json().encode(), content_type="application/json")


async def _models(app: web.Application) -> AsyncIterator[None]:
    """Every model the registry serves, each with its query encoder and the shared
    query-vector cache in Redis where one is set (only ever an optimisation)."""
    settings = app[SETTINGS]
    limit_compute_threads(settings.compute_threads)
    client = aioredis.from_url(settings.redis_url) if settings.redis_url else None
    models = RouterModels(settings, client, EncodingMetrics(app[REGISTRY]), app[READINESS])
    app[MODELS] = models
    follower = RegistryFollower(settings, models.apply).run()
    async with background(app, follower, "model registry") as following:
        # listen only once a query can be answered, as before the registry: a client that
        # reaches a starting router finds nothing there rather than a 503
        loaded = asyncio.ensure_future(models.active_loaded.wait())
        await asyncio.wait([loaded, following], return_when=asyncio.FIRST_COMPLETED)
        if not loaded.done():
            loaded.cancel()
            following.result()  # the registry or the model failed: so does the start
            raise RuntimeError("the model registry stopped before the active model loaded")
        yield
    await models.aclose()
    if client is not None:
        await client.aclose()


async def _shard_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SHARDS] = session
        yield


async def _search_core(app: web.Application) -> AsyncIterator[None]:
    app[SEARCH] = SearchCore(
        app[MODELS], app[SHARDS], app[FLEETS], app[METRICS], app[SETTINGS]
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


async def _canary(app: web.Application) -> AsyncIterator[None]:
    """Which candidates may take the canary share: only with a share set."""
    if not app[SETTINGS].canary_share:
        yield
        return
    watch = app[MODELS].watch_coverage(app[FLEETS], app[SHARDS])
    async with background(app, watch, "canary coverage"):
        yield
