"""`vitrine model ...` on the local stack: a candidate model beside the active one, backfilled,
promoted, rolled back and retired, the steps the README's Kubernetes procedure does by hand.

The registry (`vitrine.registry`) holds every decision and the services follow it: shards
build an index per served model, routers load each model, and here one encoder per model
runs (a candidate's re-encodes the active model's compacted vector log, which carries every
live product's fields, while it follows the live events). A promotion is refused until the
candidate covers the catalog on every shard of the current fleet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TypeVar

import structlog

from proto.models import ModelEntry, ModelRegistry
from proto.stats import EncoderStats, ShardStats
from vitrine.cli.stack import LocalStack, Progress
from vitrine.cli.status import probe
from vitrine.errors import VitrineError
from vitrine.registry import IndexCoverage, candidate_entry, change_registry, read_registry

log = structlog.get_logger()
S = TypeVar("S", ShardStats, EncoderStats)


class PromotionRefused(VitrineError):
    http_status = 409


@dataclass(frozen=True)
class ModelCoverage:
    """A served model's indexes over the current fleet, and its encoder's backfill."""

    index: IndexCoverage
    active: bool
    backfill_left: int | None  # source records its encoder has still to re-encode
    encoder_up: bool  # its encoder answered /stats
    encoded: int  # events and records its encoder has handled since it started

    @property
    def model_id(self) -> str:
        return self.index.model_id

    def problems(self) -> list[str]:
        """Why this model does not cover the catalog yet ([]: it does)."""
        found = self.index.problems()
        if not self.encoder_up:
            found.append("its encoder does not answer")
        if self.backfill_left:
            found.append(f"its backfill has {self.backfill_left:,} records to go")
        return found


def coverage(
    registry: ModelRegistry, shard_urls: list[str], encoder_urls: dict[str, str]
) -> list[ModelCoverage]:
    """Every served model's coverage, read from the shards' and encoders' /stats."""
    shards = [_stats(f"{url}/stats", ShardStats) for url in shard_urls]
    found = []
    for entry in registry.models:
        url = encoder_urls.get(entry.model_id)
        encoder = _stats(f"{url}/stats", EncoderStats) if url else None
        found.append(ModelCoverage(
            index=IndexCoverage.of(shards, entry.model_id, registry.active),
            active=entry.model_id == registry.active,
            backfill_left=sum(encoder.backfill_lag.values())
            if encoder is not None and entry.backfill_from else None,
            encoder_up=encoder is not None,
            encoded=encoder.handled if encoder is not None else 0,
        ))
    return found


class ModelRollout:
    """The roll-forward steps, run by `vitrine up` (its control server) on its own stack."""

    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack

    def registry(self) -> ModelRegistry:
        return read_registry(self._stack.kafka_settings())

    def add(self, architecture: str | None, weights: str | None, seed: int,
            text_runtime: str, progress: Progress) -> ModelEntry:
        settings = self._stack.kafka_settings()
        entry = candidate_entry(settings, self.registry(), architecture or settings.model_arch,
                                weights, seed, text_runtime)
        change_registry(settings, lambda registry: registry.with_candidate(entry))
        progress(f"added {entry.model_id} (vectors on {entry.vectors_topic}); "
                 f"starting its encoder")
        name = self._stack.plan_encoder(entry)
        self._stack.start_child(name)
        self._stack.write_run_file()
        progress(f"{name} is backfilling from {entry.backfill_from} and following new events")
        return entry

    def promote(self, model_id: str, progress: Progress) -> None:
        registry = self.registry()
        registry.entry(model_id)  # refused if not served
        found = {c.model_id: c for c in self.coverage(registry)}
        problems = found[model_id].problems() if model_id in found else ["not served"]
        if problems:
            raise PromotionRefused(f"{model_id} does not cover the catalog yet: "
                                   + "; ".join(problems))
        change_registry(self._stack.kafka_settings(), lambda r: r.promoted(model_id))
        progress(f"{model_id} is the active model; {registry.active} stays served "
                 "(`vitrine model rollback` switches back)")
        self._wait_routers_on(model_id, progress)

    def rollback(self, progress: Progress) -> None:
        after = change_registry(self._stack.kafka_settings(), lambda r: r.rolled_back())
        progress(f"rolled back: {after.active} is the active model again")
        self._wait_routers_on(after.active, progress)

    def retire(self, model_id: str, progress: Progress) -> None:
        change_registry(self._stack.kafka_settings(), lambda r: r.retired(model_id))
        name = self._stack.forget_encoder(model_id)
        if name is not None:
            self._stack.remove_child(name)
            self._stack.write_run_file()
        progress(f"retired {model_id}: its encoder stopped, the shards drop its index")

    def coverage(self, registry: ModelRegistry | None = None) -> list[ModelCoverage]:
        stack = self._stack
        return coverage(registry or self.registry(), stack.shard_urls, stack.model_encoders)

    def _wait_routers_on(self, model_id: str, progress: Progress, timeout_s: float = 60) -> None:
        """Until the router answers a query that names no model with `model_id`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status, answer = probe(f"{self._stack.router_url}/search?q=registry+check&k=1")
            if status == 200 and answer.get("model_id") == model_id:
                progress(f"the router answers with {model_id}")
                return
            time.sleep(0.2)
        raise VitrineError(f"the router did not switch to {model_id} within {timeout_s:g} s")


def _stats(url: str, contract: type[S]) -> S | None:
    status, answer = probe(url)
    return contract.model_validate(answer) if status == 200 else None
