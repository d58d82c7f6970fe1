"""The Redis metadata store against the stack's real redis-server."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from vitrine.metadata import MetadataStore, ProductMetadata
from vitrine.stack import LocalStack

pytestmark = pytest.mark.stack


def meta(pid: str, version: int, title: str) -> ProductMetadata:
    return ProductMetadata(pid, version, title, f"file:///{pid}.jpg", {"colour": "Red"})


async def test_writes_apply_only_when_newer(stack: LocalStack) -> None:
    client = aioredis.from_url(stack.redis_url)
    store = MetadataStore(client)
    pid = f"test-{uuid.uuid4().hex}"
    assert await store.upsert(meta(pid, 2, "new"))
    assert not await store.upsert(meta(pid, 1, "old"))  # a late replay loses
    assert not await store.upsert(meta(pid, 2, "same"))  # a duplicate changes nothing
    assert (await store.get_many([pid]))[pid].title == "new"
    assert await store.delete(pid, 3)
    assert not await store.upsert(meta(pid, 2, "resurrected"))
    assert await store.get_many([pid, "never-seen"]) == {}
    assert await store.upsert(meta(pid, 4, "back"))
    found = (await store.get_many([pid]))[pid]
    assert (found.title, found.version, found.attributes) == ("back", 4, {"colour": "Red"})
    await client.aclose()
