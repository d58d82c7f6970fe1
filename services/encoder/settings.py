from __future__ import annotations

from typing import Literal

from pydantic import Field

from vitrine.settings import CommonSettings


class EncoderSettings(CommonSettings):
    encoder_port: int = Field(default=8090, ge=0, le=65535, description="health, metrics")
    group_id: str = "vitrine-encoder"
    batch_size: int = Field(default=32, ge=1, le=1024)
    batch_timeout_ms: int = Field(default=200, ge=1, description="flush a partial batch after")
    fetch_concurrency: int = Field(default=16, ge=1)
    vector_dtype: Literal["f16", "f32"] = "f16"
    preprocess_threads: int | None = Field(
        default=None, ge=0, description="picture resize/normalise pool (unset: 8 on GPU, 0 on CPU)"
    )

