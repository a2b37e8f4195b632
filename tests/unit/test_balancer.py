"""Balancers, the upstream's pick (health, panic, circuit breaker), passive ejection, slow
start and the retry budget: the pure parts, without sockets."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import pytest

from gateway.proxy.exchange import Exchange
from gateway.upstream import discovery, health
from gateway.upstream.balancer import (
    BALANCERS,
    ConsistentHash,
    LeastConn,
    P2CEwma,
    RandomBalancer,
    RoundRobin,
    make_key,
)
from gateway.upstream.discovery import TargetSpec
from gateway.upstream.health import HealthPolicy, Outlier
from gateway.upstream.pool import Pool
from gateway.upstream.retry import RetryBudget
from gateway.upstream.target import EWMA_DECAY, EWMA_INITIAL, Target, Upstream, UpstreamTimeouts
from tests.support.exchange import make_exchange


def exchange(client_ip: str = "192.0.2.1", path: bytes = b"/", **headers: str) -> Exchange:
    ex = make_exchange(
        [(n.replace("_", "-").encode(), v.encode()) for n, v in headers.items()],
        client_ip=client_ip,
    )
    ex.path = path
    return ex


def targets(*weights: int, limit: int = 1 << 30) -> list[Target]:
    return [
        Target(f"10.0.0.{i + 1}", 80, w, Pool(f"t{i}", 8, 60, 100), limit=limit)
        for i, w in enumerate(weights)
    ]


def index(ts: list[Target], t: Target) -> int:
    return ts.index(t)


EX = exchange()


# -- round robin --------------------------------------------------------------------------------
def test_smooth_weighted_round_robin_order() -> None:
    ts = targets(5, 1, 1)
    rr = RoundRobin(ts)
    picks = [index(ts, rr.pick(EX)) for _ in range(14)]
    # nginx's smooth weighting: a a b a c a a, never five a in a row; then it repeats
    assert picks == [0, 0, 1, 0, 2, 0, 0] * 2


@pytest.mark.parametrize("weights", [[5, 1, 1], [3, 2], [1, 2, 3, 4], [7, 7, 1], [1, 100]])
def test_weighted_counts_are_exact_over_a_cycle(weights: list[int]) -> None:
    ts = targets(*weights)
    rr = RoundRobin(ts)
    cycle = sum(weights)
    for _ in range(3):
        counts = Counter(index(ts, rr.pick(EX)) for _ in range(cycle))
        assert [counts[i] for i in range(len(weights))] == weights


def test_smooth_weighting_spreads_the_heavy_target() -> None:
    ts = targets(1, 100)
    rr = RoundRobin(ts)
    picks = [index(ts, rr.pick(EX)) for _ in range(101)]
    assert picks.count(0) == 1
    # the light target is picked once, in the middle of the cycle, not at one edge
    assert 25 < picks.index(0) < 75


def test_equal_weights_cycle_through_every_target() -> None:
    ts = targets(1, 1, 1)
    rr = RoundRobin(ts)
    picks = [index(ts, rr.pick(EX)) for _ in range(9)]
    assert sorted(picks[:3]) == [0, 1, 2]
    assert picks[:3] * 3 == picks


def test_balancer_needs_a_target_and_positive_weights() -> None:
    with pytest.raises(ValueError):
        RoundRobin([])
    with pytest.raises(ValueError):
        RoundRobin(targets(1, 1), [1, 0])


def test_registry() -> None:
    assert set(BALANCERS) == {"round_robin", "least_conn", "p2c_ewma", "consistent_hash", "random"}
    for name, cls in BALANCERS.items():
        assert cls.name == name


# -- random -------------------------------------------------------------------------------------
def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``count`` successes in ``n`` draws is plausible for probability ``p``."""
    sd = (n * p * (1 - p)) ** 0.5
    return abs(count - n * p) <= sigmas * sd


@pytest.mark.parametrize("weights", [[1, 1, 1], [3, 1], [1, 2, 7]])
def test_random_honours_weights(weights: list[int]) -> None:
    ts = targets(*weights)
    b = RandomBalancer(ts, rng=random.Random(7))
    n = 20_000
    counts = Counter(index(ts, b.pick(EX)) for _ in range(n))
    for i, w in enumerate(weights):
        assert within(counts[i], n, w / sum(weights)), (counts, weights)


# -- least_conn ---------------------------------------------------------------------------------
def test_least_conn_picks_the_least_loaded_relative_to_weight() -> None:
    ts = targets(1, 1, 2)
    b = LeastConn(ts, rng=random.Random(1))
    ts[0].in_flight, ts[1].in_flight, ts[2].in_flight = 3, 2, 3
    assert b.pick(EX) is ts[2]  # loads per weight: 3, 2, 1.5
    ts[2].connecting = 2  # a connection being opened counts as load
    assert b.pick(EX) is ts[1]  # 3, 2, 2.5


def test_least_conn_ties_follow_the_weights() -> None:
    ts = targets(1, 2, 3)
    b = LeastConn(ts, rng=random.Random(1))
    counts = Counter(b.pick(EX) for _ in range(600))  # all idle: every pick is a tie
    assert [counts[t] for t in ts] == [100, 200, 300]


def test_least_conn_steers_away_from_a_slow_target() -> None:
    """Simulated: the slow target holds each request 10 ticks, the others 1."""
    ts = targets(1, 1, 1)
    b = LeastConn(ts, rng=random.Random(1))
    hold = {ts[0]: 10, ts[1]: 1, ts[2]: 1}
    busy: list[tuple[int, Target]] = []
    counts: Counter[Target] = Counter()
    for tick in range(3000):
        for item in [x for x in busy if x[0] <= tick]:
            busy.remove(item)
            item[1].in_flight -= 1
        for _ in range(2):  # two requests per tick
            t = b.pick(EX)
            t.in_flight += 1
            counts[t] += 1
            busy.append((tick + hold[t], t))
    assert counts[ts[0]] < 0.5 * counts[ts[1]]
    assert within(counts[ts[1]], counts[ts[1]] + counts[ts[2]], 0.5)


# -- p2c_ewma -----------------------------------------------------------------------------------
def test_p2c_prefers_the_faster_target() -> None:
    ts = targets(1, 1, 1)
    b = P2CEwma(ts, rng=random.Random(3))
    now = time.monotonic()
    for t in ts:
        t.observe_latency(0.010, now)
    ts[0].observe_latency(0.500, now)  # the peak is taken at once
    assert ts[0].ewma == 0.5
    counts = Counter(b.pick(EX) for _ in range(3000))
    # it is only ever chosen when drawn against itself, which the second draw avoids
    assert counts[ts[0]] == 0
    assert counts[ts[1]] > 750 and counts[ts[2]] > 750  # equal ones share (ties flip)


def test_p2c_draws_by_weight() -> None:
    ts = targets(1, 2, 3)
    b = P2CEwma(ts, rng=random.Random(5))
    counts = Counter(b.pick(EX) for _ in range(6000))  # equal scores: the first drawn wins
    for t, w in zip(ts, (1, 2, 3), strict=True):
        assert within(counts[t], 6000, w / 6), counts


def test_p2c_in_flight_counts() -> None:
    ts = targets(1, 1)
    b = P2CEwma(ts, rng=random.Random(3))
    ts[0].in_flight = 5
    assert {b.pick(EX) for _ in range(50)} == {ts[1]}


def test_peak_ewma_comes_down_with_fast_samples_and_with_time() -> None:
    (t,) = targets(1)
    t.observe_latency(1.0, 100.0)
    for _ in range(8):
        t.observe_latency(0.01, 100.0)
    assert t.ewma < 0.02
    t.observe_latency(1.0, 100.0)
    # avoided for being slow, it is tried again once the estimate has decayed
    assert t.decayed_latency(100.0 + 5 * EWMA_DECAY) < 0.01 + EWMA_INITIAL


# -- consistent hash ----------------------------------------------------------------------------
KEYS = [f"user-{i}".encode() for i in range(10_000)]


def test_consistent_hash_is_stable_for_a_key() -> None:
    ts = targets(1, 1, 1)
    a, b = ConsistentHash(ts), ConsistentHash(list(ts))
    assert all(a.lookup(k) is b.lookup(k) for k in KEYS[:500])


def test_consistent_hash_spreads_by_weight() -> None:
    ts = targets(1, 1, 2)
    ring = ConsistentHash(ts)
    counts = Counter(ring.lookup(k) for k in KEYS)
    shares = [counts[t] / len(KEYS) for t in ts]
    assert 0.17 < shares[0] < 0.33 and 0.17 < shares[1] < 0.33 and 0.4 < shares[2] < 0.6


@pytest.mark.parametrize("n", [3, 4, 8])
def test_consistent_hash_remaps_about_one_nth_when_a_target_is_added(n: int) -> None:
    ts = targets(*[1] * (n + 1))
    before = ConsistentHash(ts[:n])
    after = ConsistentHash(ts)
    moved = [k for k in KEYS if before.lookup(k) is not after.lookup(k)]
    share = len(moved) / len(KEYS)
    assert 0.5 / (n + 1) < share < 1.6 / (n + 1), share
    # and every key that moved went to the new target: none moved between the old ones
    assert all(after.lookup(k) is ts[n] for k in moved)


def test_consistent_hash_removing_a_target_moves_only_its_keys() -> None:
    ts = targets(1, 1, 1, 1)
    before = ConsistentHash(ts)
    after = ConsistentHash([ts[0], ts[2], ts[3]])
    for k in KEYS[:3000]:
        owner = before.lookup(k)
        if owner is not ts[1]:
            assert after.lookup(k) is owner


def test_consistent_hash_keys() -> None:
    ts = targets(1, 1, 1, 1)
    by_header = ConsistentHash(ts, key=make_key("header", "X-User"))
    by_cookie = ConsistentHash(ts, key=make_key("cookie", "session"))
    by_claim = ConsistentHash(ts, key=make_key("jwt_claim", "tenant"))
    by_sub = ConsistentHash(ts, key=make_key("jwt_claim", "sub"))
    by_path = ConsistentHash(ts, key=make_key("path", ""))
    for i in range(50):
        user = f"u{i}"
        # the same key from different clients goes to the same target
        a = exchange(client_ip="198.51.100.1", x_user=user)
        b = exchange(client_ip="198.51.100.2", x_user=user)
        assert by_header.pick(a) is by_header.pick(b) is by_header.lookup(user.encode())
        c = exchange(cookie=f"theme=dark; session={user}; x=1")
        assert by_cookie.pick(c) is by_cookie.lookup(user.encode())
        d = exchange()
        d.set_var("jwt.claims", {"tenant": user})
        assert by_claim.pick(d) is by_claim.lookup(user.encode())
        e = exchange()
        e.user = user
        assert by_sub.pick(e) is by_sub.lookup(user.encode())
        f = exchange(path=f"/items/{i}".encode())
        assert by_path.pick(f) is by_path.lookup(f"/items/{i}".encode())
    # no header, cookie or claim: the client IP
    assert by_header.pick(exchange(client_ip="203.0.113.9")) is by_header.lookup(b"203.0.113.9")


def test_consistent_hash_retry_goes_to_the_next_owner_on_the_ring() -> None:
    ts = targets(1, 1, 1)
    ring = ConsistentHash(ts, key=make_key("path", ""))
    ex = exchange(path=b"/a")
    first = ring.pick(ex)
    second = ring.pick_other(ex, (first,))
    assert second is not None and second is not first
    # that is where the key goes when the first owner is gone
    assert ConsistentHash([t for t in ts if t is not first]).lookup(b"/a") is second
    assert ring.pick_other(ex, tuple(ts)) is None


# -- the upstream: availability, panic, circuit breaker ---------------------------------------
def upstream(
    ts: list[Target],
    balancer: str = "round_robin",
    fail_fast: bool = False,
    consecutive: int = 3,
    max_share: float = 0.5,
    slow_start: float = 0.0,
) -> Upstream:
    policy = HealthPolicy(None, Outlier(consecutive, 30.0, 300.0, max_share), fail_fast, slow_start)
    return Upstream("api", tuple(ts), UpstreamTimeouts(1, 1), BALANCERS[balancer], None, policy)


def test_single_target_skips_the_balancer() -> None:
    ts = targets(1)
    assert upstream(ts).single is ts[0]
    ts = targets(1, limit=2)  # a circuit-breaker limit to check: through the balancer
    up = upstream(ts)
    assert up.single is None and up.pick(EX) is ts[0]
    ts[0].in_flight = 2  # at its limit: the circuit is open
    assert up.pick(EX) is None and up.refusal == "upstream_overloaded"


def test_unavailable_targets_get_nothing_and_panic_fails_open() -> None:
    ts = targets(1, 1, 1)
    up = upstream(ts)
    ts[0].healthy = False
    up.rebuild()
    assert {up.pick(EX) for _ in range(30)} == {ts[1], ts[2]}
    for t in ts:
        t.healthy = False
    up.rebuild()
    assert up.panic
    assert {up.pick(EX) for _ in range(30)} == set(ts)  # panic: across all of them


def test_all_down_fail_fast() -> None:
    ts = targets(1, 1)
    up = upstream(ts, fail_fast=True)
    for t in ts:
        t.healthy = False
    up.rebuild()
    assert up.pick(EX) is None and up.refusal == "no_healthy_upstream"
    single = targets(1)
    one = upstream(single, fail_fast=True)
    single[0].healthy = False
    one.rebuild()
    assert one.pick(EX) is None and one.refusal == "no_healthy_upstream"


def test_a_full_target_is_skipped_and_all_full_is_overloaded() -> None:
    ts = targets(1, 1, limit=1)
    up = upstream(ts)
    ts[0].in_flight = 1
    assert {up.pick(EX) for _ in range(10)} == {ts[1]}
    ts[1].connecting = 1
    assert up.pick(EX) is None and up.refusal == "upstream_overloaded"


def test_passive_ejection_after_consecutive_failures_and_return() -> None:
    ts = targets(1, 1, 1, 1)
    up = upstream(ts, consecutive=3, max_share=0.5)
    for _ in range(2):
        health.passive_failure(ts[0])
    assert not ts[0].ejected
    health.passive_failure(ts[0])
    assert ts[0].ejected and ts[0].ejections == 1
    assert ts[0] not in {up.pick(EX) for _ in range(30)}
    # at most half of them out at once
    for _ in range(3):
        health.passive_failure(ts[1])
        health.passive_failure(ts[2])
    assert [t.ejected for t in ts] == [True, True, False, False]
    health.unejected(ts[0])
    assert not ts[0].ejected and ts[0].fails == 0
    assert ts[0] in {up.pick(EX) for _ in range(30)}


def test_ejection_time_grows_with_repeated_ejections(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduled: list[float] = []

    class Loop:
        def call_later(self, delay: float, *args: Any) -> Any:
            scheduled.append(delay)
            return None

    monkeypatch.setattr(health.asyncio, "get_running_loop", lambda: Loop())
    ts = targets(1, 1)
    upstream(ts, consecutive=1)
    for _ in range(12):
        health.passive_failure(ts[0])
        health.unejected(ts[0])
    assert scheduled[:3] == [30.0, 60.0, 90.0]
    assert max(scheduled) == 300.0  # capped at max_ejection


def test_active_check_thresholds_both_ways() -> None:
    ts = targets(1, 1)
    up = upstream(ts)
    check = health.ActiveCheck(
        "/h", 1, 1, healthy=2, unhealthy=3, statuses=frozenset({200}), jitter=0
    )
    for _ in range(2):
        health.check_result(ts[0], False, check)
    assert ts[0].healthy
    health.check_result(ts[0], False, check)
    assert not ts[0].healthy and up.available_targets() == [ts[1]]
    health.check_result(ts[0], True, check)
    assert not ts[0].healthy
    health.check_result(ts[0], True, check)
    assert ts[0].healthy and up.available_targets() == ts


def test_slow_start_weights_ramp_up() -> None:
    ts = targets(1, 1)
    policy = HealthPolicy(None, Outlier(0, 1, 1, 1), slow_start=10.0)
    ts[0].up_since = 100.0
    assert policy.slow_start_weight(ts[0], 100.0) == 1  # 10% of weight 1, scaled by 10
    assert policy.slow_start_weight(ts[0], 105.0) == 5
    assert policy.slow_start_weight(ts[0], 111.0) == 10
    assert policy.slow_start_weight(ts[1], 100.0) == 10  # never went down: full weight
    up = upstream(ts, slow_start=10.0)
    ts[0].up_since = 1e12  # just came back (far future 'now' is not needed: it is new)
    up.rebuild(now=1e12)
    assert up.balancer is not None and list(up.balancer.weights) == [1, 10]


# -- retry budget -------------------------------------------------------------------------------
def test_retry_budget_is_a_share_of_requests() -> None:
    budget = RetryBudget(0.2, min_per_second=0)
    allowed = 0
    for requests in range(1, 1001):  # every request fails and asks for a retry
        allowed += budget.withdraw(requests, now=0.0)
    assert 195 <= allowed <= 200
    assert budget.refused == 1000 - allowed


def test_retry_budget_floor_accrues_with_time() -> None:
    budget = RetryBudget(0.0, min_per_second=2)
    assert [budget.withdraw(0, now=0.0) for _ in range(3)] == [True, True, False]
    assert [budget.withdraw(0, now=1.0) for _ in range(3)] == [True, True, False]


# -- discovery: every address a target, kept across refreshes ---------------------------------
def test_dns_refresh_keeps_adds_and_drops_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = [["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"], OSError("SERVFAIL")]

    async def resolve(hostname: str, port: int) -> list[str]:
        assert (hostname, port) == ("svc.test", 8080)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(discovery, "resolve", resolve)
    specs = (TargetSpec(0, "http://svc.test:8080", "svc.test", 8080, 2),)

    def make(spec: TargetSpec, address: str) -> Target:
        return Target(
            address, spec.port, spec.weight, Pool("p", 8, 60, 100), hostname=spec.hostname
        )

    up = upstream([])
    asyncio.run(discovery.refresh(up, specs, make))
    first = {t.host: t for t in up.targets}
    assert sorted(first) == ["10.0.0.1", "10.0.0.2"]
    assert all(t.host_header == b"svc.test:8080" and t.weight == 2 for t in up.targets)
    assert first["10.0.0.2"].label == "svc.test:8080@10.0.0.2"
    asyncio.run(discovery.refresh(up, specs, make))
    second = {t.host: t for t in up.targets}
    assert sorted(second) == ["10.0.0.2", "10.0.0.3"]
    assert second["10.0.0.2"] is first["10.0.0.2"]  # kept: its pool, counters and health
    assert first["10.0.0.1"].upstream is None  # dropped
    asyncio.run(discovery.refresh(up, specs, make))  # a failed lookup keeps the last answer
    assert {t.host: t for t in up.targets} == second
