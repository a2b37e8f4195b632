"""rate_limit with the memory backend, end to end: exact per node across worker processes,
RateLimit headers request by request, 429 + Retry-After, key extraction."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import proxy_config
from tests.support.client import Response, request
from tests.support.procs import GatewayProcess, UpstreamProcess, free_port


def limited(upstream: UpstreamProcess, plugin: dict[str, Any], **top: Any) -> dict[str, Any]:
    return proxy_config(upstream.url, plugins=[{"rate_limit": plugin}], top=top)


def burst_of(port: int, n: int, headers: Sequence[tuple[str, str]] = ()) -> list[Response]:
    """``n`` requests at once, each on its own connection."""
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(request, port, "GET", f"/r{i}", list(headers)) for i in range(n)]
        return [f.result() for f in futures]


def wait_listening(gw: GatewayProcess) -> None:
    deadline = time.monotonic() + 15
    while '"listening"' not in gw.logs() and "listening" not in gw.logs():
        assert gw.alive() and time.monotonic() < deadline, gw.logs()
        time.sleep(0.05)


def test_two_workers_of_one_node_admit_exactly_the_limit(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    # Two gateway processes on one port (SO_REUSEPORT) sharing a run directory are two workers
    # of one node, as the supervisor starts them.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {"GATEWAY_RUN_DIR": str(run_dir)}
    config = limited(upstream, {"key": "route", "rate": "25/h"})
    port = free_port()
    workers = [start_gateway(config, port=port, extra_env=env, wait=(i == 0)) for i in range(2)]
    wait_listening(workers[1])
    responses = burst_of(port, 120)
    codes = [r.status for r in responses]
    assert codes.count(200) == 25, codes
    assert codes.count(429) == 95
    for r in responses:
        if r.status == 429:
            assert r.json()["error"]["code"] == "rate_limited"
            assert int(r.header("retry-after") or 0) >= 1
    assert all(w.alive() for w in workers)


def test_headers_follow_the_remaining_budget_request_by_request(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    gw = start_gateway(limited(upstream, {"rate": "4/h", "name": "hourly", "headers": "both"}))
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
