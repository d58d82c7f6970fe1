"""Replica health for the router: latency window, circuit breaker, choice and hedge delay.

Pure logic over an injectable clock, no network: `services/router/fanout.py` asks a
`ReplicaGroup` which replica to try and how long to wait before hedging, then reports each
attempt's outcome back. Covered by `tests/router/test_replicas.py`.

Breaker: closed -> open after `failure_threshold` consecutive failures (errors, non-200,
timeouts) -> half-open once `cooldown_s` has passed, letting one trial request through ->
closed on its success, open again on its failure.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(frozen=True)
class ReplicaPolicy:
    failure_threshold: int = 3
    cooldown_s: float = 2.0
    hedge_min_s: float = 0.002
    hedge_max_s: float = 0.05
    hedge_default_s: float = 0.015  # until a replica has `min_samples` latencies
    min_samples: int = 10
    window: int = 128  # latencies kept per replica for its p95


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    OK = "ok"
    ERROR = "error"  # connection refused/reset, non-200, unreadable answer
    TIMEOUT = "timeout"  # still running when the deadline came
    CANCELLED = "cancelled"  # lost a hedge race: says nothing about the replica's health


@dataclass(eq=False)
class Replica:
    """One replica of one shard and what the router has seen of it."""

    shard: int
    index: int
    url: str
    policy: ReplicaPolicy
    latencies: deque[float] = field(init=False)
    consecutive_failures: int = 0
    opened_at: float | None = None  # breaker opened (or re-opened) at
    last_failure_at: float = -math.inf
    in_flight: int = 0
    trial_in_flight: bool = False

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.policy.window)

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now - self.opened_at >= self.policy.cooldown_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def allows(self, now: float) -> bool:
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            return not self.trial_in_flight
        return state is BreakerState.CLOSED

    def p95(self) -> float | None:
        if len(self.latencies) < self.policy.min_samples:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    def started(self, now: float) -> None:
        self.in_flight += 1
        if self.state(now) is not BreakerState.CLOSED:
            self.trial_in_flight = True  # half-open trial, or a last-resort try of an open one

    def finished(self, outcome: Outcome, latency_s: float, now: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        was_trial, self.trial_in_flight = self.trial_in_flight, False
        if outcome is Outcome.OK:
            self.latencies.append(latency_s)
            self.consecutive_failures = 0
            self.opened_at = None
        elif outcome is not Outcome.CANCELLED:
            self.consecutive_failures += 1
            self.last_failure_at = now
            if was_trial or self.consecutive_failures >= self.policy.failure_threshold:
                self.opened_at = now


class ReplicaGroup:
    """The replicas of one shard: which to try next, and when to hedge."""

    def __init__(self, shard: int, replicas: Sequence[Replica], clock: Clock) -> None:
        if not replicas:
            raise ValueError(f"shard {shard} has no replica")
        self.shard = shard
        self.replicas = list(replicas)
        self.clock = clock
        self._turn = itertools.count()

    def choose(self, exclude: Iterable[Replica] = (), fallback: bool = True) -> Replica | None:
        """The least loaded replica whose breaker lets traffic through (round robin among
        equals); with none, and `fallback`, the one that failed longest ago."""
        now = self.clock()
        excluded = set(exclude)
        left = [r for r in self.replicas if r not in excluded]
        allowed = [r for r in left if r.allows(now)]
        if allowed:
            start = next(self._turn) % len(self.replicas)
            return min(allowed, key=lambda r: (r.in_flight, (r.index - start) % len(self.replicas)))
        if fallback and left:
            return min(left, key=lambda r: (r.last_failure_at, r.index))
        return None

    def hedge_delay(self, replica: Replica) -> float:
        """Wait this long for `replica` before asking another: its observed p95, clamped."""
        policy = replica.policy
        p95 = replica.p95()
        if p95 is None:
            return policy.hedge_default_s
        return min(policy.hedge_max_s, max(policy.hedge_min_s, p95))


@dataclass
class ReplicaSet:
    """Every shard's replica group, in shard order."""

    groups: list[ReplicaGroup]

    @classmethod
    def from_urls(
        cls, shards: Sequence[Sequence[str]], policy: ReplicaPolicy, clock: Clock = time.monotonic
    ) -> ReplicaSet:
        return cls([
            ReplicaGroup(s, [Replica(s, i, url, policy) for i, url in enumerate(urls)], clock)
            for s, urls in enumerate(shards)
        ])
