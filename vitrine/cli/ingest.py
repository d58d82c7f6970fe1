"""Publishing a catalog to `catalog.events`, as the catalog system would.

Every row of a catalog export (vitrine/catalog.py) becomes an upsert keyed by product_id,
partitioned like the Java client (murmur2) so other publishers agree with us.
"""

from __future__ import annotations

from collections.abc import Iterable

from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from proto.catalog import CatalogEvent
from vitrine.errors import VitrineError
from vitrine.kafka import partition_for, producer_config


class EventPublisher:
    """Produces events and raises if any was not acknowledged by the broker."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self._producer = Producer(producer_config(bootstrap))
        self._topic = topic
        self._partitions = partitions
        self._errors: list[str] = []

    def publish(self, event: CatalogEvent) -> None:
        self.publish_raw(event.product_id.encode(), event.to_wire())

    def publish_raw(self, key: bytes | None, value: bytes) -> None:
        """Any bytes, e.g. a malformed event in a test: the pipeline must dead-letter it."""
        partition = partition_for(key.decode(errors="replace"), self._partitions) if key else 0
        self._producer.produce(
            self._topic, key=key, value=value, partition=partition, on_delivery=self._delivered
        )
        self._producer.poll(0)

    def flush(self, timeout_s: float = 60.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining or self._errors:
            raise VitrineError(f"{remaining} events unacknowledged; errors: {self._errors[:3]}")

    def _delivered(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._errors.append(str(err))


def publish_all(
    publisher: EventPublisher, events: Iterable[CatalogEvent], total: int | None = None
) -> int:
    count = 0
    for event in tqdm(events, total=total, unit="event", desc="publishing"):
        publisher.publish(event)
        count += 1
    publisher.flush()
    return count
