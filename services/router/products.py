"""One product as the shard that owns it holds it: what `/images/{product_id}` serves.

A product lives on one shard (partition_for(id, P) % S, as the encoder partitions and the
shards own), so a lookup is one small request to a replica of that shard, the next replica if
it fails; the fleet view is taken once, so a re-shard never splits a lookup.
"""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from proto.vectors import ProductFields
from services.router.fleet import FleetSwitch
from services.router.replicas import Replica
from vitrine.errors import ProductNotFound, ShardsUnavailable
from vitrine.kafka import partition_for


class ProductLookup:
    def __init__(
        self, session: aiohttp.ClientSession, fleet: FleetSwitch, partitions: int, timeout_s: float
    ) -> None:
        self._session = session
        self._fleet = fleet
        self._partitions = partitions
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def get(self, product_id: str) -> ProductFields:
        view = self._fleet.current
        shard = partition_for(product_id, self._partitions) % view.num_shards
        group = view.replicas.groups[shard]
        tried: list[Replica] = []
        problems = []
        while (replica := group.choose(tried, fallback=True)) is not None:
            tried.append(replica)
            url = f"{replica.url}/products/{quote(product_id, safe='')}"
            try:
                async with self._session.get(url, timeout=self._timeout) as response:
                    if response.status == 404:
                        raise ProductNotFound(f"no product {product_id!r}")
                    if response.status == 200:
                        found = await response.json()
                        return ProductFields.model_validate(
                            {key: found[key] for key in ProductFields.model_fields}
                        )
                    problems.append(f"{replica.url}: HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError,
                    ValidationError) as exc:
                problems.append(f"{replica.url}: {type(exc).__name__}")
        raise ShardsUnavailable(
            f"shard {shard} (owner of {product_id!r}) did not answer: " + "; ".join(problems)
        )
