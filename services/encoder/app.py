"""Encoder service: the Kafka loop as a background task of an aiohttp app that serves
/healthz, /readyz and /metrics, so it has the same lifecycle as every other role."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import structlog
from aiohttp import web
from confluent_kafka import Consumer, Producer

from proto.stats import EncoderStats
from services.encoder.attempts import AttemptLedger
from services.encoder.metrics import EncoderMetrics
from services.encoder.pipeline import EventTransform, TransformLimits
from services.encoder.settings import EncoderSettings
from services.encoder.worker import EncoderWorker
from vitrine.fetch import ImageFetcher, make_session
from vitrine.kafka import AsyncConsumer, consumer_config, ensure_topics, producer_config
from vitrine.model import DualEncoder, load_dual_encoder
from vitrine.service import READINESS, REGISTRY, background, base_app, limit_compute_threads

log = structlog.get_logger()

SETTINGS = web.AppKey("settings", EncoderSettings)
MODEL = web.AppKey("model", DualEncoder)
FETCHER = web.AppKey("fetcher", ImageFetcher)
WORKER = web.AppKey("worker", EncoderWorker)


async def create_app(settings: EncoderSettings) -> web.Application:
    app = base_app("encoder")
    app[SETTINGS] = settings
    app.cleanup_ctx.extend([_model, _http, _worker])
    app.router.add_get("/stats", stats)
    return app


async def stats(request: web.Request) -> web.Response:
    """Events handled since start, by outcome: for `vitrine` commands and operators."""
    worker = request.app[WORKER]
    settings = request.app[SETTINGS]
    answer = EncoderStats(
        model_id=request.app[MODEL].model_id, events=dict(worker.totals), lag=worker.lag.lags,
        vectors_topic=settings.vectors_topic, backfill_from=settings.backfill_from,
        backfill_lag=worker.backfill_lag.lags if worker.backfill_lag else {},
    )
    return web.json_response(answer.model_dump(mode="json"))


async def _model(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    app[MODEL] = await asyncio.to_thread(
        load_dual_encoder, settings.model_spec(), precision=settings.model_precision,
        preprocess_threads=settings.preprocess_threads, text_runtime=settings.text_runtime,
        compute_threads=settings.compute_threads,
    )
    limit_compute_threads(settings.compute_threads)
    await asyncio.to_thread(app[MODEL].warm_up)
    log.info("model loaded", model_id=app[MODEL].model_id, dim=app[MODEL].dim,
             device=str(app[MODEL].device), precision=app[MODEL].precision)
    yield
    app[MODEL].close()


async def _http(app: web.Application) -> AsyncIterator[None]:
    policy = app[SETTINGS].fetch_policy()
    session = make_session(policy)
    app[FETCHER] = ImageFetcher(policy, session)
    yield
    await session.close()


async def _worker(app: web.Application) -> AsyncIterator[None]:
    settings, model = app[SETTINGS], app[MODEL]
    # never let a client auto-create a topic with the broker's default partition count
    await asyncio.to_thread(ensure_topics, settings.kafka_bootstrap, settings.topics())
    consumer = AsyncConsumer(
        Consumer(consumer_config(settings.kafka_bootstrap, settings.group_id))
    )
    limit = {"message.max.bytes": settings.max_message_bytes}
    producer = Producer(producer_config(settings.kafka_bootstrap, **limit))
    limits = TransformLimits(
        max_pixels=settings.max_image_pixels,
        fetch_concurrency=settings.fetch_concurrency,
        max_record_bytes=settings.max_message_bytes,
        max_original_bytes=settings.dead_letter_max_bytes,
        vector_dtype=settings.vector_dtype,
        backfill_topic=settings.backfill_from,
    )
    transform = EventTransform(
        fetch=app[FETCHER].fetch,
        preprocess=model.preprocess_image,
        encode_products=model.encode_prepared_products,
        model_id=model.model_id,
        limits=limits,
    )
    worker = EncoderWorker(
        settings, consumer, producer, transform, EncoderMetrics(app[REGISTRY]),
        AttemptLedger(settings.attempts_file()),
    )
    app[WORKER] = worker
    app[READINESS].liveness_checks.append(worker.stalled)
    async with background(app, worker.run(), "encoder-loop"):
        app[READINESS].set_ready()
        yield
        app[READINESS].set_not_ready("stopping")
    await asyncio.to_thread(producer.flush, 10.0)
    await consumer.close()
