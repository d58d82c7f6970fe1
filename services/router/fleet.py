"""The router's shard fleet, switchable while it serves: re-sharding without a router restart.

A fleet is one generation of shards that together own every partition once. A `Fleet` holds
its shard addresses, their `ReplicaSet` (breakers, latencies) and the size each shard last
reported. A query takes `FleetSwitch.current` once and finishes on that fleet, so a switch
never splits one answer across two fleets, and queries already in flight finish on the old
fleet while new ones go to the new. `FleetSwitch.switch` checks the new fleet first: every
replica ready (`/readyz` 200: caught up on its partitions) and its `/stats` naming shard `s` of
`S` at position `s`, so that together they own every partition exactly once. Any doubt: 409 and
nothing changes.

`GET` / `PUT /admin/fleet` need `Authorization: Bearer <VITRINE_ADMIN_TOKEN>`; with no token
set they answer 403, since one call redirects all traffic. Covered by
`tests/router/test_fleet.py` (real HTTP servers) and `tests/e2e/test_reshard.py`.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import Gauge
from pydantic import BeforeValidator, TypeAdapter, ValidationError

from proto.stats import ShardStats
from services.router.replicas import ReplicaPolicy, ReplicaSet
from services.router.settings import ShardAddress, split_shard_urls
from vitrine.errors import InvalidMessage, VitrineError
from vitrine.service import REGISTRY, json_body

log = structlog.get_logger()

CHECK_TIMEOUT_S = 5.0  # per probe of a would-be fleet member
_ADDRESSES = TypeAdapter(Annotated[list[ShardAddress], BeforeValidator(split_shard_urls)])


class FleetNotReady(VitrineError):
    """The proposed fleet cannot serve every partition yet; the current one stays."""

    http_status = 409


class AdminForbidden(VitrineError):
    """No admin token configured, or the request did not carry it."""

    http_status = 403


@dataclass(frozen=True)
class Fleet:
    generation: int
    addresses: tuple[ShardAddress, ...]
    replicas: ReplicaSet
    sizes: dict[int, int] = field(default_factory=dict)  # vectors per shard, last reported
    since: float = field(default_factory=time.time)

    @classmethod
    def build(
        cls, generation: int, addresses: Sequence[ShardAddress], policy: ReplicaPolicy
    ) -> Fleet:
        replicas = ReplicaSet.from_urls([a.replicas for a in addresses], policy)
        return cls(generation, tuple(addresses), replicas)

    @property
    def num_shards(self) -> int:
        return len(self.addresses)

    def describe(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "num_shards": self.num_shards,
            "shard_urls": list(self.addresses),
            "shard_sizes": {str(s): n for s, n in sorted(self.sizes.items())},
            "since": self.since,
        }


def parse_addresses(value: Any) -> list[ShardAddress]:
    """The shard list as `VITRINE_SHARD_URLS` spells it ('a0|a1,b0'), or a JSON list of it."""
    try:
        addresses = _ADDRESSES.validate_python(value)
    except ValidationError as exc:
        raise InvalidMessage(f"shard_urls: {exc.errors()[0]['msg']}") from None
    if not addresses:
        raise InvalidMessage("shard_urls: a fleet needs at least one shard")
    return addresses


async def check_fleet(addresses: Sequence[ShardAddress]) -> list[str]:
    """Why this fleet cannot take the traffic yet: one line per replica in doubt, [] if none."""
    timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        found = await asyncio.gather(*(
            _check_replica(session, url, shard, len(addresses))
            for shard, address in enumerate(addresses)
            for url in address.replicas
        ))
    return [problem for problem in found if problem]


async def _check_replica(
    session: aiohttp.ClientSession, url: str, shard: int, count: int
) -> str | None:
    try:
        async with session.get(f"{url}/stats") as response:
            if response.status != 200:
                return f"{url}: /stats answered HTTP {response.status}"
            stats = ShardStats.model_validate(await response.json())
        async with session.get(f"{url}/readyz") as response:
            ready = response.status == 200
            reason = (await response.json(content_type=None) or {}).get("reason")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValidationError too
        return f"{url}: unreachable or not a shard ({type(exc).__name__})"
    if (stats.shard_id, stats.num_shards) != (shard, count):
        return (f"{url}: says shard {stats.shard_id} of {stats.num_shards}, "
                f"expected shard {shard} of {count}")
    if not ready:
        return f"{url}: not ready ({reason or 'catching up'})"
    return None


class FleetSwitch:
    """The current fleet, swapped whole: readers never lock, switches are one at a time."""

    def __init__(self, addresses: Sequence[ShardAddress], policy: ReplicaPolicy) -> None:
        self._policy = policy
        self._switching = asyncio.Lock()
        self.current = Fleet.build(1, addresses, policy)

    async def switch(self, addresses: Sequence[ShardAddress]) -> Fleet:
        async with self._switching:
            problems = await check_fleet(addresses)
            if problems:
                raise FleetNotReady("new fleet not ready, still on generation "
                                    f"{self.current.generation}: " + "; ".join(problems))
            old = self.current
            self.current = Fleet.build(old.generation + 1, addresses, self._policy)
            log.warning("fleet switched", generation=self.current.generation,
                        shards=self.current.num_shards, was_shards=old.num_shards)
            return self.current


FLEETS = web.AppKey("fleets", FleetSwitch)
ADMIN_TOKEN = web.AppKey("admin_token", str)
_GAUGES = web.AppKey("fleet_gauges", Gauge)


def add_fleet_routes(app: web.Application, fleet: FleetSwitch, admin_token: str | None) -> None:
    app[FLEETS] = fleet
    if admin_token:
        app[ADMIN_TOKEN] = admin_token
    app[_GAUGES] = Gauge("vitrine_router_fleet", "The shard fleet the router fans out to",
                         ["what"], registry=app[REGISTRY])
    _export(app)
    app.router.add_get("/admin/fleet", get_fleet)
    app.router.add_put("/admin/fleet", put_fleet)


async def get_fleet(request: web.Request) -> web.Response:
    _authorize(request)
    return web.json_response(request.app[FLEETS].current.describe())


async def put_fleet(request: web.Request) -> web.Response:
    """Body: {"shard_urls": "a0|a1,b0"} (or a list); 200 with the new view, or 409."""
    _authorize(request)
    body = await json_body(request)
    if set(body) != {"shard_urls"}:
        raise InvalidMessage('expected a JSON object {"shard_urls": ...} and nothing else')
    view = await request.app[FLEETS].switch(parse_addresses(body["shard_urls"]))
    _export(request.app)
    return web.json_response(view.describe())


def _authorize(request: web.Request) -> None:
    token = request.app.get(ADMIN_TOKEN)
    if token is None:
        raise AdminForbidden("admin API disabled: set VITRINE_ADMIN_TOKEN on the router")
    offered = request.headers.get("Authorization", "").removeprefix("Bearer ")
    # a header may hold any bytes (decoded with surrogateescape): compare bytes, never fail
    if not hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), token.encode()):
        raise AdminForbidden("admin API: missing or wrong bearer token")


def _export(app: web.Application) -> None:
    view = app[FLEETS].current
    app[_GAUGES].labels("generation").set(view.generation)
    app[_GAUGES].labels("shards").set(view.num_shards)
