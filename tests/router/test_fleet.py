"""Switching the router's shard fleet at runtime: the checks before the swap and the admin API,
over real HTTP against small aiohttp servers that answer /stats and /readyz like shards."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from proto.stats import ShardStats
from services.router.fleet import FleetNotReady, FleetSwitch, add_fleet_routes, parse_addresses
from services.router.replicas import ReplicaPolicy
from services.router.settings import ShardAddress
from vitrine.errors import InvalidMessage
from vitrine.service import base_app

TOKEN = "s3cret"


@dataclass
class FakeShard:
    shard_id: int
    num_shards: int
    ready: bool = True
    url: str = ""

    async def stats(self, request: web.Request) -> web.Response:
        stats = ShardStats(shard_id=self.shard_id, num_shards=self.num_shards, vectors=0,
                           ready=self.ready, partitions=[])
        return web.json_response(stats.model_dump(mode="json"))

    async def readyz(self, request: web.Request) -> web.Response:
        reason = None if self.ready else "replaying partition 2"
        return web.json_response({"ready": self.ready, "reason": reason},
                                 status=200 if self.ready else 503)


Serve = Callable[[web.Application], Awaitable[str]]
Start = Callable[..., Awaitable[FakeShard]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def start_shard(serve: Serve) -> Start:
    async def start(shard_id: int, num_shards: int, ready: bool = True) -> FakeShard:
        shard = FakeShard(shard_id, num_shards, ready)
        app = web.Application()
        app.router.add_get("/stats", shard.stats)
        app.router.add_get("/readyz", shard.readyz)
        shard.url = await serve(app)
        return shard

    return start


async def fleet_of(start_shard: Start, count: int, replicas: int = 1) -> list[ShardAddress]:
    addresses = []
    for s in range(count):
        urls = [(await start_shard(s, count)).url for _ in range(replicas)]
        addresses.append(ShardAddress("|".join(urls)))
    return addresses


async def test_a_ready_fleet_is_switched_to_and_old_views_stay_whole(start_shard: Start) -> None:
    fleet = FleetSwitch(await fleet_of(start_shard, 2), ReplicaPolicy())
    before = fleet.current
    before.sizes.update({0: 10, 1: 12})
    new = await fleet_of(start_shard, 3, replicas=2)
    view = await fleet.switch(new)
    assert fleet.current is view and view.generation == 2 and view.num_shards == 3
    assert [len(g.replicas) for g in view.replicas.groups] == [2, 2, 2]
    assert view.sizes == {}, "coverage sizes start afresh with the new fleet"
    # a query that took the old view before the switch finishes on it, untouched
    assert before.num_shards == 2 and before.sizes == {0: 10, 1: 12}


@pytest.mark.parametrize("fault", ["not_ready", "wrong_count", "wrong_order", "down"])
async def test_a_fleet_in_doubt_is_refused_and_nothing_changes(
    start_shard: Start, fault: str
) -> None:
    fleet = FleetSwitch(await fleet_of(start_shard, 2), ReplicaPolicy())
    new = await fleet_of(start_shard, 3)
    if fault == "not_ready":
        new[1] = ShardAddress(f"{new[1]}|{(await start_shard(1, 3, ready=False)).url}")
        expected = "not ready (replaying partition 2)"
    elif fault == "wrong_count":
        new[2] = ShardAddress((await start_shard(2, 4)).url)
        expected = "says shard 2 of 4, expected shard 2 of 3"
    elif fault == "wrong_order":
        new[0], new[1] = new[1], new[0]
        expected = "says shard 1 of 3, expected shard 0 of 3"
    else:
        new[2] = ShardAddress("http://127.0.0.1:9")  # discard port: nothing listens
        expected = "unreachable"
    with pytest.raises(FleetNotReady, match=re.escape(expected)):
        await fleet.switch(new)
    assert fleet.current.generation == 1 and fleet.current.num_shards == 2


def test_shard_lists_read_like_the_environment_setting() -> None:
    assert parse_addresses("http://a:1|http://a2:1/, http://b:2") == [
        "http://a:1|http://a2:1", "http://b:2"
    ]
    assert parse_addresses(["http://a:1", "http://b:2"]) == ["http://a:1", "http://b:2"]
    for bad in ("", [], 42, ["|"]):
        with pytest.raises(InvalidMessage):
            parse_addresses(bad)


async def admin_app(serve: Serve, start_shard: Start, token: str | None) -> str:
    app = base_app("router")
    add_fleet_routes(app, FleetSwitch(await fleet_of(start_shard, 2), ReplicaPolicy()), token)
    return await serve(app)


async def call(
    method: str, url: str, token: str | None = TOKEN, body: object = None
) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session, session.request(
        method, f"{url}/admin/fleet", json=body, headers=headers
    ) as response:
        return response.status, await response.json()


async def test_the_admin_api_switches_with_the_token_and_reports_the_fleet(
    serve: Serve, start_shard: Start
) -> None:
    router = await admin_app(serve, start_shard, TOKEN)
    status, shown = await call("GET", router)
    assert status == 200 and shown["generation"] == 1 and shown["num_shards"] == 2
    new = await fleet_of(start_shard, 3)
    status, shown = await call("PUT", router, body={"shard_urls": ",".join(new)})
    assert status == 200 and shown["generation"] == 2 and shown["shard_urls"] == new
    status, shown = await call("PUT", router, body={"shard_urls": new[:2]})
    assert status == 409 and "expected shard 0 of 2" in str(shown["error"])
    status, shown = await call("PUT", router, body={"shards": new})
    assert status == 400
    status, shown = await call("GET", router)
    assert shown["generation"] == 2


@pytest.mark.parametrize(("configured", "offered"), [(None, TOKEN), (TOKEN, None), (TOKEN, "x")])
async def test_the_admin_api_needs_a_configured_token(
    serve: Serve, start_shard: Start, configured: str | None, offered: str | None
) -> None:
    router = await admin_app(serve, start_shard, configured)
    for method in ("GET", "PUT"):
        status, answer = await call(method, router, offered, {"shard_urls": "http://a:1"})
        assert status == 403, answer
