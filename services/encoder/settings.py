from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from vitrine.settings import CommonSettings


class EncoderSettings(CommonSettings):
    encoder_port: int = Field(default=8090, ge=0, le=65535, description="health, metrics")
    group_id: str = "vitrine-encoder"
    backfill_from: str | None = Field(
        default=None, description="a candidate model's encoder: the vector topic of the model "
        "it follows, re-encoded from the products' fields beside the live events",
    )
    events_from_group: str | None = Field(
        default=None, description="a candidate model's encoder: where its group has committed "
        "nothing yet, catalog.events starts at this group's offsets (the followed model's "
        "encoders: what they encoded before is in the backfill), not at the start",
    )
    batch_size: int = Field(default=32, ge=1, le=1024)
    batch_timeout_ms: int = Field(default=200, ge=1, description="flush a partial batch after")
    fetch_concurrency: int = Field(default=16, ge=1)
    vector_dtype: Literal["f16", "f32"] = "f16"
    preprocess_threads: int | None = Field(
        default=None, ge=0, description="picture resize/normalise pool (unset: 8 on GPU, 0 on CPU)"
    )

    stall_timeout_s: float = Field(
        default=120.0, gt=0, description="a batch running longer fails /healthz (a hang)"
    )
    max_attempts: int = Field(
        default=3, ge=1, description="tries of an event that keeps killing the encoder, "
        "then it is quarantined to the dead-letter topic",
    )
    encoder_state_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "vitrine-encoder",
        description="where the attempt ledger outlives a crash (an emptyDir on Kubernetes)",
    )
    max_message_bytes: int = Field(
        default=1_000_000, ge=1024,
        description="the producer's message.max.bytes; larger vector records are dead-lettered",
    )
    dead_letter_max_bytes: int = Field(
        default=256 * 1024, ge=0,
        description="an event larger than this is dead-lettered as its first 4 KiB + SHA-256",
    )

    def attempts_file(self) -> Path:
        return self.encoder_state_dir / f"attempts-{self.group_id}.json"
