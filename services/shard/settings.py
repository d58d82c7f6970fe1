from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from vitrine.settings import CommonSettings


class ShardSettings(CommonSettings):
    shard_id: int = Field(default=0, ge=0)
    num_shards: int = Field(default=2, ge=1)
    shard_port: int = Field(default=8100, ge=0, le=65535)
    consume_batch: int = Field(default=500, ge=1)
    use_gpu: bool | None = Field(default=None, description="None: use a GPU when FAISS sees one")
    snapshot_dir: Path | None = Field(default=None, description="unset: no snapshots")
    snapshot_interval_s: float = Field(default=60.0, gt=0, description="while content changes")
    snapshot_keep: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _shard_in_range(self) -> ShardSettings:
        if self.shard_id >= self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} must be below num_shards {self.num_shards}")
        if self.num_shards > self.vector_partitions:
            raise ValueError(
                f"{self.num_shards} shards but only {self.vector_partitions} vector partitions: "
                "some shards would own nothing"
            )
        return self
