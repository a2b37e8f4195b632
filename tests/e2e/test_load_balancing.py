"""Load balancing across real upstream processes on loopback: weights, steering away from a
slow target, consistent hashing, failover when a target dies and its return, which requests
are retried (and with which body), the retry budget, and the circuit breaker."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import proxy_config
from tests.e2e.test_operations import _metrics
from tests.support.balancing import lb_config, served_by
from tests.support.client import Conn, request
from tests.support.procs import GatewayProcess, UpstreamProcess, wait_for

GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture(scope="module")
def three() -> Iterator[list[UpstreamProcess]]:
    ups = [UpstreamProcess() for _ in range(3)]
    yield ups
    for u in ups:
        u.stop()


@pytest.fixture
def ups(three: list[UpstreamProcess]) -> list[UpstreamProcess]:
    """The module's three upstreams, serving normally with nothing recorded."""
    for u in three:
        u.fail_with(0)
        u.reset()
    return three


@pytest.fixture
def fresh_three() -> Iterator[list[UpstreamProcess]]:
    """Three upstreams a test may kill and restart."""
    ups = [UpstreamProcess() for _ in range(3)]
    yield ups
    for u in ups:
        u.stop()


def reset(ups: list[UpstreamProcess]) -> None:
    for u in ups:
        u.reset()


def counts(ups: list[UpstreamProcess]) -> list[int]:
    return [len(u.received()) for u in ups]


# -- distribution -------------------------------------------------------------------------------
def per_balancer_config(
    ups: list[UpstreamProcess], balancers: list[str], weights: list[int] | None = None
) -> dict[str, Any]:
    """One gateway, one upstream per balancer over the same processes, routed by path
    (``/round_robin/...``): one gateway start for several balancers."""
    config = lb_config(ups, weights)
    targets = config["upstreams"].pop("backend")["targets"]
    config["upstreams"] = {b: {"balancer": b, "targets": targets} for b in balancers}
    config["routes"] = [
        {"name": b, "match": {"path_prefix": f"/{b}"}, "upstream": b} for b in balancers
    ]
    return config


def counts_under(ups: list[UpstreamProcess], prefix: str) -> list[int]:
    return [sum(1 for r in u.received() if r["target"].startswith(prefix)) for u in ups]


def test_weights_are_honoured(start_gateway: GatewayFactory, ups: list[UpstreamProcess]) -> None:
    weights = [1, 2, 3]
    balancers = ["round_robin", "least_conn", "random"]
    gw = start_gateway(per_balancer_config(ups, balancers, weights))
    n = 600
    with Conn(gw.port) as c:
        for balancer in balancers:
            for _ in range(n):
                assert c.request("GET", f"/{balancer}/echo").status == 200
    for balancer in balancers:
        got = counts_under(ups, f"/{balancer}/")
        assert sum(got) == n
        if balancer == "random":
            for count, w in zip(got, weights, strict=True):
                p = w / 6
                assert abs(count - n * p) <= 5 * (n * p * (1 - p)) ** 0.5, got
        else:  # one request at a time: exact shares
            assert got == [100, 200, 300], balancer


def test_slow_target_gets_less(start_gateway: GatewayFactory) -> None:
    ups = [UpstreamProcess(delay=0.3), UpstreamProcess(), UpstreamProcess()]
    balancers = ["least_conn", "p2c_ewma"]
    try:
        gw = start_gateway(per_balancer_config(ups, balancers))
        for balancer in balancers:
            errors: list[int] = []

            def client(path: str, errors: list[int]) -> None:
                with Conn(gw.port) as c:
                    for _ in range(10):
                        status = c.request("GET", path).status
                        if status != 200:
                            errors.append(status)

            threads = [
                threading.Thread(target=client, args=(f"/{balancer}/echo", errors))
                for _ in range(6)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors
            got = counts_under(ups, f"/{balancer}/")
            assert sum(got) == 60
            # round-robin would give the slow target a third (20); these send it far fewer
            assert got[0] < 10, (balancer, got)
    finally:
        for u in ups:
            u.stop()


def test_consistent_hash_keeps_a_key_on_one_target(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    gw = start_gateway(
        lb_config(ups, balancer="consistent_hash", hash_on="header", hash_key="x-user")
    )
    owners: dict[str, set[str]] = {}
    with Conn(gw.port) as c:
        for _ in range(3):
            for i in range(30):
                user = f"user-{i}"
                resp = c.request("GET", "/echo", headers=[("x-user", user)])
                assert resp.status == 200
                owners.setdefault(user, set()).add(served_by(resp.json()))
    assert all(len(v) == 1 for v in owners.values()), owners
    assert len({next(iter(v)) for v in owners.values()}) == 3  # and the keys are spread


def test_host_name_targets_resolve_to_every_address(
    start_gateway: GatewayFactory, upstream: UpstreamProcess
) -> None:
    gw = start_gateway(proxy_config(f"http://localhost:{upstream.port}"))
    resp = request(gw.port, "GET", "/echo")
    assert resp.status == 200
    # the Host sent upstream is the configured name, not the address connected to
    assert served_by(resp.json()) == f"localhost:{upstream.port}"


# -- failover -----------------------------------------------------------------------------------
def test_killing_a_target_under_load(
    start_gateway: GatewayFactory, fresh_three: list[UpstreamProcess]
) -> None:
    ups = fresh_three
    gw = start_gateway(
        lb_config(ups, outlier_detection={"consecutive_failures": 2, "base_ejection": "1s"})
    )
    stop = threading.Event()
    get_errors: list[str] = []
    gets = Counter[str]()
    posts: dict[str, int] = {}

    def getter() -> None:
        try:
            with Conn(gw.port) as c:
                while not stop.is_set():
                    resp = c.request("GET", "/echo")
                    gets[served_by(resp.json()) if resp.status == 200 else "error"] += 1
                    if resp.status != 200:
                        get_errors.append(resp.body.decode())
        except Exception as exc:  # reported by the assertion below, not lost in the thread
            get_errors.append(repr(exc))

    def poster() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body = f"post-{i}".encode()
            try:
                posts[body.decode()] = request(gw.port, "POST", "/echo", body=body).status
            except ConnectionError:
                posts[body.decode()] = 0

    threads = [threading.Thread(target=getter) for _ in range(3)]
    threads.append(threading.Thread(target=poster))
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(gets.values()) > 150, "traffic", 20)
        victim = ups[1]
        victim.stop()  # killed under load
        seen = sum(gets.values())
        wait_for(lambda: sum(gets.values()) > seen + 200, "traffic after the kill", 20)
        ups[1] = UpstreamProcess(port=victim.port)  # restarted: back in rotation by itself
        restarted = ups[1]
        wait_for(lambda: len(restarted.received()) > 10, "the restarted target to serve", 20)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not get_errors, get_errors[:3]
    # POSTs without Idempotency-Key are never sent twice: each body reached an upstream at
    # most once (some may have failed with 502, in flight on the killed target)
    bodies = Counter(r["body"] for u in (ups[0], ups[2], ups[1]) for r in u.received())
    assert all(bodies[b] <= 1 for b in posts), [b for b in posts if bodies[b] > 1]
    assert sum(1 for s in posts.values() if s == 200) > 0


def test_which_requests_are_retried(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    for u in ups:
        u.fail_with(503)
    gw = start_gateway(
        lb_config(
            ups,
            outlier_detection={"consecutive_failures": 0},
            retries={"attempts": 2, "min_per_second": 100},
        )
    )

    def attempts(method: str, headers: list[tuple[str, str]] | None = None) -> int:
        reset(ups)
        resp = request(gw.port, method, "/echo", headers=headers, body=b"x" * 100)
        assert resp.status == 503  # the upstream's own 503 after the last attempt
        return sum(counts(ups))

    assert attempts("GET") == 2
    assert attempts("PUT") == 2
    assert attempts("POST") == 1  # not idempotent: never retried
    assert attempts("POST", [("idempotency-key", "k1")]) == 2


def test_retried_body_arrives_whole(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    ups = ups[:2]
    ups[0].fail_with(503)
    gw = start_gateway(lb_config(ups, outlier_detection={"consecutive_failures": 0}))
    big = bytes(range(256)) * 200  # 51,200 bytes: under retries.max_body (64k)
    for i in range(4):
        body = big[i:] + b"end"
        resp = request(gw.port, "POST", "/echo", headers=[("idempotency-key", f"k{i}")], body=body)
        assert resp.status == 200
        assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    # every other request went to the failing one first and was replayed on the other
    assert len(ups[0].received()) >= 2
    # a body over retries.max_body is streamed and not retried
    huge = b"z" * (100 * 1024)
    statuses = {request(gw.port, "PUT", "/echo", body=huge).status for _ in range(4)}
    assert statuses == {200, 503}


def test_retry_budget_caps_retries_in_a_full_outage(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    for u in ups:
        u.fail_with(503)
    gw = start_gateway(
        lb_config(
            ups,
            outlier_detection={"consecutive_failures": 0},
            retries={"attempts": 3, "budget": 0.2, "min_per_second": 0},
        )
    )
    reset(ups)
    n = 150
    with Conn(gw.port) as c:
        for _ in range(n):
            assert c.request("GET", "/echo").status == 503
    sent = sum(counts(ups))
    # without a budget: 3 attempts each (450); with it, about 20% more than the requests
    assert n + 10 < sent <= n + 0.2 * n + 1, sent


def test_circuit_breaker_trips_at_the_pending_limit(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    up = ups[0]
    gw = start_gateway(
        lb_config([up], circuit_breaker={"max_pending": 2}, timeouts={"read": "30s"})
    )
    stalled = []
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", gw.port))
        s.sendall(b"GET /stall HTTP/1.1\r\nHost: t\r\n\r\n")
        stalled.append(s)
    wait_for(lambda: len(up.received()) == 2, "two stalled requests upstream", 20)
    resp = request(gw.port, "GET", "/echo")
    assert resp.status == 503
    err = json.loads(resp.body)["error"]
    assert err["code"] == "upstream_overloaded" and err["status"] == 503
    for s in stalled:
        s.close()  # the client leaves: its upstream requests are abandoned
    wait_for(lambda: request(gw.port, "GET", "/echo").status == 200, "room again", 20)


# -- timeouts -----------------------------------------------------------------------------------
def test_route_timeouts_override_the_upstream_ones(
    start_gateway: GatewayFactory, upstream: UpstreamProcess
) -> None:
    config = proxy_config(upstream.url, timeouts={"read": "300ms"})
    config["upstreams"]["backend"]["timeouts"] = {"read": "60s"}
    gw = start_gateway(config)
    resp = request(gw.port, "GET", "/stall", timeout=20)
    assert resp.status == 504 and resp.json()["error"]["code"] == "upstream_timeout"


def test_total_timeout_bounds_the_upstream_phase(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    gw = start_gateway(
        lb_config(ups[:2], timeouts={"read": "60s", "total": "1s"}, retries={"attempts": 2})
    )
    # the read timeout (60 s) would outlast this client's patience (10 s): the total one acts
    resp = request(gw.port, "GET", "/stall", timeout=10)
    assert resp.status == 504 and resp.json()["error"]["code"] == "upstream_timeout"


# -- visibility ---------------------------------------------------------------------------------
def test_metrics_and_status_show_retries_ejections_and_targets(
    start_gateway: GatewayFactory, ups: list[UpstreamProcess]
) -> None:
    bad, good = ups[0], ups[1]
    bad.fail_with(503)
    gw = start_gateway(
        lb_config(
            [bad, good], outlier_detection={"consecutive_failures": 2, "base_ejection": "60s"}
        )
    )
    with Conn(gw.port) as c:
        for _ in range(10):  # every one answered: the bad target's 503s are retried
            assert c.request("GET", "/echo").status == 200
    bad_label, good_label = f"127.0.0.1:{bad.port}", f"127.0.0.1:{good.port}"

    def sample(name: str, **labels: str) -> float | None:
        for key, value in _metrics(gw).get(name, {}).items():
            if dict(key) == {"upstream": "backend", **labels}:
                return float(value)
        return None

    wait_for(lambda: (sample("gateway_retries_total") or 0) >= 2, "retries in the metrics", 20)
    assert sample("gateway_upstream_ejections_total", target=bad_label) == 1
    assert sample("gateway_upstream_target_up", target=bad_label) == 0
    assert sample("gateway_upstream_target_up", target=good_label) == 1

    def backend() -> dict[str, Any] | None:  # workers write their status every few ticks
        (worker,) = gw.admin("GET", "/status").json()["workers"]
        up: dict[str, Any] = worker["upstreams"]["backend"]
        return up if any(t["ejected"] for t in up["targets"]) else None

    up = wait_for(backend, "the ejection in /status", 20)
    assert up["balancer"] == "round_robin" and not up["panic"]
    states = {t["target"]: t for t in up["targets"]}
    assert states[bad_label]["ejected"] and not states[bad_label]["available"]
    assert states[good_label]["available"] and states[good_label]["in_flight"] == 0
