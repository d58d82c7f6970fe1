from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode

from vitrine.settings import CommonSettings


class RouterSettings(CommonSettings):
    router_port: int = Field(default=8080, ge=0, le=65535)
    shard_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8100", "http://127.0.0.1:8101"],
        description="one base URL per shard, in shard order (comma-separated in the env)",
    )
    deadline_ms: float = Field(default=80.0, gt=0, description="end-to-end budget of a query")
    max_k: int = Field(default=100, ge=1, le=1000)
    default_k: int = Field(default=10, ge=1)
    max_query_chars: int = Field(default=512, ge=1)

    @field_validator("shard_urls", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
        return value
