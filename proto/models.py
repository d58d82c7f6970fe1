"""`ModelRegistry` on `catalog.models`: the models Vitrine serves side by side, and which one
answers a query that names none.

The whole registry is one record under one key (`REGISTRY_KEY`), so a promotion or a rollback
is a single write: no reader ever sees two active models, or none. The topic is compacted to
its last record; `revision` grows by one per change, so a reader that meets an older revision
(a replay, a duplicate) keeps what it has. An empty topic is the release before this one:
one model, the settings' own, on the settings' vector topic (`ModelRegistry.initial`).

Each model has its own vector topic: a compacted topic keeps one record per key, and the key
is the product, so two models in one topic would compact each other away. Changes are pure
functions here (`with_candidate`, `promoted`, `rolled_back`, `retired`) that refuse with the
reason; whether a candidate covers the catalog is the caller's to check (it needs the shards).
"""

from __future__ import annotations

import hashlib
import re
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from proto.codec import MAX_VERSION, STRICT, check_schema_version, pack, unpack, validated
from proto.errors import VitrineError

MODEL_REGISTRY_SCHEMA_VERSION: Literal[1] = 1
REGISTRY_KEY = b"registry"
TextRuntime = Literal["auto", "torch", "onnx", "onnx-int8"]
_TOPIC_UNSAFE = re.compile(r"[^a-zA-Z0-9._-]+")
MAX_TOPIC_CHARS = 200  # Kafka allows 249


class ModelChangeRefused(VitrineError):
    """A registry change that would leave Vitrine serving something it should not."""

    http_status = 409


class ModelEntry(BaseModel):
    """One served model: what loads it (an open_clip spec and the text runtime, which together
    give `model_id`) and the topic its product vectors live in."""

    model_config = STRICT

    model_id: str = Field(min_length=1, max_length=300)
    architecture: str = Field(min_length=1)
    weights: str | None = None
    seed: int = 0
    text_runtime: TextRuntime = "auto"
    vectors_topic: str = Field(min_length=1, max_length=MAX_TOPIC_CHARS,
                               pattern=r"^[a-zA-Z0-9._-]+$")
    added_ms: int = Field(default=0, ge=0)
    backfill_from: str | None = Field(
        default=None, max_length=MAX_TOPIC_CHARS,
        description="the vector topic its encoders re-encode the catalog from (a candidate's)",
    )


class ModelRegistry(BaseModel):
    model_config = STRICT

    schema_version: Literal[1] = MODEL_REGISTRY_SCHEMA_VERSION
    revision: int = Field(ge=0, le=MAX_VERSION)
    models: list[ModelEntry] = Field(min_length=1)
    active: str = Field(description="the model a query that names none is answered with")
    previous: str | None = Field(default=None, description="what `rolled_back` returns to")

    @model_validator(mode="after")
    def _consistent(self) -> ModelRegistry:
        ids = [m.model_id for m in self.models]
        topics = [m.vectors_topic for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError("a model is listed twice")
        if len(set(topics)) != len(topics):
            raise ValueError("two models share a vector topic")
        if self.active not in ids:
            raise ValueError(f"the active model {self.active!r} is not among the models")
        if self.previous is not None and self.previous not in ids:
            raise ValueError(f"the previous model {self.previous!r} is not among the models")
        return self

    @classmethod
    def initial(cls, entry: ModelEntry) -> ModelRegistry:
        """The registry of a stack that never changed models: revision 0, nothing written."""
        return cls(revision=0, models=[entry], active=entry.model_id)

    def entry(self, model_id: str) -> ModelEntry:
        for model in self.models:
            if model.model_id == model_id:
                return model
        raise ModelChangeRefused(f"no model {model_id!r} is served (served: {self.served()})")

    def served(self) -> str:
        return ", ".join(
            m.model_id + (" (active)" if m.model_id == self.active else "") for m in self.models
        )

    @property
    def active_entry(self) -> ModelEntry:
        return self.entry(self.active)

    @property
    def candidates(self) -> list[ModelEntry]:
        return [m for m in self.models if m.model_id != self.active]

    def with_candidate(self, entry: ModelEntry) -> ModelRegistry:
        if any(m.model_id == entry.model_id for m in self.models):
            raise ModelChangeRefused(f"model {entry.model_id!r} is already served")
        return self._next(models=[*self.models, entry])

    def promoted(self, model_id: str) -> ModelRegistry:
        self.entry(model_id)
        if model_id == self.active:
            raise ModelChangeRefused(f"model {model_id!r} is already the active model")
        return self._next(active=model_id, previous=self.active)

    def rolled_back(self) -> ModelRegistry:
        if self.previous is None:
            raise ModelChangeRefused("nothing to roll back to: no model was active before "
                                     f"{self.active!r} (or it was retired)")
        return self._next(active=self.previous, previous=self.active)

    def retired(self, model_id: str) -> ModelRegistry:
        self.entry(model_id)
        if model_id == self.active:
            raise ModelChangeRefused(f"model {model_id!r} is active: promote another first")
        return self._next(
            models=[m for m in self.models if m.model_id != model_id],
            previous=None if self.previous == model_id else self.previous,
        )

    def _next(self, **changes: object) -> ModelRegistry:
        return ModelRegistry.model_validate(
            {**self.model_dump(), **changes, "revision": self.revision + 1}
        )

    def to_wire(self) -> bytes:
        return pack(self.model_dump())

    @classmethod
    def from_wire(cls, data: bytes) -> ModelRegistry:
        payload = unpack(data)
        check_schema_version(payload, MODEL_REGISTRY_SCHEMA_VERSION, "ModelRegistry")
        return validated(cls, payload)


def candidate_topic(base: str, model_id: str) -> str:
    """A vector topic of its own for a model: readable, and unique by a digest of the id (a
    model id holds characters a topic name may not)."""
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    slug = _TOPIC_UNSAFE.sub("-", model_id).strip("-.")
    room = MAX_TOPIC_CHARS - len(base) - len(digest) - 2
    return f"{base}.{slug[:max(0, room)]}-{digest}"
