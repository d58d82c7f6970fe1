"""Settings every service shares; each service extends this in its own `settings.py`.

Nothing else in Vitrine reads the environment: a service builds its settings once at start
and passes them in, and tests build them with keyword overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from vitrine.fetch import FetchPolicy
from vitrine.kafka import TopicSpec, vitrine_topics

# Autocast of the towers; "auto" is fp16 on CUDA, fp32 on the CPU (vitrine.model).
Precision = Literal["auto", "fp32", "fp16", "bf16"]

if TYPE_CHECKING:  # the model module imports torch: keep it off the CLI's import path
    from vitrine.model import ModelSpec


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VITRINE_", extra="ignore")

    kafka_bootstrap: str = Field(
        default="127.0.0.1:9092", description="bootstrap.servers of the Kafka cluster"
    )
    events_topic: str = "catalog.events"
    vectors_topic: str = "catalog.vectors"
    dlq_topic: str = "catalog.events.dlq"
    models_topic: str = Field(
        default="catalog.models", description="the model registry: which models are served"
    )
    event_partitions: int = Field(default=4, ge=1)
    vector_partitions: int = Field(
        default=8, ge=1, description="P of catalog.vectors; caps how many shards can own data"
    )
    model_arch: str = Field(
        default="vitrine-minilm-efflite0-fused",
        description="open_clip architecture: built-in name, config JSON path or shipped config",
    )
    model_weights: str | None = Field(
        default="vitrine-fashion-v3.pt",
        description="pretrained tag, checkpoint path (a bare name: one in vitrine/model/weights/), "
        "'offline' or empty",
    )
    model_seed: int = 0
    text_runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        default="auto",
        description="the text tower's runtime: auto (onnx for fp32 on the CPU, else torch), "
        "torch, onnx (exact), onnx-int8 (lossy: its own model id); benchmarks/text_tower.py",
    )
    model_precision: Precision = Field(
        default="auto",
        description="towers' weights: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16",
    )
    filter_fields: list[str] = Field(
        default=["gender", "master_category", "sub_category", "article_type", "colour",
                 "usage", "season"],
        description="event attributes the shards index for filtered search (JSON list)",
    )
    # images: the encoder fetches product images, the router serves them and decodes queries
    image_file_root: Path | None = Field(
        default=None, description="file:// image_uris are read only below this directory"
    )
    allow_private_networks: bool = Field(
        default=False, description="allow http(s) images on loopback/private/link-local hosts"
    )
    max_image_bytes: int = Field(default=10 * 1024**2, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    compute_threads: int | None = Field(
        default=None, ge=1,
        description="FAISS/torch threads in this process (unset: all cores); processes that "
        "share cores must split them, or their thread pools fight (see README)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop", description="the services' event loop: uvloop (libuv) takes ~20% off "
        "each HTTP hop of a query against the standard library's loop (see README)",
    )
    log_level: str = "INFO"
    log_json: bool = True
    host: str = "127.0.0.1"

    def fetch_policy(self) -> FetchPolicy:
        return FetchPolicy(
            file_root=self.image_file_root,
            allow_private_networks=self.allow_private_networks,
            max_bytes=self.max_image_bytes,
            timeout_s=self.fetch_timeout_s,
        )

    def topics(self) -> list[TopicSpec]:
        return vitrine_topics(
            self.events_topic, self.vectors_topic, self.dlq_topic,
            self.event_partitions, self.vector_partitions, self.models_topic,
        )

    def model_spec(self) -> ModelSpec:
        from vitrine.model import ModelSpec

        return ModelSpec(
            architecture=self.model_arch,
            weights=self.model_weights or None,
            seed=self.model_seed,
        )
