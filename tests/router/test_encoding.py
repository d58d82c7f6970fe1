"""services.router.encoding: the text-query cache (LRU + Redis) and the micro-batcher, with the
real model and a real redis-server; then the cache through the running router over HTTP.

Trimmed vs untrimmed text encodings are covered by
tests/vitrine/test_model.py::test_trimmed_padding_leaves_text_embedding_unchanged.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from services.router.encoding import QueryEncoder, cache_key
from services.router.metrics import EncodingMetrics
from services.router.settings import RouterSettings
from tests.helpers import scrape, search_text
from vitrine.cli.stack import LocalStack, free_port
from vitrine.model import DualEncoder, ModelSpec, load_dual_encoder

TEXTS = [
    "red leather ankle boots",
    "Turtle Check Men Navy Blue Shirt",
    "a",
    "Manchester United Men Solid Black Track Pants with white side stripes, regular fit",
    "white sneakers",
    "silver watch for women",
    "blue denim jacket",
    "floral summer dress",
]


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence."""

    def __init__(self, directory: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            pytest.fail("redis-server not found: run `make setup` (installs it)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process = subprocess.Popen(
            [
                server,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    self.stop()
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)


@pytest.fixture(scope="module")
def model() -> DualEncoder:
    return load_dual_encoder(ModelSpec("vitrine-minilm-efflite0", "offline"), device="cpu")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


def make_encoder(
    model: DualEncoder, client: aioredis.Redis | None, **overrides: Any
) -> tuple[QueryEncoder, CollectorRegistry]:
    registry = CollectorRegistry()
    settings = RouterSettings(**overrides)
    return QueryEncoder(model, client, settings, EncodingMetrics(registry)), registry


def tower_runs(registry: CollectorRegistry) -> float:
    runs = registry.get_sample_value("vitrine_router_text_tower_runs_total") or 0.0
    timed = registry.get_sample_value("vitrine_router_text_tower_duration_seconds_count") or 0.0
    assert timed == runs  # every pass is timed
    assert (registry.get_sample_value("vitrine_router_text_tower_duration_seconds_sum") or 0.0) \
        > 0 or runs == 0
    return runs


def cache_count(registry: CollectorRegistry, layer: str, result: str) -> float:
    labels = {"layer": layer, "result": result}
    return registry.get_sample_value("vitrine_router_query_cache_total", labels) or 0.0


def cache_errors(registry: CollectorRegistry, op: str) -> float:
    labels = {"op": op}
    return registry.get_sample_value("vitrine_router_query_cache_errors_total", labels) or 0.0


async def test_a_cached_query_does_not_run_the_tower(
    model: DualEncoder, redis_client: aioredis.Redis
) -> None:
    text = TEXTS[0]
    fresh = model.encode_texts([text])[0]
    first, registry = make_encoder(model, redis_client)
    encoded = await first.encode_text(text)
    await first.flush()
    assert tower_runs(registry) == 1
    assert cache_count(registry, "memory", "miss") == cache_count(registry, "redis", "miss") == 1

    again = await first.encode_text(text)
    assert tower_runs(registry) == 1
    assert cache_count(registry, "memory", "hit") == 1

    # another replica (fresh LRU) finds it in Redis
    second, other_registry = make_encoder(model, redis_client)
    shared = await second.encode_text(text)
    assert tower_runs(other_registry) == 0
    assert cache_count(other_registry, "redis", "hit") == 1
    for vector in (encoded, again, shared):
        assert vector.dtype == np.float32 and vector.shape == (model.dim,)
        np.testing.assert_allclose(vector, fresh, atol=1e-6)
    assert await redis_client.ttl(cache_key(model.model_id, text)) > 0
    await first.aclose()
    await second.aclose()


async def test_concurrent_queries_share_tower_passes_and_get_their_own_rows(
    model: DualEncoder, redis_client: aioredis.Redis
) -> None:
    encoder, registry = make_encoder(model, redis_client, encode_batch_wait_ms=50)
    queries = [*TEXTS, TEXTS[1]]  # a duplicate rides along in the same batch
    vectors = await asyncio.gather(*(encoder.encode_text(text) for text in queries))
    assert tower_runs(registry) < len(TEXTS)
    assert registry.get_sample_value("vitrine_router_encode_batch_size_sum") == len(TEXTS)
    for text, vector in zip(queries, vectors, strict=True):
        np.testing.assert_allclose(vector, model.encode_texts([text])[0], atol=1e-5)
    await encoder.aclose()


async def test_a_lone_query_waits_for_nothing_and_a_busy_tower_takes_the_queue_next(
    model: DualEncoder,
) -> None:
    """No wait setting: the first query runs at once; the ones arriving during its pass share
    the next pass (one each would be one pass per query)."""
    encoder, registry = make_encoder(model, None, encode_batch_wait_ms=0)
    first = asyncio.create_task(encoder.encode_text(TEXTS[0]))
    await asyncio.sleep(0)  # the first batch closes on this turn of the loop
    await asyncio.sleep(0)
    rest = [asyncio.create_task(encoder.encode_text(text)) for text in TEXTS[1:]]
    vectors = await asyncio.gather(first, *rest)
    assert tower_runs(registry) == 2
    np.testing.assert_allclose(np.stack(vectors), model.encode_texts(TEXTS), atol=1e-5)
    await encoder.aclose()


async def test_batches_stop_at_the_batch_max(model: DualEncoder) -> None:
    encoder, registry = make_encoder(model, None, encode_batch_wait_ms=50, encode_batch_max=3)
    vectors = await asyncio.gather(*(encoder.encode_text(text) for text in TEXTS))
    assert tower_runs(registry) == 3  # 3 + 3 + 2
    np.testing.assert_allclose(np.stack(vectors), model.encode_texts(TEXTS), atol=1e-5)
    await encoder.aclose()


async def test_the_memory_layer_is_bounded(model: DualEncoder) -> None:
    encoder, registry = make_encoder(model, None, query_cache_entries=2, encode_batch_wait_ms=0)
    for text in TEXTS[:3]:
        await encoder.encode_text(text)
    await encoder.encode_text(TEXTS[2])  # still held
    assert tower_runs(registry) == 3
    await encoder.encode_text(TEXTS[0])  # evicted, least recently used
    assert tower_runs(registry) == 4
    await encoder.aclose()


async def test_a_value_of_the_wrong_size_is_a_miss(
    model: DualEncoder, redis_client: aioredis.Redis
) -> None:
    text = TEXTS[4]
    await redis_client.set(cache_key(model.model_id, text), b"\x00" * 12)
    encoder, registry = make_encoder(model, redis_client)
    vector = await encoder.encode_text(text)
    assert cache_count(registry, "redis", "miss") == 1 and tower_runs(registry) == 1
    np.testing.assert_allclose(vector, model.encode_texts([text])[0], atol=1e-6)
    await encoder.aclose()


async def test_queries_are_answered_while_redis_is_down(model: DualEncoder, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    client = aioredis.from_url(server.url)
    try:
        encoder, registry = make_encoder(model, client)
        await encoder.encode_text(TEXTS[0])
        await encoder.flush()
        assert cache_errors(registry, "get") == cache_errors(registry, "set") == 0
        server.stop()
        vector = await encoder.encode_text(TEXTS[5])
        await encoder.flush()
        np.testing.assert_allclose(vector, model.encode_texts([TEXTS[5]])[0], atol=1e-6)
        assert cache_errors(registry, "get") == 1 and cache_errors(registry, "set") == 1
        assert tower_runs(registry) == 2
        await encoder.aclose()
    finally:
        server.stop()
        await client.aclose()


def test_keys_keep_case_because_the_tokenizer_cleans_before_lowercasing(
    model: DualEncoder,
) -> None:
    # MiniLM's tokenizer is uncased, yet html.unescape runs first and is case-sensitive
    upper, lower = model.encode_texts(["&NotEqual; shoes", "&notequal; shoes"])
    assert float(upper @ lower) < 0.99
    assert cache_key(model.model_id, "Red Boots") != cache_key(model.model_id, "red boots")


@pytest.mark.stack
def test_the_router_answers_a_repeated_query_from_the_cache(stack: LocalStack) -> None:
    text = f"red dress {uuid.uuid4().hex[:8]}"  # no other test has asked it
    search_text(stack.router_url, text, k=3)
    after_first = scrape(stack.router_url)
    search_text(stack.router_url, text, k=3)
    after_second = scrape(stack.router_url)
    runs = "vitrine_router_text_tower_runs_total"
    assert after_second[runs, ()] == after_first[runs, ()]
    hits = ("vitrine_router_query_cache_total", (("layer", "memory"), ("result", "hit")))
    assert after_second[hits] == after_first.get(hits, 0.0) + 1
