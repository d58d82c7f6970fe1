"""Product metadata in Redis: written by the encoder, read by the router to hydrate hits.

Writes are compare-and-set on the event version (a Lua script), so a replayed or reordered
event never overwrites newer data, and a delete leaves a tombstone that older upserts lose to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import redis.asyncio as aioredis

KEY_PREFIX = "vitrine:product:"
TOMBSTONE_TTL_S = 7 * 24 * 3600  # as long as catalog.events keeps a delete around

# KEYS[1] product key; ARGV: version, data ('' = tombstone), tombstone ttl
_APPLY_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'version')
if current and tonumber(current) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'data', ARGV[2])
if ARGV[2] == '' then redis.call('EXPIRE', KEYS[1], ARGV[3]) else redis.call('PERSIST', KEYS[1]) end
return 1
"""


@dataclass(frozen=True)
class ProductMetadata:
    product_id: str
    version: int
    title: str
    image_uri: str
    attributes: dict[str, str] = field(default_factory=dict)


class MetadataStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._apply = client.register_script(_APPLY_IF_NEWER)

    async def upsert(self, meta: ProductMetadata) -> bool:
        """Store unless a newer version (or a newer delete) is already there."""
        data = msgpack.packb(
            {"title": meta.title, "image_uri": meta.image_uri, "attributes": meta.attributes}
        )
        return await self._write(meta.product_id, meta.version, data)

    async def delete(self, product_id: str, version: int) -> bool:
        return await self._write(product_id, version, b"")

    async def _write(self, product_id: str, version: int, data: bytes) -> bool:
        applied = await self._apply(
            keys=[KEY_PREFIX + product_id], args=[version, data, TOMBSTONE_TTL_S]
        )
        return bool(applied)

    async def get_many(self, product_ids: list[str]) -> dict[str, ProductMetadata]:
        """Live products only: deleted and unknown ids are left out. One round trip."""
        if not product_ids:
            return {}
        pipe = self._redis.pipeline(transaction=False)
        for pid in product_ids:
            pipe.hmget(KEY_PREFIX + pid, "version", "data")
        rows = await pipe.execute()
        found: dict[str, ProductMetadata] = {}
        for pid, (version, data) in zip(product_ids, rows, strict=True):
            if version is None or not data:
                continue
            fields = msgpack.unpackb(data, raw=False)
            found[pid] = ProductMetadata(product_id=pid, version=int(version), **fields)
        return found
