from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class EncoderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "vitrine_encoder_events_total", "Catalog events by outcome", ["outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "vitrine_encoder_dead_letters_total", "Dead-lettered events by stage", ["stage"],
            registry=registry,
        )
        self.delivery_failures = Counter(
            "vitrine_encoder_delivery_failures_total", "Batches rewound after a failed produce",
            registry=registry,
        )
        self.quarantined = Counter(
            "vitrine_encoder_quarantined_total",
            "Events dead-lettered after failing or crashing the encoder on every try",
            registry=registry,
        )
        self.isolation_retries = Counter(
            "vitrine_encoder_isolation_retries_total",
            "Batches retried event by event after a failure no single stage caught",
            registry=registry,
        )
        self.batch_size = Histogram(
            "vitrine_encoder_batch_size_events", "Events per consumed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=registry,
        )
        self.lag = Gauge(
            "vitrine_encoder_lag_messages",
            "Messages not yet consumed, per source topic (the events; a candidate's backfill "
            "source) and partition",
            ["topic", "partition"], registry=registry,
        )
        self.batch_seconds = Histogram(
            "vitrine_encoder_batch_duration_seconds", "Consume-to-commit time of a batch",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=registry,
        )
