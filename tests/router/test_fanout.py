"""The fan-out over real HTTP: small aiohttp shard servers on loopback that speak the shard
protocol (msgpack SearchRequest in, SearchResponse out, scores by real numpy) with a
configurable delay or failure, and can be stopped. They test the router's replica logic
(deadline, breaker, hedging), not FAISS."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proto.search import SearchRequest, SearchResponse
from proto.vectors import ProductFields
from services.router.fanout import FanOutResult, fan_out
from services.router.metrics import RouterMetrics
from services.router.replicas import BreakerState, ReplicaPolicy, ReplicaSet

DIM = 16
SLACK_S = 0.25  # scheduling on a busy 2-core box; a deadline overrun would be seconds


@dataclass
class FakeShard:
    shard_id: int
    tag: int  # reported as `searched`, so a test can tell which replica answered
    delay_s: float = 0.0
    status: int = 200
    model_id: str | None = None  # set: answers from this model whatever was asked
    arrivals: list[float] = field(default_factory=list)
    url: str = ""
    runner: web.AppRunner | None = None

    async def search(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        query = SearchRequest.from_wire(await request.read())
        await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.Response(status=self.status, text="injected failure")
        vectors = np.random.default_rng(self.tag).standard_normal((50, DIM)).astype(np.float32)
        scores = query.query_matrix() @ vectors.T
        top = np.argsort(-scores, axis=1)[:, : query.k]
        ids = [[f"s{self.shard_id}-{i}" for i in row] for row in top]
        answer = SearchResponse(  # in the version asked, from the model asked (or another)
            schema_version=query.schema_version,
            model_id=self.model_id or query.model_id,
            shard_id=self.shard_id,
            ids=ids,
            scores=np.take_along_axis(scores, top, axis=1).tolist(),
            fields=[[ProductFields(title=pid).pack() for pid in row] for row in ids],
            searched=self.tag,
        )
        return web.Response(body=answer.to_wire(), content_type="application/msgpack")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/search", self.search)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


Start = Callable[..., Awaitable[FakeShard]]


@pytest.fixture
async def start_shard() -> AsyncIterator[Start]:
    started: list[FakeShard] = []

    async def start(shard_id: int, tag: int, **kwargs: object) -> FakeShard:
        shard = FakeShard(shard_id, tag, **kwargs)  # type: ignore[arg-type]
        await shard.start()
        started.append(shard)
        return shard

    yield start
    for shard in started:
        await shard.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


def policy(**overrides: float) -> ReplicaPolicy:
    base = {"failure_threshold": 3, "cooldown_s": 60.0, "hedge_min_s": 0.05,
            "hedge_max_s": 0.5, "hedge_default_s": 0.1}
    return ReplicaPolicy(**{**base, **overrides})  # type: ignore[arg-type]


def query(budget_s: float) -> SearchRequest:
    vector = np.random.default_rng(7).standard_normal((1, DIM)).astype(np.float32)
    return SearchRequest.build(vector, 5, budget_s * 1000, "test-request", model_id="m")


async def search(
    session: aiohttp.ClientSession, replicas: ReplicaSet, budget_s: float,
    metrics: RouterMetrics | None = None,
) -> tuple[FanOutResult, float]:
    started = time.monotonic()
    result = await fan_out(session, replicas, query(budget_s), started + budget_s, metrics)
    return result, time.monotonic() - started


def count(metrics: RouterMetrics, registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_a_replica_past_the_deadline_leaves_its_shard_missing_in_time(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    slow = await start_shard(0, tag=1, delay_s=3.0)
    fast = await start_shard(1, tag=2)
    replicas = ReplicaSet.from_urls([[slow.url], [fast.url]], policy())
    result, took = await search(session, replicas, budget_s=0.3)
    assert took < 0.3 + SLACK_S
    assert result.missing == {0: "deadline exceeded"}
    assert [r.shard_id for r in result.responses] == [1]
    assert len(result.responses[0].ids[0]) == 5
    assert replicas.groups[0].replicas[0].consecutive_failures == 1, "a timeout is a failure"


async def test_an_answer_from_another_models_index_is_never_merged(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    right = await start_shard(0, tag=1)
    wrong = await start_shard(1, tag=2, model_id="other")
    replicas = ReplicaSet.from_urls([[right.url], [wrong.url]], policy())
    result, _ = await search(session, replicas, budget_s=2.0)
    assert [r.shard_id for r in result.responses] == [0]
    assert result.responses[0].model_id == "m"
    assert result.missing == {1: "answered from model 'other', asked for 'm'"}


async def test_a_killed_replica_is_routed_around_then_its_breaker_opens(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    doomed = await start_shard(0, tag=1)
    survivor = await start_shard(0, tag=2)
    other = await start_shard(1, tag=3)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    replicas = ReplicaSet.from_urls(
        [[doomed.url, survivor.url], [other.url]], policy(hedge_default_s=0.5)
    )
    result, _ = await search(session, replicas, 2.0, metrics)
    assert not result.missing and doomed.arrivals, "it answered while it was up"
    await doomed.stop()

    for _ in range(10):
        result, _ = await search(session, replicas, 2.0, metrics)
        assert not result.missing, result.missing
        assert sorted(r.searched for r in result.responses) == [2, 3]
    dead = replicas.groups[0].replicas[0]
    assert dead.state(time.monotonic()) is BreakerState.OPEN
    # round robin offered it first on every other query until the third failure opened it
    assert dead.consecutive_failures == 3
    labels = {"shard": "0", "replica": "0"}
    assert count(metrics, registry, "vitrine_router_replica_requests_total",
                 outcome="error", **labels) == 3
    assert count(metrics, registry, "vitrine_router_breaker_open", **labels) == 1
    assert count(metrics, registry, "vitrine_router_hedges_total", shard="0") == 0


async def test_a_slow_primary_is_hedged_after_the_delay_and_the_first_answer_wins(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    primary = await start_shard(0, tag=1, delay_s=1.0)
    second = await start_shard(0, tag=2)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    replicas = ReplicaSet.from_urls([[primary.url, second.url]], policy(hedge_default_s=0.1))
    result, took = await search(session, replicas, 3.0, metrics)
    assert not result.missing
    assert [r.searched for r in result.responses] == [2], "the hedge answered first"
    assert took < 1.0, "nobody waited for the loser"
    assert len(primary.arrivals) == 1 and len(second.arrivals) == 1
    # the hedge leaves the router 0.1 s after the primary; the primary's own connect time
    # can only make the gap seen by the servers a hair shorter
    assert second.arrivals[0] - primary.arrivals[0] >= 0.1 - 0.01
    assert count(metrics, registry, "vitrine_router_hedges_total", shard="0") == 1
    loser = {"shard": "0", "replica": "0"}
    assert count(metrics, registry, "vitrine_router_replica_requests_total",
                 outcome="cancelled", **loser) == 1
    assert replicas.groups[0].replicas[0].consecutive_failures == 0, "losing is not failing"
    shard = {"shard": "0"}
    assert count(metrics, registry, "vitrine_router_shard_duration_seconds_count", **shard) == 1
    waited = count(metrics, registry, "vitrine_router_shard_duration_seconds_sum", **shard)
    assert 0.1 - 0.01 <= waited < 1.0  # the hedge's answer: after the delay, before the primary


async def test_a_fast_primary_gets_no_hedge(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    a = await start_shard(0, tag=1)
    b = await start_shard(0, tag=2)
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    replicas = ReplicaSet.from_urls([[a.url, b.url]], policy(hedge_default_s=0.1))
    for _ in range(6):
        result, _ = await search(session, replicas, 2.0, metrics)
        assert not result.missing
    await asyncio.sleep(0.2)  # past the hedge delay: nothing was left behind to fire late
    assert len(a.arrivals) + len(b.arrivals) == 6
    assert len(a.arrivals) == 3 and len(b.arrivals) == 3, "round robin between equals"
    assert count(metrics, registry, "vitrine_router_hedges_total", shard="0") == 0


async def test_a_failed_primary_moves_on_at_once_without_waiting_for_the_hedge_delay(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    broken = await start_shard(0, tag=1, status=503)
    healthy = await start_shard(0, tag=2)
    replicas = ReplicaSet.from_urls([[broken.url, healthy.url]], policy(hedge_default_s=0.5))
    result, took = await search(session, replicas, 3.0)
    assert [r.searched for r in result.responses] == [2]
    assert len(broken.arrivals) == 1 and len(healthy.arrivals) == 1
    assert healthy.arrivals[0] >= broken.arrivals[0]
    assert healthy.arrivals[0] - broken.arrivals[0] < 0.5, "retried before any hedge delay"
    assert replicas.groups[0].replicas[0].consecutive_failures == 1


async def test_all_replicas_failing_reports_the_last_error(
    session: aiohttp.ClientSession, start_shard: Start
) -> None:
    a = await start_shard(0, tag=1, status=500)
    b = await start_shard(0, tag=2, status=503)
    replicas = ReplicaSet.from_urls([[a.url, b.url]], policy())
    result, _ = await search(session, replicas, 2.0)
    assert not result.responses
    assert result.missing[0].startswith("HTTP 503")
    assert len(a.arrivals) == 1 and len(b.arrivals) == 1
