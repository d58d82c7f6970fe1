"""Shard service: one FAISS partition of the vectors, fed by the log, searched over HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import msgpack
import structlog
from aiohttp import web
from confluent_kafka import Consumer

from proto.search import SearchRequest, SearchResponse
from proto.stats import SegmentStats, ShardStats
from proto.vectors import ProductFields
from services.shard.attributes import RowFilter
from services.shard.batching import QueryBatcher
from services.shard.hybrid import count_facets, reciprocal_rank_fusion, weighted_fusion
from services.shard.metrics import ShardMetrics
from services.shard.replicator import VectorReplicator
from services.shard.settings import ShardSettings
from services.shard.store import Hits, ShardStore
from vitrine.errors import ProductNotFound
from vitrine.kafka import AsyncConsumer, consumer_config, ensure_topics
from vitrine.service import READINESS, REGISTRY, background, base_app, limit_compute_threads

log = structlog.get_logger()

SETTINGS = web.AppKey("settings", ShardSettings)
STORE = web.AppKey("store", ShardStore)
METRICS = web.AppKey("metrics", ShardMetrics)
REPLICATOR = web.AppKey("replicator", VectorReplicator)
BATCHER = web.AppKey("batcher", QueryBatcher)

MSGPACK = "application/msgpack"


async def create_app(settings: ShardSettings) -> web.Application:
    app = base_app("shard")
    limit_compute_threads(settings.compute_threads)
    app[SETTINGS] = settings
    app[STORE] = settings.new_store()
    app[METRICS] = ShardMetrics(app[REGISTRY], settings.shard_id)
    app[BATCHER] = QueryBatcher(
        app[STORE].search, settings.search_batch_max, _observe_batch(app[METRICS])
    )
    app.cleanup_ctx.append(_replicator)
    app.router.add_post("/search", search)
    app.router.add_get("/stats", stats)
    app.router.add_get("/content", content)
    app.router.add_get("/products/{product_id}", product)
    return app


async def product(request: web.Request) -> web.Response:
    """One live product as this shard holds it (what its hits show): for the router's images
    and for operators checking a product against the log."""
    product_id = request.match_info["product_id"]
    found = request.app[STORE].product(product_id)
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
        body=msgpack.packb(request.app[STORE].live_versions()), content_type=MSGPACK
    )


async def stats(request: web.Request) -> web.Response:
    app = request.app
    replicator, store = app[REPLICATOR], app[STORE]
    sealed = store.sealed
    answer = ShardStats(
        shard_id=app[SETTINGS].shard_id,
        num_shards=app[SETTINGS].num_shards,
        vectors=len(store),
        ready=app[READINESS].ready,
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
    return web.json_response(answer.model_dump(mode="json"))


async def search(request: web.Request) -> web.Response:
    arrived = time.perf_counter()
    body = await request.read()
    query = SearchRequest.from_wire(body)
    app = request.app
    if not app[READINESS].ready:
        raise web.HTTPServiceUnavailable(text=f"shard not ready: {app[READINESS].reason}")
    _drop_if_expired(app, arrived, query.budget_ms)
    where = RowFilter(query.filters, query.price_min, query.price_max, query.in_stock)
    depth = max(query.k, query.facet_candidates)
    hits = await _ranked(app, query, where, depth)
    _drop_if_expired(app, arrived, query.budget_ms)
    store, v2 = app[STORE], query.schema_version >= 2
    facets = [count_facets(fields[: query.facet_candidates], query.facets)
              for fields in hits.fields] if query.facets else []
    top = hits.head(query.k)
    vectors: list[list[bytes]] = []
    if v2 and query.with_vectors:  # the dense scan gathered them; fused hits are looked up
        vectors = top.vectors if top.vectors is not None else \
            [store.vectors_of(ids) for ids in top.ids]
    answer = SearchResponse(  # in the version asked: a router of the release before reads v1
        schema_version=query.schema_version,
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


async def _ranked(app: web.Application, query: SearchRequest, where: RowFilter, depth: int) -> Hits:
    """The best `depth` products per query in the query's mode; filters inside every scan."""
    store = app[STORE]
    filters = where or None
    if query.facets:
        store.attributes.check_fields(query.facets, "facet")
    if query.mode == "dense":
        return await app[BATCHER].search(query.query_matrix(), depth, filters,
                                         query.with_vectors and query.schema_version >= 2)
    if query.mode == "lexical":
        return store.lexical_search(query.texts, depth, filters)
    settings = app[SETTINGS]
    candidates = max(depth, settings.hybrid_candidates)
    dense = await app[BATCHER].search(query.query_matrix(), candidates, filters)
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


async def _replicator(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap, settings.topics())
    config = consumer_config(
        settings.kafka_bootstrap,
        f"vitrine-shard-{settings.shard_id}",
        **{"enable.partition.eof": True},
    )
    consumer = AsyncConsumer(Consumer(config))
    replicator = VectorReplicator(
        settings, consumer, app[STORE], app[READINESS], app[METRICS]
    )
    app[REPLICATOR] = replicator
    async with background(app, replicator.run(), "replicator"):
        yield
    await replicator.snapshot()  # graceful shutdown: restart from here, not from the start
    await consumer.close()
