"""rate_limit with the memory backend, end to end: exact per node across worker processes,
RateLimit headers request by request, 429 + Retry-After, key extraction."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.speedups import NO_SPEEDUPS_ENV
from tests.conftest import proxy_config
from tests.support.client import Response, request
from tests.support.procs import GatewayProcess, UpstreamProcess


def limited(upstream: UpstreamProcess, plugin: dict[str, Any], **top: Any) -> dict[str, Any]:
    return proxy_config(upstream.url, plugins=[{"rate_limit": plugin}], top=top)


def burst_of(port: int, n: int, headers: Sequence[tuple[str, str]] = ()) -> list[Response]:
    """``n`` requests at once, each on its own connection."""
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(request, port, "GET", f"/r{i}", list(headers)) for i in range(n)]
        return [f.result() for f in futures]


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """One sample's value from the admin /metrics (0 when absent)."""
    body = gw.admin("GET", "/metrics").body.decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


#: the compiled bucket take, and its Python version (gateway.speedups)
SPEEDUPS = pytest.mark.parametrize("env", [{}, {NO_SPEEDUPS_ENV: "1"}], ids=["compiled", "python"])


@SPEEDUPS
def test_two_workers_of_one_node_admit_exactly_the_limit(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess], env: dict[str, str]
) -> None:
    config = limited(upstream, {"key": "route", "rate": "25/h"})
    config["workers"] = 2
    gw = start_gateway(config, extra_env=env)
    responses = burst_of(gw.port, 120)
    codes = [r.status for r in responses]
    assert codes.count(200) == 25, codes
    assert codes.count(429) == 95
    for r in responses:
        if r.status == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert int(r.header("retry-after") or 0) >= 1
    status = gw.admin("GET", "/status").json()
    assert len(status["workers"]) == 2
    compiled = NO_SPEEDUPS_ENV not in env
    assert all(w["compiled"] is compiled for w in status["workers"])
    plugin = next(p for p in status["plugins"] if p["plugin"] == "rate_limit")
    assert plugin["backend"] == "memory" and plugin["mode"] == "ok" and plugin["route"] == "all"
    paths = {
        p["table"]["path"]
        for w in status["workers"]
        for p in w["plugins"]
        if p["plugin"] == "rate_limit"
    }
    assert len(paths) == 1  # both workers use the node's one table
    deadline = time.monotonic() + 10  # metrics are flushed every 0.5 s
    while metric(gw, "gateway_ratelimit_decisions_total", decision="limited") < 95:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert metric(gw, "gateway_ratelimit_decisions_total", route="all", decision="allowed") == 25


@SPEEDUPS
def test_headers_follow_the_remaining_budget_request_by_request(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess], env: dict[str, str]
) -> None:
    gw = start_gateway(
        limited(upstream, {"rate": "4/h", "name": "hourly", "headers": "both"}), extra_env=env
    )
    for left in (3, 2, 1, 0):
        r = request(gw.port, "GET", "/x")
        assert r.status == 200
        assert r.header("ratelimit-policy") == '"hourly";q=4;w=3600'
        value = r.header("ratelimit") or ""
        assert value.startswith(f'"hourly";r={left};t='), value
        assert r.header("x-ratelimit-limit") == "4"
        assert r.header("x-ratelimit-remaining") == str(left)
    r = request(gw.port, "GET", "/x")
    assert r.status == 429
    body = r.json()["error"]
    assert body["code"] == "rate_limited" and body["status"] == 429 and body["request_id"]
    retry = int(r.header("retry-after") or 0)
    assert 890 <= retry <= 900  # one token per 900 s
    value = r.header("ratelimit") or ""
    assert value.startswith('"hourly";r=0;t=')
    assert int(value.rsplit("=", 1)[1]) == retry  # t agrees with Retry-After when r=0
    assert r.header("ratelimit-policy") == '"hourly";q=4;w=3600'


def test_response_hooks_see_and_edit_the_limiter_headers(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    # The limiter's headers are made with its decision (Exchange.add_response_headers); a
    # route with an on_response hook gets them as response_headers, for the hook to edit.
    edits = {"response": {"remove": ["ratelimit-policy"], "set": {"x-seen": "1"}}}
    config = proxy_config(
        upstream.url, plugins=[{"headers": edits}, {"rate_limit": {"rate": "2/h", "name": "h"}}]
    )
    gw = start_gateway(config)
    for left in (1, 0):
        r = request(gw.port, "GET", "/hooked")
        assert r.status == 200
        assert (r.header("ratelimit") or "").startswith(f'"h";r={left};t='), r.headers
        assert r.header("ratelimit-policy") is None  # removed by the headers plugin
        assert r.header("x-seen") == "1"
    r = request(gw.port, "GET", "/hooked")
    assert r.status == 429
    assert (r.header("ratelimit") or "").startswith('"h";r=0;t=')
    assert r.header("ratelimit-policy") is None and r.header("x-seen") == "1"


def test_several_limits_and_header_emission_off(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    plugin = {
        "limits": [{"rate": "100/s", "name": "fast"}, {"rate": "2/h", "name": "slow"}],
        "headers": "none",
    }
    gw = start_gateway(limited(upstream, plugin))
    statuses = [request(gw.port, "GET", "/x") for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert all(r.header("ratelimit") is None for r in statuses)
    assert statuses[2].header("retry-after") is not None
    gw2 = start_gateway(limited(upstream, {**plugin, "headers": "draft"}))
    r = request(gw2.port, "GET", "/x")
    assert r.header("ratelimit-policy") == '"fast";q=100;w=1, "slow";q=2;w=3600'
    assert (r.header("ratelimit") or "").startswith('"fast";r=99;t=')
    assert '"slow";r=1;t=' in (r.header("ratelimit") or "")


def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway(limited(upstream, {"key": "ip", "rate": "2/h"}))
    codes = [
        request(gw.port, "GET", "/", [("x-forwarded-for", f"203.0.113.{i}")]).status
        for i in range(4)
    ]
    assert codes == [200, 200, 429, 429]  # one bucket: the peer's address
    trusted = limited(
        upstream, {"key": "ip", "rate": "2/h"}, forwarding={"trusted_proxies": ["127.0.0.1/32"]}
    )
    gw2 = start_gateway(trusted)
    codes = [
        request(gw2.port, "GET", "/", [("x-forwarded-for", f"203.0.113.{i}")]).status
        for i in range(4)
    ]
    assert codes == [200, 200, 200, 200]  # behind a trusted proxy: one bucket per client


def test_missing_key_is_shared_or_rejected(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    shared = start_gateway(limited(upstream, {"key": "api_key", "rate": "2/h"}))
    assert [request(shared.port, "GET", "/").status for _ in range(3)] == [200, 200, 429]
    # A caller with a key has its own bucket.
    assert request(shared.port, "GET", "/", [("x-api-key", "k1")]).status == 200
    rejecting = start_gateway(
        limited(upstream, {"key": "header:x-tenant", "rate": "2/h", "missing_key": "reject"})
    )
    r = request(rejecting.port, "GET", "/")
    assert r.status == 403
    assert "x-tenant" in r.json()["error"]["message"]
    assert request(rejecting.port, "GET", "/", [("x-tenant", "a")]).status == 200
