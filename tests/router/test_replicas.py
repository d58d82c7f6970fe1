"""Replica health without a network: breaker transitions, choice, hedge delay (fake clock)."""

from __future__ import annotations

from services.router.replicas import (
    BreakerState,
    Outcome,
    Replica,
    ReplicaGroup,
    ReplicaPolicy,
    ReplicaSet,
)

POLICY = ReplicaPolicy(
    failure_threshold=3, cooldown_s=10.0, hedge_min_s=0.002, hedge_max_s=0.05,
    hedge_default_s=0.015, min_samples=5, window=20,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def group(replicas: int = 2, policy: ReplicaPolicy = POLICY) -> tuple[ReplicaGroup, FakeClock]:
    clock = FakeClock()
    return ReplicaSet.from_urls([[f"http://r{i}" for i in range(replicas)]], policy, clock)\
        .groups[0], clock


def fail(replica: Replica, clock: FakeClock, times: int = 1) -> None:
    for _ in range(times):
        replica.started(clock())
        replica.finished(Outcome.ERROR, 0.001, clock())


def test_the_breaker_opens_after_n_consecutive_failures_only() -> None:
    g, clock = group()
    r = g.replicas[0]
    fail(r, clock, 2)
    r.started(clock())
    r.finished(Outcome.OK, 0.003, clock())  # a success resets the count
    fail(r, clock, 2)
    assert r.state(clock()) is BreakerState.CLOSED
    r.started(clock())
    r.finished(Outcome.TIMEOUT, 0.08, clock())  # timeouts count as failures
    assert r.state(clock()) is BreakerState.OPEN
    assert not r.allows(clock())


def test_a_lost_hedge_race_is_not_a_failure() -> None:
    g, clock = group()
    r = g.replicas[0]
    for _ in range(5):
        r.started(clock())
        r.finished(Outcome.CANCELLED, 0.01, clock())
    assert r.state(clock()) is BreakerState.CLOSED
    assert r.consecutive_failures == 0 and r.in_flight == 0


def test_half_open_lets_one_trial_through_then_closes_on_success() -> None:
    g, clock = group()
    r = g.replicas[0]
    fail(r, clock, 3)
    clock.now += 9.9
    assert r.state(clock()) is BreakerState.OPEN
    clock.now += 0.2
    assert r.state(clock()) is BreakerState.HALF_OPEN
    assert r.allows(clock())
    r.started(clock())
    assert not r.allows(clock()), "only one trial at a time"
    r.finished(Outcome.OK, 0.004, clock())
    assert r.state(clock()) is BreakerState.CLOSED and r.allows(clock())


def test_a_failed_trial_reopens_for_a_full_cool_down() -> None:
    g, clock = group()
    r = g.replicas[0]
    fail(r, clock, 3)
    clock.now += 10.0
    assert r.state(clock()) is BreakerState.HALF_OPEN
    fail(r, clock)
    assert r.state(clock()) is BreakerState.OPEN
    clock.now += 9.0
    assert r.state(clock()) is BreakerState.OPEN
    clock.now += 1.0
    assert r.state(clock()) is BreakerState.HALF_OPEN


def test_choice_skips_open_replicas() -> None:
    g, clock = group(3)
    fail(g.replicas[1], clock, 3)
    chosen = [g.choose() for _ in range(12)]
    assert g.replicas[1] not in chosen
    assert {r.index for r in chosen if r is not None} == {0, 2}


def test_choice_spreads_load_round_robin_and_by_in_flight() -> None:
    g, clock = group(2)
    picks = [g.choose() for _ in range(4)]
    assert [p.index for p in picks if p is not None] == [0, 1, 0, 1]
    g.replicas[0].started(clock())  # busy: the idle one wins whatever the turn
    assert all(g.choose() is g.replicas[1] for _ in range(4))


def test_choice_excludes_tried_replicas_and_hedges_never_fall_back() -> None:
    g, clock = group(2)
    first = g.replicas[0]
    assert g.choose(exclude=[first]) is g.replicas[1]
    fail(g.replicas[1], clock, 3)
    assert g.choose(exclude=[first], fallback=False) is None
    assert g.choose(exclude=g.replicas) is None


def test_all_open_still_tries_the_least_recently_failed() -> None:
    g, clock = group(3)
    for index in (2, 0, 1):  # replica 2 failed longest ago
        fail(g.replicas[index], clock, 3)
        clock.now += 1.0
    assert all(not r.allows(clock()) for r in g.replicas)
    chosen = g.choose()
    assert chosen is g.replicas[2]
    chosen.started(clock())
    assert chosen.trial_in_flight
    chosen.finished(Outcome.OK, 0.002, clock())
    assert chosen.state(clock()) is BreakerState.CLOSED


def test_hedge_delay_is_the_observed_p95_clamped() -> None:
    g, clock = group(1)
    r = g.replicas[0]
    assert g.hedge_delay(r) == POLICY.hedge_default_s, "default before enough samples"
    for ms in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 30):
        r.started(clock())
        r.finished(Outcome.OK, ms / 1000, clock())
    assert g.hedge_delay(r) == 0.019  # 19th of 20 sorted latencies
    for _ in range(20):
        r.started(clock())
        r.finished(Outcome.OK, 0.5, clock())  # the window forgets the old ones
    assert g.hedge_delay(r) == POLICY.hedge_max_s
    for _ in range(20):
        r.started(clock())
        r.finished(Outcome.OK, 0.0001, clock())
    assert g.hedge_delay(r) == POLICY.hedge_min_s
