"""Active health checks against real upstream processes: a failing check takes a target out
of rotation and a passing one brings it back; when every target is down the upstream fails
open (panic) or fast, as configured; an ejected target returns on its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.balancing import lb_config, serving
from tests.support.client import request
from tests.support.procs import GatewayProcess, UpstreamProcess, wait_for

GatewayFactory = Callable[..., GatewayProcess]

CHECK = {"path": "/__health", "interval": "150ms", "timeout": "1s", "healthy": 2, "unhealthy": 2}


@pytest.fixture(scope="module")
def two() -> Iterator[list[UpstreamProcess]]:
    ups = [UpstreamProcess(), UpstreamProcess()]
    yield ups
    for u in ups:
        u.stop()


@pytest.fixture
def pair(two: list[UpstreamProcess]) -> list[UpstreamProcess]:
    """The module's two upstreams, healthy and serving normally."""
    for u in two:
        u.set_health(200)
        u.fail_with(0)
    return two


def config(ups: list[UpstreamProcess], **extra: Any) -> dict[str, Any]:
    return lb_config(
        ups, health_check=CHECK, outlier_detection={"consecutive_failures": 0}, **extra
    )


def test_health_checks_drive_state_both_ways(
    start_gateway: GatewayFactory, pair: list[UpstreamProcess]
) -> None:
    a, b = pair
    gw = start_gateway(config(pair))
    both = {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}
    assert serving(gw.port) == both
    a.set_health(503)  # still serves traffic, but its check fails: out of rotation
    wait_for(lambda: serving(gw.port) == {f"127.0.0.1:{b.port}"}, "a to be taken out", 20)
    messages = [r.get("msg") for r in gw.log_records()]
    assert "target unhealthy" in messages
    a.set_health(200)
    wait_for(lambda: serving(gw.port) == both, "a to come back", 20)
    assert "target healthy" in [r.get("msg") for r in gw.log_records()]


def test_all_down_panic_fails_open(
    start_gateway: GatewayFactory, pair: list[UpstreamProcess]
) -> None:
    gw = start_gateway(config(pair))
    for u in pair:
        u.set_health(500)
    wait_for(
        lambda: [r.get("msg") for r in gw.log_records()].count("target unhealthy") == 2,
        "both targets down",
        20,
    )
    # panic: every target gets traffic, nobody gets an error
    assert len(serving(gw.port)) == 2


def test_all_down_fail_fast(start_gateway: GatewayFactory, pair: list[UpstreamProcess]) -> None:
    gw = start_gateway(config(pair, all_down="fail_fast"))
    for u in pair:
        u.set_health(500)

    def refused() -> bool:
        resp = request(gw.port, "GET", "/echo")
        return resp.status == 503 and resp.json()["error"]["code"] == "no_healthy_upstream"

    wait_for(refused, "503 no_healthy_upstream", 20)
    pair[1].set_health(200)
    wait_for(lambda: serving(gw.port) == {f"127.0.0.1:{pair[1].port}"}, "recovery", 20)


def test_ejected_target_returns_without_active_checks(
    start_gateway: GatewayFactory, pair: list[UpstreamProcess]
) -> None:
    a, b = pair
    gw = start_gateway(
        lb_config(
            pair,
            outlier_detection={"consecutive_failures": 2, "base_ejection": "500ms"},
            retries={"attempts": 1},
        )
    )
    a.fail_with(502)
    wait_for(lambda: serving(gw.port, 4) == {f"127.0.0.1:{b.port}"}, "a ejected", 20)
    assert "target ejected" in [r.get("msg") for r in gw.log_records()]
    a.fail_with(0)
    wait_for(
        lambda: serving(gw.port) == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"},
        "a back after its ejection",
        20,
    )
