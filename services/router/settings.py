from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, GetCoreSchemaHandler, SecretStr, field_validator
from pydantic_core import core_schema
from pydantic_settings import NoDecode

from proto.search import Mode
from services.router.replicas import ReplicaPolicy
from vitrine.settings import CommonSettings


class ShardAddress(str):
    """One shard's replica URLs joined by `|` ("http://a0:8100|http://a1:8100"); a shard with
    one replica is exactly its URL, so single-URL settings read and compare as before."""

    @property
    def replicas(self) -> list[str]:
        return self.split("|")

    @classmethod
    def parse(cls, text: str) -> ShardAddress:
        urls = [url.strip().rstrip("/") for url in text.split("|") if url.strip()]
        if not urls:
            raise ValueError(f"no replica URL in shard address {text!r}")
        return cls("|".join(urls))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls.parse, core_schema.str_schema())


def split_shard_urls(value: Any) -> Any:
    """The env form of a shard list, 'a0|a1,b0', into one item per shard; lists pass."""
    if isinstance(value, str):
        return [url.strip() for url in value.split(",") if url.strip()]
    return value


class RouterSettings(CommonSettings):
    router_port: int = Field(default=8080, ge=0, le=65535)
    shard_urls: Annotated[list[ShardAddress], NoDecode] = Field(
        default_factory=lambda: [ShardAddress("http://127.0.0.1:8100"),
                                 ShardAddress("http://127.0.0.1:8101")],
        description="per shard, in shard order, its replica base URLs joined by '|'; shards "
        "comma-separated in the env: 'http://a0:8100|http://a1:8100,http://b0:8100'",
    )
    deadline_ms: float = Field(default=80.0, gt=0, description="end-to-end budget of a query")
    max_budget_ms: float = Field(
        default=2000.0, gt=0, description="the most a client may ask for with its own budget"
    )
    max_k: int = Field(default=100, ge=1, le=1000)
    default_k: int = Field(default=10, ge=1)
    max_query_chars: int = Field(default=512, ge=1)
    # replicas: circuit breaker and hedging (services/router/replicas.py)
    breaker_failures: int = Field(default=3, ge=1, description="consecutive failures to open")
    breaker_cooldown_ms: float = Field(default=2000.0, gt=0, description="open -> half-open")
    hedge_min_ms: float = Field(default=2.0, ge=0, description="floor of the hedge delay")
    hedge_max_ms: float = Field(default=50.0, ge=0, description="ceiling of the hedge delay")
    hedge_default_ms: float = Field(
        default=15.0, ge=0, description="hedge delay before a replica has a p95 of its own"
    )
    # retrieval (services/router/search.py)
    default_mode: Mode = Field(
        default="hybrid", description="text queries' retrieval when none is asked (measured)"
    )
    max_offset: int = Field(default=500, ge=0, le=900, description="deepest page start")
    facet_candidates: int = Field(
        default=200, ge=1, le=1000, description="best candidates per shard the facets count"
    )
    collapse: bool = Field(default=True, description="collapse duplicate pictures by default")
    collapse_cosine: float = Field(
        default=0.97, gt=0, le=1,
        description="products whose vectors are at least this close collapse as duplicates",
    )
    # query encoding (services/router/encoding.py): text-vector cache and micro-batching
    redis_url: str | None = Field(
        default=None,
        description="Redis for the query-vector cache the router replicas share; only a cache "
        "(losing it costs latency, never results); unset: in-process cache only",
    )
    query_cache_entries: int = Field(
        default=10_000, ge=0, description="in-process LRU of text query vectors (0: off)"
    )
    query_cache_ttl_s: int = Field(
        default=24 * 3600, ge=0, description="TTL of text query vectors in Redis (0: no Redis)"
    )
    query_cache_timeout_ms: float = Field(
        default=10.0, gt=0, description="a Redis cache call slower than this counts as a miss"
    )
    encode_batch_wait_ms: float = Field(
        default=0.0, ge=0,
        description="how long an idle text tower waits for more queries to share a pass (0: "
        "none; while it runs, queries queue for its next pass anyway)",
    )
    encode_batch_max: int = Field(default=32, ge=1, description="texts per text-tower pass")
    # models side by side (services/router/models.py)
    canary_share: float = Field(
        default=0.0, ge=0, le=1,
        description="share of queries naming no model sent to a candidate once its indexes "
        "cover the catalog (0: none)",
    )
    canary_check_s: float = Field(
        default=5.0, gt=0, description="how often the shards' coverage of candidates is read"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token of /admin/fleet (re-sharding); unset: 403"
    )

    @field_validator("shard_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return split_shard_urls(value)

    def shard_replicas(self) -> list[list[str]]:
        return [address.replicas for address in self.shard_urls]

    def replica_policy(self) -> ReplicaPolicy:
        return ReplicaPolicy(
            failure_threshold=self.breaker_failures,
            cooldown_s=self.breaker_cooldown_ms / 1000,
            hedge_min_s=self.hedge_min_ms / 1000,
            hedge_max_s=self.hedge_max_ms / 1000,
            hedge_default_s=self.hedge_default_ms / 1000,
        )
