from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.5, 1.0)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.stage_seconds = Histogram(
            "vitrine_router_stage_duration_seconds", "Time per query stage",
            ["stage"], buckets=_STAGE_BUCKETS, registry=registry,
        )
        self.shard_seconds = Histogram(
            "vitrine_router_shard_duration_seconds",
            "From the fan-out to each shard's winning answer (hedges and retries included)",
            ["shard"], buckets=_STAGE_BUCKETS, registry=registry,
        )
        self.queries = Counter(
            "vitrine_router_queries_total",
            "Queries answered, by kind, completeness and the model that answered",
            ["kind", "complete", "model"], registry=registry,
        )
        self.shard_failures = Counter(
            "vitrine_router_shard_failures_total", "Shards missing from an answer",
            ["shard"], registry=registry,
        )
        self.encode_overruns = Counter(
            "vitrine_router_encode_overruns_total",
            "Queries whose encoding spent the whole budget (no shard was asked)",
            registry=registry,
        )
        # replicas (services/router/fanout.py): label `replica` is the index within its shard
        self.replica_requests = Counter(
            "vitrine_router_replica_requests_total",
            "Requests to shard replicas, by outcome (ok, error, timeout, cancelled)",
            ["shard", "replica", "outcome"], registry=registry,
        )
        self.hedges = Counter(
            "vitrine_router_hedges_total", "Hedged requests sent to a second replica",
            ["shard"], registry=registry,
        )
        self.breaker_open = Gauge(
            "vitrine_router_breaker_open",
            "1 while a replica's circuit breaker is open or half-open, else 0",
            ["shard", "replica"], registry=registry,
        )


class EncodingMetrics:
    """Query encoding: cache layers, text-tower passes and their batch sizes."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.cache = Counter(
            "vitrine_router_query_cache_total", "Text query vector lookups, by layer and result",
            ["layer", "result"], registry=registry,
        )
        self.cache_errors = Counter(
            "vitrine_router_query_cache_errors_total",
            "Redis query-cache calls that failed or timed out (the query went on without)",
            ["op"], registry=registry,
        )
        self.batch_size = Histogram(
            "vitrine_router_encode_batch_size", "Distinct texts per text-tower pass",
            buckets=_BATCH_BUCKETS, registry=registry,
        )
        self.tower_runs = Counter(
            "vitrine_router_text_tower_runs_total", "Forward passes of the text tower",
            registry=registry,
        )
        # the encode stage less this is the cache lookups and the hand-off to the tower's thread
        self.tower_seconds = Histogram(
            "vitrine_router_text_tower_duration_seconds",
            "One text-tower pass in its worker thread, tokenizing included",
            buckets=_STAGE_BUCKETS, registry=registry,
        )
