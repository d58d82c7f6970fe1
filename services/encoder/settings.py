from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from vitrine.fetch import FetchPolicy
from vitrine.settings import CommonSettings


class EncoderSettings(CommonSettings):
    encoder_port: int = Field(default=8090, ge=0, le=65535, description="health, metrics")
    group_id: str = "vitrine-encoder"
    batch_size: int = Field(default=32, ge=1, le=1024)
    batch_timeout_ms: int = Field(default=200, ge=1, description="flush a partial batch after")
    fetch_concurrency: int = Field(default=16, ge=1)
    image_file_root: Path | None = Field(
        default=None, description="file:// image_uris are read only below this directory"
    )
    allow_private_networks: bool = Field(
        default=False, description="allow http(s) images on loopback/private/link-local hosts"
    )
    max_image_bytes: int = Field(default=10 * 1024**2, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    vector_dtype: Literal["f16", "f32"] = "f16"

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            file_root=self.image_file_root,
            allow_private_networks=self.allow_private_networks,
            max_bytes=self.max_image_bytes,
            timeout_s=self.fetch_timeout_s,
        )
