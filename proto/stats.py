"""What a shard's and the encoder's `GET /stats` answer (JSON), as typed values.

Read by the router's fleet checks, `vitrine up` (re-shard catch-up), `vitrine status` and the
CLI: one contract instead of keys read by name in four places. Readers ignore fields they do
not know, so a newer service can add some without breaking an older reader.
Covered by tests/proto/test_messages.py and every test that reads a shard's stats.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_READ_LENIENTLY = ConfigDict(extra="ignore", frozen=True)


class SegmentStats(BaseModel):
    model_config = _READ_LENIENTLY

    growing: int = Field(ge=0, description="Vectors in the exact growing buffer")
    sealed_rows: int = Field(ge=0)
    sealed_dead: int = Field(ge=0, description="Sealed rows an update or delete killed")
    sealed_kind: str | None = None
    sealing: bool = False


class ModelStats(BaseModel):
    """One served model's index on a shard."""

    model_config = _READ_LENIENTLY

    vectors: int = Field(ge=0, description="Live products this shard would return")
    ready: bool
    vectors_topic: str = ""
    partitions: list[int] = Field(description="The vector topic's partitions it owns")
    next_offsets: dict[int, int] = Field(default_factory=dict)
    lag: dict[int, int] = Field(default_factory=dict, description="Records behind, per partition")
    index_bytes: int = Field(default=0, ge=0)
    segments: SegmentStats | None = None
    restored_from: str | None = Field(default=None, description='"snapshot" or None (replay)')

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


class ShardStats(ModelStats):
    """At the top, the active model's index (all a reader of the release before knows), with
    `ready` the shard's own; every served model under `models`."""

    shard_id: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    active_model: str | None = None
    models: dict[str, ModelStats] = Field(default_factory=dict)
    total_index_bytes: int = Field(default=0, ge=0, description="All models' indexes")


class EncoderStats(BaseModel):
    model_config = _READ_LENIENTLY

    model_id: str
    events: dict[str, int] = Field(
        default_factory=dict, description="Events handled since start, by outcome"
    )
    lag: dict[int, int] = Field(default_factory=dict)
    vectors_topic: str = ""
    backfill_from: str | None = Field(default=None, description="a candidate's source topic")
    backfill_lag: dict[int, int] = Field(
        default_factory=dict, description="Source records not yet re-encoded, per partition"
    )

    @property
    def handled(self) -> int:
        return sum(self.events.values())
