from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ShardMetrics:
    def __init__(self, registry: CollectorRegistry, shard_id: int) -> None:
        self.vectors = Gauge(
            "vitrine_shard_vectors", "Live vectors held by this shard", registry=registry
        )
        self.records = Counter(
            "vitrine_shard_records_total", "Vector records consumed, by outcome", ["outcome"],
            registry=registry,
        )
        self.search_seconds = Histogram(
            "vitrine_shard_search_duration_seconds", "Index search time per request",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.expired = Counter(
            "vitrine_shard_expired_requests_total", "Requests dropped past their deadline",
            registry=registry,
        )
