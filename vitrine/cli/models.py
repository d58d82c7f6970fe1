"""`vitrine model ...`: a candidate model beside the active one, backfilled, promoted, rolled
back and retired, on the local stack or on a cluster.

The registry (`vitrine.registry`) holds every decision and the services follow it: shards
build an index per served model, routers load each model, and one encoder per model runs (a
candidate's re-encodes the active model's compacted vector log, which carries every live
product's fields, while it follows the live events). A promotion is refused until the
candidate covers the catalog on every shard of the current fleet.

Where the encoders run differs: `vitrine up` starts and stops them itself (`ModelRollout`,
behind its control server); on Kubernetes they are Deployments an SRE applies from the env
`vitrine model add --cluster` prints, and a backfill's progress is read from the candidate's
consumer group (its encoders are many and elastic) instead of one encoder's /stats.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from proto.models import ModelEntry, ModelRegistry
from proto.stats import EncoderStats, ShardStats
from vitrine.cli.stack import LocalStack, Progress
from vitrine.cli.status import probe
from vitrine.errors import VitrineError
from vitrine.kafka import committed_lag
from vitrine.registry import (
    IndexCoverage,
    candidate_entry,
    change_registry,
    encoder_env,
    encoder_group,
    read_registry,
)
from vitrine.settings import CommonSettings

log = structlog.get_logger()
S = TypeVar("S", ShardStats, EncoderStats)
ROUTER_CONFIRMATIONS = 5  # consecutive answers with the new model (behind a Service: many pods)


@dataclass(frozen=True)
class ServingTarget:
    """Where the served models run: the broker (and the registry on it), the current fleet's
    shards, a router, and each model's encoder where there is exactly one (the local stack;
    None on a cluster)."""

    kafka: CommonSettings
    shard_urls: list[str]
    router_url: str
    encoder_urls: Mapping[str, str] | None = None

    @classmethod
    def of_stack(cls, stack: LocalStack) -> ServingTarget:
        return cls(stack.kafka_settings(), stack.shard_urls, stack.router_url,
                   dict(stack.model_encoders))

    @classmethod
    def of_run_file(cls, found: Mapping[str, Any], kafka: CommonSettings) -> ServingTarget:
        """A running `vitrine up`, from its run file (`kafka`: settings with its broker)."""
        return cls(kafka, list(found["shard_urls"]), str(found["router_url"]),
                   dict(found.get("model_encoders", {})))


class PromotionRefused(VitrineError):
    http_status = 409


@dataclass(frozen=True)
class ModelCoverage:
    """A served model's indexes over the current fleet, and its encoders' backfill."""

    index: IndexCoverage
    active: bool
    backfill_left: int | None  # source records its encoders have still to re-encode
    encoder_up: bool | None  # its encoder answered /stats (None: many encoders, not asked)
    encoded: int | None  # events and records its encoder has handled since it started

    @property
    def model_id(self) -> str:
        return self.index.model_id

    def problems(self) -> list[str]:
        """Why this model does not cover the catalog yet ([]: it does)."""
        found = self.index.problems()
        if self.encoder_up is False:
            found.append("its encoder does not answer")
        if self.backfill_left:
            found.append(f"its backfill has {self.backfill_left:,} records to go")
        return found


def coverage(registry: ModelRegistry, target: ServingTarget) -> list[ModelCoverage]:
    """Every served model's coverage, from the shards' /stats, and from each model's encoder
    (the local stack) or its consumer group's committed offsets (a cluster)."""
    shards = [_stats(f"{url}/stats", ShardStats) for url in target.shard_urls]
    found = []
    for entry in registry.models:
        index = IndexCoverage.of(shards, entry.model_id, registry.active)
        active = entry.model_id == registry.active
        if target.encoder_urls is None:
            found.append(ModelCoverage(index, active, _group_backfill_left(target, entry),
                                       encoder_up=None, encoded=None))
            continue
        url = target.encoder_urls.get(entry.model_id)
        encoder = _stats(f"{url}/stats", EncoderStats) if url else None
        found.append(ModelCoverage(
            index, active,
            backfill_left=sum(encoder.backfill_lag.values())
            if encoder is not None and entry.backfill_from else None,
            encoder_up=encoder is not None,
            encoded=encoder.handled if encoder is not None else 0,
        ))
    return found


def _group_backfill_left(target: ServingTarget, entry: ModelEntry) -> int | None:
    if not entry.backfill_from:
        return None
    group = encoder_group(entry.vectors_topic, target.kafka.vectors_topic)
    return sum(committed_lag(target.kafka.kafka_bootstrap, group, entry.backfill_from).values())


def model_env(entry: ModelEntry, kafka: CommonSettings) -> str:
    """The settings that make an encoder encode `entry`'s model (a `model.env` for the
    Kubernetes manifests, deploy/k8s/components/model-encoder), beside the shared ones."""
    lines = [f"# vitrine model {entry.model_id}: its encoder's settings (beside vitrine.env)"]
    lines += [f"{key}={value}" for key, value in encoder_env(entry, kafka.vectors_topic).items()]
    return "\n".join(lines) + "\n"


def add_candidate(kafka: CommonSettings, architecture: str | None, weights: str | None,
                  seed: int, text_runtime: str) -> ModelEntry:
    """Serve a candidate beside the active model: one registry write; its encoders are the
    caller's to start (the local stack's child, or a Deployment from `model_env`)."""
    entry = candidate_entry(kafka, read_registry(kafka), architecture or kafka.model_arch,
                            weights, seed, text_runtime)
    change_registry(kafka, lambda registry: registry.with_candidate(entry))
    return entry


def retire(kafka: CommonSettings, model_id: str) -> None:
    change_registry(kafka, lambda registry: registry.retired(model_id))


def promote(target: ServingTarget, model_id: str, progress: Progress) -> None:
    """Make `model_id` the active model, refused unless it covers the catalog; returns once
    the router answers with it."""
    registry = read_registry(target.kafka)
    registry.entry(model_id)  # refused if not served
    found = {c.model_id: c for c in coverage(registry, target)}
    problems = found[model_id].problems() if model_id in found else ["not served"]
    if problems:
        raise PromotionRefused(f"{model_id} does not cover the catalog yet: "
                               + "; ".join(problems))
    change_registry(target.kafka, lambda r: r.promoted(model_id))
    progress(f"{model_id} is the active model; {registry.active} stays served "
             "(`vitrine model rollback` switches back)")
    wait_routers_on(target.router_url, model_id, progress)


def rollback(target: ServingTarget, progress: Progress) -> None:
    after = change_registry(target.kafka, lambda r: r.rolled_back())
    progress(f"rolled back: {after.active} is the active model again")
    wait_routers_on(target.router_url, after.active, progress)


def wait_routers_on(router_url: str, model_id: str, progress: Progress,
                    timeout_s: float = 60) -> None:
    """Until the router answers queries that name no model with `model_id`, several times in
    a row: behind a Service each answer may come from another router pod."""
    deadline = time.monotonic() + timeout_s
    agreed = 0
    while time.monotonic() < deadline:
        status, answer = probe(f"{router_url}/search?q=registry+check&k=1")
        agreed = agreed + 1 if status == 200 and answer.get("model_id") == model_id else 0
        if agreed >= ROUTER_CONFIRMATIONS:
            progress(f"the router answers with {model_id}")
            return
        if not agreed:
            time.sleep(0.2)
    raise VitrineError(f"the router did not switch to {model_id} within {timeout_s:g} s")


class ModelRollout:
    """The roll-forward steps, run by `vitrine up` (its control server) on its own stack."""

    def __init__(self, stack: LocalStack) -> None:
        self._stack = stack

    def add(self, architecture: str | None, weights: str | None, seed: int,
            text_runtime: str, progress: Progress) -> ModelEntry:
        entry = add_candidate(self._stack.kafka_settings(), architecture, weights, seed,
                              text_runtime)
        progress(f"added {entry.model_id} (vectors on {entry.vectors_topic}); "
                 f"starting its encoder")
        name = self._stack.plan_encoder(entry)
        self._stack.start_child(name)
        self._stack.write_run_file()
        progress(f"{name} is backfilling from {entry.backfill_from} and following new events")
        return entry

    def promote(self, model_id: str, progress: Progress) -> None:
        promote(ServingTarget.of_stack(self._stack), model_id, progress)

    def rollback(self, progress: Progress) -> None:
        rollback(ServingTarget.of_stack(self._stack), progress)

    def retire(self, model_id: str, progress: Progress) -> None:
        retire(self._stack.kafka_settings(), model_id)
        name = self._stack.forget_encoder(model_id)
        if name is not None:
            self._stack.remove_child(name)
            self._stack.write_run_file()
        progress(f"retired {model_id}: its encoder stopped, the shards drop its index")


def _stats(url: str, contract: type[S]) -> S | None:
    status, answer = probe(url)
    return contract.model_validate(answer) if status == 200 else None
