from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ShardMetrics:
    def __init__(self, registry: CollectorRegistry, shard_id: int) -> None:
        self.vectors = Gauge(
            "vitrine_shard_vectors", "Live vectors held by this shard, per model", ["model"],
            registry=registry
        )
        self.records = Counter(
            "vitrine_shard_records_total", "Vector records consumed, per model and outcome",
            ["model", "outcome"],
            registry=registry,
        )
        self.index_bytes = Gauge(
            "vitrine_shard_index_bytes", "Memory held by each model's vector index", ["model"],
            registry=registry
        )
        self.lag = Gauge(
            "vitrine_shard_lag_messages", "Vector records not yet applied, per owned partition",
            ["model", "partition"], registry=registry,
        )
        self.freshness_seconds = Histogram(
            "vitrine_shard_freshness_seconds",
            "From the catalog event's publication to its vector being searchable here",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=registry,
        )
        self.search_seconds = Histogram(
            "vitrine_shard_search_duration_seconds",
            "Index search time per call (concurrent requests share a call)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )
        self.expired = Counter(
            "vitrine_shard_expired_requests_total", "Requests dropped past their deadline",
            registry=registry,
        )
        self.seals = Counter(
            "vitrine_shard_seals_total", "Growing-buffer merges into the sealed segment",
            ["outcome"], registry=registry,
        )
        self.seal_seconds = Histogram(
            "vitrine_shard_seal_duration_seconds", "Freeze, background build and swap of a seal",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.segment_rows = Gauge(
            "vitrine_shard_segment_rows", "Rows per segment (sealed rows include dead ones)",
            ["model", "segment"], registry=registry,
        )
        self.batch_queries = Histogram(
            "vitrine_shard_search_batch_queries", "Queries per index call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry,
        )
