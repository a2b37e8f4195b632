"""rate_limit with the redis backend, end to end: exact across gateway processes sharing one
redis-server; a stalled, killed and restarted Redis under load in each on_error mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import proxy_config
from tests.e2e.test_rate_limit import metric
from tests.support.client import Response, parse_responses, raw_exchange, request
from tests.support.procs import GatewayProcess, UpstreamProcess
from tests.support.redis import RedisServer

#: Every request must be answered within this, whatever Redis does (the timeout is 200 ms).
BOUND = 2.0


def redis_config(
    upstream: UpstreamProcess, redis: RedisServer, plugin: dict[str, Any], **state: Any
) -> dict[str, Any]:
    state = {"backend": "redis", "url": redis.url, "timeout": "200ms", **state}
    return proxy_config(upstream.url, plugins=[{"rate_limit": plugin}], top={"state": state})


def timed(port: int) -> tuple[Response, float]:
    start = time.monotonic()
    r = request(port, "GET", "/x")
    return r, time.monotonic() - start


def test_two_gateways_sharing_redis_admit_exactly_the_limit(
    upstream: UpstreamProcess,
    redis: RedisServer,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    # A generous timeout and on_error: closed, so that a slow moment of this busy test machine
    # shows up as a 503 instead of a silent fallback to the per-node limit.
    config = redis_config(
        upstream, redis, {"key": "route", "rate": "25/h"}, timeout="2s", on_error="closed"
    )
    config["workers"] = 2  # 2 gateway processes x 2 workers
    gateways = [start_gateway(config) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(request, gateways[i % 2].port, "GET", f"/r{i}") for i in range(120)]
        responses = [f.result() for f in futures]
    codes = [r.status for r in responses]
    assert codes.count(200) == 25, codes
    assert codes.count(429) == 95
    remaining = sorted(
        int((r.header("ratelimit") or "").split("r=")[1].split(";")[0])
        for r in responses
        if r.status == 200
    )
    assert remaining == list(range(25))  # each admitted request saw its own place in line
    # Each node counts the live nodes through Redis (for on_error: local), refreshed every 5 s.
    deadline = time.monotonic() + 20
    for gw in gateways:
        while True:
            status = gw.admin("GET", "/status").json()
            assert len(status["workers"]) == 2
            plugins = [
                next(p for p in w["plugins"] if p["plugin"] == "rate_limit")
                for w in status["workers"]
            ]
            assert all(p["backend"] == "redis" and p["mode"] == "ok" for p in plugins)
            if all(p["nodes"] == 2 for p in plugins):
                break
            assert time.monotonic() < deadline, plugins
            time.sleep(0.5)


def status_of(r: Response) -> str:
    if r.status == 503:
        assert r.json()["error"]["code"] == "rate_limit_unavailable"
        return "closed"
    if r.status == 429:
        assert r.header("retry-after") is not None
    return str(r.status)


@pytest.mark.parametrize("on_error", ["local", "open", "closed"])
def test_stalled_redis_each_mode_bounded_then_recovers(
    upstream: UpstreamProcess,
    redis: RedisServer,
    start_gateway: Callable[..., GatewayProcess],
    on_error: str,
) -> None:
    config = redis_config(
        upstream, redis, {"key": "route", "rate": "40/h"}, on_error=on_error, nodes=4
    )
    gw = start_gateway(config)
    r, _ = timed(gw.port)
    assert r.status == 200 and (r.header("ratelimit") or "").startswith('"default";r=39;')
    redis.debug_sleep(4.0)  # answers nothing for 4 s: every check meanwhile waits in vain
    seen = []
    for _ in range(12):
        r, took = timed(gw.port)
        assert took < BOUND, took
        seen.append((status_of(r), r.header("ratelimit")))
    if on_error == "local":  # 40/h over 4 nodes: 10 on this node, with headers to match
        assert [s for s, _ in seen] == ["200"] * 10 + ["429"] * 2
        assert seen[0][1] is not None and seen[0][1].startswith('"default";r=9;')
    elif on_error == "open":
        assert all(s == "200" and h is None for s, h in seen)
    else:
        assert all(s == "closed" for s, _ in seen)
    # Recovery: within seconds the checks go to Redis again. Its bucket had 39 left (checks
    # that timed out may still have run there once Redis woke up); the node's had at most 9.
    deadline = time.monotonic() + 15  # the 4 s sleep, then backoff
    while True:
        r, took = timed(gw.port)
        assert took < BOUND
        header = r.header("ratelimit") or ""
        left = int(header.split("r=")[1].split(";")[0]) if "r=" in header else -1
        if r.status == 200 and 30 <= left <= 38:
            break
        assert time.monotonic() < deadline, (r.status, header)
        time.sleep(0.1)
    assert gw.alive()
    # The degraded decisions are in the access log, the metrics and the decision counters.
    note = {"local": "allowed_local", "open": "open", "closed": "unavailable"}[on_error]
    decision = {"local": "allowed_local", "open": "open", "closed": "unavailable"}[on_error]
    deadline = time.monotonic() + 10
    while True:
        notes = [
            rec["plugins"]["ratelimit"]
            for rec in gw.access_records()
            if isinstance(rec.get("plugins"), dict) and "ratelimit" in rec["plugins"]
        ]
        errors = metric(gw, "gateway_state_backend_errors_total", backend="redis")
        decided = metric(gw, "gateway_ratelimit_decisions_total", route="all", decision=decision)
        ok = metric(gw, "gateway_state_backend_mode", backend="redis", mode="ok")
        if note in notes and errors >= 1 and decided >= 1 and ok == 1:
            break
        assert time.monotonic() < deadline, (notes, errors, decided, ok)
        time.sleep(0.2)


def test_killed_and_restarted_redis_under_load(
    upstream: UpstreamProcess,
    redis: RedisServer,
    start_gateway: Callable[..., GatewayProcess],
) -> None:
    config = redis_config(upstream, redis, {"key": "ip", "rate": "100000/s"}, on_error="closed")
    gw = start_gateway(config)
    # (outcome, seconds taken, sent at, answered at): which requests Redis could have decided
    # is read from when they were sent and answered, not from a margin around the kill.
    results: list[tuple[str, float, float, float]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                r, took = timed(gw.port)
            except OSError as exc:  # a failed request is a bug here: record it
                results.append((f"error {exc}", 0.0, sent, time.monotonic()))
                continue
            results.append((status_of(r), took, sent, time.monotonic()))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        killing = time.monotonic()  # answers after this may already see Redis gone
        redis.kill()
        killed = time.monotonic()  # Redis is gone (reaped) from here ...
        time.sleep(1.0)
        restarting = time.monotonic()  # ... until at least here
        redis.start()
        restarted = time.monotonic()
        deadline = restarted + 10
        while not any(s == "200" and sent > restarted for s, _, sent, _ in list(results)):
            assert time.monotonic() < deadline, "no recovery after the restart"
            time.sleep(0.1)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not [s for s, _, _, _ in results if s.startswith("error")]
    assert max(took for _, took, _, _ in results) < BOUND
    # Sent after the kill and answered before the restart: Redis was gone for all of it.
    during = [s for s, _, sent, done in results if killed < sent and done < restarting]
    assert during and set(during) == {"closed"}
    assert {s for s, _, _, done in results if done < killing} == {"200"}
    assert gw.alive()


def test_a_total_timeout_does_not_cut_a_request_waiting_on_redis(
    upstream: UpstreamProcess, redis: RedisServer, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # timeouts.total counts the upstream phase: a check waiting on a slow Redis is bounded by
    # state.timeout (here 3 s, on_error: open) and must not get 504 upstream_timeout.
    state = {"backend": "redis", "url": redis.url, "timeout": "3s", "on_error": "open"}
    config = proxy_config(
        upstream.url,
        plugins=[{"rate_limit": {"key": "route", "rate": "100/s"}}],
        top={"state": state},
        timeouts={"total": "30s"},
    )
    gw = start_gateway(config)
    assert request(gw.port, "GET", "/warm").status == 200
    redis.stall(1.5)
    resp = request(gw.port, "GET", "/x")
    assert resp.status == 200, resp.body


def test_pipelined_requests_through_the_redis_limiter_stay_in_order(
    upstream: UpstreamProcess, redis: RedisServer, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # Each check is answered from the batch's reply (ex.resume, inside the delivery loop);
    # a refusal answers at once and starts the next pipelined request from there.
    config = redis_config(
        upstream, redis, {"key": "ip", "rate": "1/m", "burst": 3}, on_error="closed"
    )
    gw = start_gateway(config)
    raw = b"".join(b"GET /p%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(8))
    raw += b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    responses = parse_responses(raw_exchange(gw.port, raw))
    assert [r.status for r in responses] == [200] * 3 + [429] * 6
    assert [r.json()["target"] for r in responses[:3]] == ["/p0", "/p1", "/p2"]
    # 1/m: each admitted request puts the bucket 60 s further from full; with none left,
    # t is when the next one is
    assert [r.header("ratelimit") for r in responses[:3]] == [
        '"default";r=2;t=60',
        '"default";r=1;t=120',
        '"default";r=0;t=60',
    ]
    assert gw.alive()
