"""Router service: the storefront's search API. Encode, fan out, merge: the shards' hits carry
their products, so an answer needs nothing but the shards (Redis only caches query vectors)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import redis.asyncio as aioredis
import structlog
from aiohttp import web

from proto.search import SearchRequest
from proto.storefront import Coverage, Hit, SearchAnswer
from proto.vectors import ProductFields
from services.router.encoding import QueryEncoder
from services.router.fanout import fan_out
from services.router.fleet import FLEET, Fleet, add_fleet_routes
from services.router.merge import Merged, merge_topk
from services.router.metrics import EncodingMetrics, RouterMetrics
from services.router.openapi import openapi_document
from services.router.products import ProductLookup
from services.router.query import Query, budget_ms, query_from_body, query_from_params
from services.router.settings import RouterSettings
from services.router.storefront import PRODUCT_IMAGES, ProductImages, add_storefront_routes
from vitrine.errors import InvalidMessage, InvalidQuery
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
OPENAPI = web.AppKey("openapi", dict)


async def create_app(settings: RouterSettings) -> web.Application:
    app = base_app("router")
    app[SETTINGS] = settings
    app[METRICS] = RouterMetrics(app[REGISTRY])
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    add_fleet_routes(app, Fleet(settings.shard_urls, settings.replica_policy()), token)
    app.cleanup_ctx.extend([_model, _query_encoder, _shard_session, _image_session])
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
    return web.json_response((await answer(request, query, started)).model_dump())


async def search_post(request: web.Request) -> web.Response:
    started = time.monotonic()
    query = await query_from_body(request, request.app[SETTINGS])
    return web.json_response((await answer(request, query, started)).model_dump())


async def answer(request: web.Request, query: Query, started: float) -> SearchAnswer:
    """One deadline end to end: encoding spends from it and the shards get what is left."""
    app = request.app
    settings, metrics = app[SETTINGS], app[METRICS]
    budget = budget_ms(request, settings)
    deadline = started + budget / 1000
    with metrics.stage_seconds.labels("encode").time():
        vector = await _encode(app[QUERY_ENCODER], query)
    encoded = time.monotonic()
    fleet = app[FLEET].current  # one fleet per answer: a re-shard never splits a query
    sizes = fleet.sizes
    if encoded >= deadline:  # nothing left to give the shards: say whose time it was
        metrics.encode_overruns.inc()
        metrics.queries.labels(query.kind, "false").inc()
        spent = (encoded - started) * 1000
        return SearchAnswer(
            results=[], partial=True, missing_shards=[],
            partial_reason=f"query encoding took {spent:.0f} ms of the {budget:g} ms budget: "
                           "no time was left to ask the shards",
            coverage=coverage(0, fleet.num_shards, 0, sizes),
            took_ms=round(spent, 3),
        )
    shard_query = SearchRequest.build(
        vector, query.k, (deadline - encoded) * 1000, request_id(request), query.filters
    )
    with metrics.stage_seconds.labels("fanout").time():
        fanned = await fan_out(app[SHARDS], fleet.replicas, shard_query, deadline, metrics)
    with metrics.stage_seconds.labels("merge").time():
        hits = [_hit(merged) for merged in merge_topk(fanned.responses, query.k)]
    for shard in fanned.missing:
        metrics.shard_failures.labels(str(shard)).inc()
    sizes.update({r.shard_id: r.searched for r in fanned.responses})
    searched = sum(r.searched for r in fanned.responses)
    partial = bool(fanned.missing)
    metrics.queries.labels(query.kind, str(not partial).lower()).inc()
    return SearchAnswer(
        results=hits,
        partial=partial,
        missing_shards=sorted(fanned.missing),
        partial_reason="; ".join(
            f"shard {shard}: {why}" for shard, why in sorted(fanned.missing.items())
        ) or None,
        coverage=coverage(len(fanned.responses), fleet.num_shards, searched, sizes),
        took_ms=round((time.monotonic() - started) * 1000, 3),
    )


def _hit(merged: Merged) -> Hit:
    try:
        fields = ProductFields.unpack(merged.fields)
    except InvalidMessage as exc:  # a shard's bug: the hit still counts, without its fields
        log.warning("unreadable product fields", product_id=merged.product_id, reason=str(exc))
        fields = ProductFields()
    return Hit(
        product_id=merged.product_id, score=round(merged.score, 6), title=fields.title,
        image_uri=fields.image_uri, attributes=fields.attributes,
    )


def coverage(answered: int, shards: int, searched: int, sizes: dict[int, int]) -> Coverage:
    """How much of the catalog this answer looked at. A missing shard counts with the size it
    last reported (0 if it never answered)."""
    total = max(searched, sum(sizes.values()))
    return Coverage(
        shards_answered=answered,
        shards_total=shards,
        vectors_searched=searched,
        vectors_total=total,
        ratio=round(searched / total, 6) if total else float(answered == shards),
    )


async def _encode(encoder: QueryEncoder, query: Query) -> np.ndarray:
    """The query as a (1, dim) matrix: text through the cache and batcher, images directly."""
    if query.text is not None:
        return (await encoder.encode_text(query.text))[np.newaxis]
    assert query.image is not None
    model = encoder.model
    try:  # any aspect ratio the encoder accepts; whatever else the picture holds is its fault
        pixels = await asyncio.to_thread(model.preprocess_image, query.image)
    except Exception as exc:
        raise InvalidQuery(f"image_b64 cannot be prepared for the model: {exc}") from exc
    return await asyncio.to_thread(model.encode_pixels, [pixels])


async def _model(app: web.Application) -> AsyncIterator[None]:
    model = await asyncio.to_thread(
        load_dual_encoder, app[SETTINGS].model_spec(), precision=app[SETTINGS].model_precision
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


async def _image_session(app: web.Application) -> AsyncIterator[None]:
    """Product images for the storefront, fetched under the encoder's rules."""
    settings = app[SETTINGS]
    policy = settings.fetch_policy()
    products = ProductLookup(
        app[SHARDS], app[FLEET], settings.vector_partitions, settings.fetch_timeout_s
    )
    async with make_session(policy) as session:
        app[PRODUCT_IMAGES] = ProductImages(products, ImageFetcher(policy, session))
        yield
