from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.5, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_seconds = Histogram(
            "vitrine_router_stage_duration_seconds", "Time per query stage",
            ["stage"], buckets=_STAGE_BUCKETS, registry=registry,
        )
        self.queries = Counter(
            "vitrine_router_queries_total", "Queries answered, by kind and completeness",
            ["kind", "complete"], registry=registry,
        )
        self.shard_failures = Counter(
            "vitrine_router_shard_failures_total", "Shards missing from an answer",
            ["shard"], registry=registry,
        )
