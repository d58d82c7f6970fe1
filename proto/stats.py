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


class ShardStats(BaseModel):
    model_config = _READ_LENIENTLY

    shard_id: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    vectors: int = Field(ge=0, description="Live products this shard would return")
    ready: bool
    partitions: list[int] = Field(description="The catalog.vectors partitions it owns")
    next_offsets: dict[int, int] = Field(default_factory=dict)
    lag: dict[int, int] = Field(default_factory=dict, description="Records behind, per partition")
    index_bytes: int = Field(default=0, ge=0)
    segments: SegmentStats | None = None
    restored_from: str | None = Field(default=None, description='"snapshot" or None (replay)')

    @property
    def total_lag(self) -> int:
        return sum(self.lag.values())


class EncoderStats(BaseModel):
    model_config = _READ_LENIENTLY

    model_id: str
    events: dict[str, int] = Field(
        default_factory=dict, description="Events handled since start, by outcome"
    )
    lag: dict[int, int] = Field(default_factory=dict)

    @property
    def handled(self) -> int:
        return sum(self.events.values())
