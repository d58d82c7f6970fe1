"""Shard service: one partition of the vectors per served model, fed by the log, searched over
HTTP. Which models are served is the registry's to say (services/shard/models.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import msgpack
import structlog
from aiohttp import web

from proto.search import SearchRequest, SearchResponse
from proto.stats import ModelStats, SegmentStats, ShardStats
from proto.vectors import ProductFields
from services.shard.attributes import RowFilter
from services.shard.hybrid import count_facets, reciprocal_rank_fusion, weighted_fusion
from services.shard.metrics import ShardMetrics
from services.shard.models import ModelIndex, ServedModels
from services.shard.settings import ShardSettings
from services.shard.store import Hits
from vitrine.errors import ProductNotFound
from vitrine.registry import RegistryFollower
from vitrine.service import READINESS, REGISTRY, background, base_app, limit_compute_threads

log = structlog.get_logger()

SETTINGS = web.AppKey("settings", ShardSettings)
METRICS = web.AppKey("metrics", ShardMetrics)
MODELS = web.AppKey("models", ServedModels)

MSGPACK = "application/msgpack"


async def create_app(settings: ShardSettings) -> web.Application:
    app = base_app("shard")
    limit_compute_threads(settings.compute_threads)
    app[SETTINGS] = settings
    app[METRICS] = ShardMetrics(app[REGISTRY], settings.shard_id)
    app[MODELS] = ServedModels(settings, app[METRICS], app[READINESS],
                               _observe_batch(app[METRICS]))
    app[READINESS].set_not_ready("reading the model registry")
    app.cleanup_ctx.append(_models)
    app.router.add_post("/search", search)
    app.router.add_get("/stats", stats)
    app.router.add_get("/content", content)
    app.router.add_get("/products/{product_id}", product)
    return app


async def product(request: web.Request) -> web.Response:
    """One live product as this shard holds it (what its hits show): for the router's images
    and for operators checking a product against the log."""
    product_id = request.match_info["product_id"]
    found = _index(request).store.product(product_id)
    if found is None:
        raise ProductNotFound(f"shard {request.app[SETTINGS].shard_id} holds no product "
                              f"{product_id[:128]!r}")
    version, fields = found
    return web.json_response(
        {"product_id": product_id, "version": version}
        | ProductFields.unpack(fields).model_dump()
    )


async def content(request: web.Request) -> web.Response:
    """Every live product with its version (msgpack map): to audit a shard against the log."""
    return web.Response(
        body=msgpack.packb(_index(request).store.live_versions()), content_type=MSGPACK
    )


async def stats(request: web.Request) -> web.Response:
    """The active model's figures at the top (what readers of the release before read), and
    every served model's under `models`."""
    app = request.app
    served = app[MODELS]
    models = {index.model_id: _model_stats(index) for index in served.indexes.values()}
    active = served.active
    top = models[active.model_id] if active is not None else ModelStats(
        vectors=0, ready=False, partitions=[], vectors_topic=app[SETTINGS].vectors_topic)
    answer = ShardStats(
        shard_id=app[SETTINGS].shard_id,
        num_shards=app[SETTINGS].num_shards,
        ready=app[READINESS].ready,
        active_model=active.model_id if active is not None else None,
        models=models,
        total_index_bytes=served.nbytes(),
        **top.model_dump(exclude={"ready"}),
    )
    return web.json_response(answer.model_dump(mode="json"))


def _model_stats(index: ModelIndex) -> ModelStats:
    replicator, store = index.replicator, index.store
    sealed = store.sealed
    return ModelStats(
        vectors=len(store),
        ready=index.readiness.ready,
        vectors_topic=index.entry.vectors_topic,
        partitions=replicator.partitions,
        next_offsets=replicator.next_offsets,
        lag=replicator.lag.lags,
        index_bytes=store.nbytes(),
        segments=SegmentStats(
            growing=len(store.growing or ()),
            sealed_rows=len(sealed) if sealed else 0,
            sealed_dead=sealed.dead_count if sealed else 0,
            sealed_kind=sealed.kind if sealed else None,
            sealing=store.sealing,
        ),
        restored_from=replicator.restored_from,
    )


def _index(request: web.Request) -> ModelIndex:
    """The model a read names (`?model=`), else the active one."""
    return request.app[MODELS].index_for(request.query.get("model"))


async def search(request: web.Request) -> web.Response:
    arrived = time.perf_counter()
    body = await request.read()
    query = SearchRequest.from_wire(body)
    app = request.app
    if not app[READINESS].ready:
        raise web.HTTPServiceUnavailable(text=f"shard not ready: {app[READINESS].reason}")
    _drop_if_expired(app, arrived, query.budget_ms)
    index = app[MODELS].index_for(query.model_id)
    where = RowFilter(query.filters, query.price_min, query.price_max, query.in_stock)
    depth = max(query.k, query.facet_candidates)
    hits = await _ranked(app, index, query, where, depth)
    _drop_if_expired(app, arrived, query.budget_ms)
    store, v2 = index.store, query.schema_version >= 2
    facets = [count_facets(fields[: query.facet_candidates], query.facets)
              for fields in hits.fields] if query.facets else []
    top = hits.head(query.k)
    vectors: list[list[bytes]] = []
    if v2 and query.with_vectors:  # the dense scan gathered them; fused hits are looked up
        vectors = top.vectors if top.vectors is not None else \
            [store.vectors_of(ids) for ids in top.ids]
    answer = SearchResponse(  # in the version asked: a router of the release before reads v1
        schema_version=query.schema_version,
        model_id=index.model_id if query.schema_version >= 3 else None,
        shard_id=app[SETTINGS].shard_id,
        ids=top.ids,
        scores=top.scores,
        fields=top.fields if v2 else [],
        vectors=vectors,
        facets=facets if v2 else [],
        facet_candidates=[min(len(f), query.facet_candidates) for f in hits.fields]
        if v2 and query.facets else [],
        searched=len(store),
    )
    return web.Response(body=answer.to_wire(), content_type=MSGPACK)


async def _ranked(
    app: web.Application, index: ModelIndex, query: SearchRequest, where: RowFilter, depth: int
) -> Hits:
    """The best `depth` products per query in the query's mode; filters inside every scan."""
    store, batcher = index.store, index.batcher
    filters = where or None
    if query.facets:
        store.attributes.check_fields(query.facets, "facet")
    if query.mode == "dense":
        return await batcher.search(query.query_matrix(), depth, filters,
                                         query.with_vectors and query.schema_version >= 2)
    if query.mode == "lexical":
        return store.lexical_search(query.texts, depth, filters)
    settings = app[SETTINGS]
    candidates = max(depth, settings.hybrid_candidates)
    dense = await batcher.search(query.query_matrix(), candidates, filters)
    lexical = store.lexical_search(query.texts, candidates, filters)
    if settings.hybrid_fusion == "rrf":
        return reciprocal_rank_fusion(dense, lexical, depth, settings.rrf_k)
    return weighted_fusion(dense, lexical, depth, settings.hybrid_weight)


def _drop_if_expired(app: web.Application, arrived: float, budget_ms: float) -> None:
    """Work the router has stopped waiting for is not worth a scan or the bytes back."""
    if (time.perf_counter() - arrived) * 1000 > budget_ms:
        app[METRICS].expired.inc()
        raise web.HTTPGatewayTimeout(text="deadline passed before the answer was ready")


def _observe_batch(metrics: ShardMetrics) -> Callable[[int, float], None]:
    def observe(queries: int, seconds: float) -> None:
        metrics.search_seconds.observe(seconds)
        metrics.batch_queries.observe(queries)

    return observe


async def _models(app: web.Application) -> AsyncIterator[None]:
    """Follow the model registry: an index per served model, each fed by its own topic."""
    served = app[MODELS]
    follower = RegistryFollower(app[SETTINGS], served.apply)
    async with background(app, follower.run(), "model registry"):
        yield
    await served.aclose()  # graceful shutdown: each index snapshots, restarts from here
