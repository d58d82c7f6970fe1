"""Fan a search out to every shard and keep only what arrives before the deadline."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import structlog

from proto.search import SearchRequest, SearchResponse
from vitrine.errors import InvalidMessage
from vitrine.service import REQUEST_ID_HEADER

log = structlog.get_logger()


@dataclass
class FanOutResult:
    responses: list[SearchResponse] = field(default_factory=list)
    missing: dict[int, str] = field(default_factory=dict)  # shard id -> why


async def fan_out(
    session: aiohttp.ClientSession,
    shard_urls: list[str],
    queries: SearchRequest,
    deadline: float,
) -> FanOutResult:
    """`deadline` is a time.monotonic() instant; nothing here waits past it."""
    body = queries.to_wire()
    tasks = {
        asyncio.create_task(_ask(session, url, body, deadline, queries.request_id)): shard
        for shard, url in enumerate(shard_urls)
    }
    done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    result = FanOutResult()
    for task in pending:
        task.cancel()
        result.missing[tasks[task]] = "deadline exceeded"
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


async def _ask(
    session: aiohttp.ClientSession, url: str, body: bytes, deadline: float, request_id: str
) -> SearchResponse:
    timeout = aiohttp.ClientTimeout(total=max(0.001, deadline - time.monotonic()))
    headers = {"Content-Type": "application/msgpack", REQUEST_ID_HEADER: request_id}
    async with session.post(f"{url}/search", data=body, headers=headers, timeout=timeout) as resp:
        payload = await resp.read()
        if resp.status != 200:
            raise ShardUnavailable(f"HTTP {resp.status}: {payload[:200].decode(errors='replace')}")
        return SearchResponse.from_wire(payload)


class ShardUnavailable(Exception):
    pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ShardUnavailable | InvalidMessage):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "deadline exceeded"
    return f"{type(exc).__name__}: {exc}"
