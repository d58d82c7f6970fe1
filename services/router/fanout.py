"""Fan a search out to every shard and keep only what arrives before the deadline.

Per shard, the request goes to one replica chosen by `services/router/replicas.py`; if it has
not answered within the hedge delay (its observed p95) a second replica gets the same request,
and a failed attempt moves on to the next replica at once. The first answer wins, the others
are cancelled, and every outcome goes back into the replicas' health. Covered by
`tests/router/test_fanout.py` (real HTTP servers) and `tests/router/test_replicas.py`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import structlog

from proto.search import SearchRequest, SearchResponse
from services.router.metrics import RouterMetrics
from services.router.replicas import (
    BreakerState,
    Outcome,
    Replica,
    ReplicaGroup,
    ReplicaSet,
)
from vitrine.errors import InvalidMessage
from vitrine.service import REQUEST_ID_HEADER

log = structlog.get_logger()


@dataclass
class FanOutResult:
    responses: list[SearchResponse] = field(default_factory=list)
    missing: dict[int, str] = field(default_factory=dict)  # shard id -> why


@dataclass(frozen=True)
class _Call:
    session: aiohttp.ClientSession
    queries: SearchRequest
    deadline: float
    metrics: RouterMetrics | None


async def fan_out(
    session: aiohttp.ClientSession,
    replicas: ReplicaSet,
    queries: SearchRequest,
    deadline: float,
    metrics: RouterMetrics | None = None,
) -> FanOutResult:
    """`deadline` is a time.monotonic() instant; nothing here waits past it."""
    call = _Call(session, queries, deadline, metrics)
    tasks = {
        asyncio.create_task(_Race(call, group).run()): group.shard for group in replicas.groups
    }
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    result = FanOutResult()
    for task in pending:
        task.cancel()
        result.missing[tasks[task]] = "deadline exceeded"
    # a cancelled race settles its attempts synchronously: this takes one turn of the loop
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        shard = tasks[task]
        exc = task.exception()
        if exc is not None:
            result.missing[shard] = _describe(exc)
        else:
            result.responses.append(task.result())
    if result.missing:
        log.info("partial answer", missing=result.missing)
    return result


class _Race:
    """One shard's request: a primary, at most one hedge, retries on failure; first wins."""

    def __init__(self, call: _Call, group: ReplicaGroup) -> None:
        self.call, self.group = call, group
        self.attempts: dict[asyncio.Task[SearchResponse], tuple[Replica, float]] = {}
        self.tried: list[Replica] = []
        self.hedged = False
        self.won = False
        self.began = time.monotonic()

    async def run(self) -> SearchResponse:
        try:
            return await self._race()
        finally:  # losers were cancelled; anything still out when the deadline came timed out
            for task in list(self.attempts):
                if task.done() and not task.cancelled():
                    task.exception()  # finished as the deadline came: seen, and settled below
                task.cancel()
                self._settle(task, Outcome.CANCELLED if self.won else Outcome.TIMEOUT)

    async def _race(self) -> SearchResponse:
        first = self.group.choose()
        assert first is not None  # a group is never empty and the first choice falls back
        self._launch(first)
        error: BaseException = TimeoutError("deadline exceeded")
        while self.attempts:
            now = time.monotonic()
            wake = min(self.call.deadline, self._hedge_at())
            done, _ = await asyncio.wait(
                self.attempts, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
            )
            if time.monotonic() >= self.call.deadline and not done:
                raise TimeoutError("deadline exceeded")
            if not done:
                self._hedge()
                continue
            for task in sorted(done, key=lambda t: t.exception() is not None):
                exc = task.exception()
                if exc is None:
                    self._settle(task, Outcome.OK)
                    self.won = True
                    if self.call.metrics is not None:
                        self.call.metrics.shard_seconds.labels(str(self.group.shard)).observe(
                            time.monotonic() - self.began
                        )
                    return task.result()
                error = exc
                self._settle(task, Outcome.TIMEOUT if isinstance(exc, TimeoutError)
                             else Outcome.ERROR)
            if not self.attempts and time.monotonic() < self.call.deadline:
                retry = self.group.choose(self.tried, fallback=True)
                if retry is not None:
                    self._launch(retry)
        raise error

    def _hedge_at(self) -> float:
        """When to send a hedge: the sole attempt's start plus its replica's hedge delay."""
        if self.hedged or len(self.attempts) != 1:
            return float("inf")
        replica, started = next(iter(self.attempts.values()))
        return started + self.group.hedge_delay(replica)

    def _hedge(self) -> None:
        self.hedged = True
        second = self.group.choose(self.tried, fallback=False)
        if second is None:
            return
        if self.call.metrics is not None:
            self.call.metrics.hedges.labels(str(self.group.shard)).inc()
        log.debug("hedging", shard=self.group.shard, replica=second.url)
        self._launch(second)

    def _launch(self, replica: Replica) -> None:
        replica.started(self.group.clock())
        self.tried.append(replica)
        task = asyncio.create_task(_ask(self.call, replica.url))
        self.attempts[task] = (replica, time.monotonic())

    def _settle(self, task: asyncio.Task[SearchResponse], outcome: Outcome) -> None:
        replica, started = self.attempts.pop(task)
        now = self.group.clock()
        replica.finished(outcome, time.monotonic() - started, now)
        metrics = self.call.metrics
        if metrics is not None:
            labels = (str(replica.shard), str(replica.index))
            metrics.replica_requests.labels(*labels, outcome.value).inc()
            opened = replica.state(now) is not BreakerState.CLOSED
            metrics.breaker_open.labels(*labels).set(int(opened))


async def _ask(call: _Call, url: str) -> SearchResponse:
    left_s = call.deadline - time.monotonic()
    # the budget left now, not when the fan-out began: a hedge gets what remains
    budget_ms = max(1.0, min(call.queries.budget_ms, left_s * 1000))
    body = call.queries.model_copy(update={"budget_ms": budget_ms}).to_wire()
    timeout = aiohttp.ClientTimeout(total=max(0.001, left_s))
    headers = {"Content-Type": "application/msgpack", REQUEST_ID_HEADER: call.queries.request_id}
    async with call.session.post(
        f"{url}/search", data=body, headers=headers, timeout=timeout
    ) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise ShardUnavailable(f"HTTP {resp.status}: {payload[:200].decode(errors='replace')}")
        answer = SearchResponse.from_wire(payload)
        if answer.model_id != call.queries.model_id:  # never merge another model's hits
            raise ShardUnavailable(f"answered from model {answer.model_id!r}, "
                                   f"asked for {call.queries.model_id!r}")
        return answer


class ShardUnavailable(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ShardUnavailable | InvalidMessage):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "deadline exceeded"
    return f"{type(exc).__name__}: {exc}"
