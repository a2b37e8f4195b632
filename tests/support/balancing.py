"""Helpers for load-balancing tests: a config over several upstream processes, and which
target served a response."""

from __future__ import annotations

from typing import Any

from tests.conftest import proxy_config
from tests.support.client import Conn
from tests.support.procs import UpstreamProcess


def lb_config(
    ups: list[UpstreamProcess], weights: list[int] | None = None, **upstream: Any
) -> dict[str, Any]:
    """``proxy_config`` with the ``backend`` upstream over ``ups`` (and its other keys)."""
    config = proxy_config(ups[0].url)
    config["upstreams"]["backend"] = {
        "targets": [
            {"url": u.url, "weight": w} for u, w in zip(ups, weights or [1] * len(ups), strict=True)
        ],
        **upstream,
    }
    return config


def served_by(resp_json: dict[str, Any]) -> str:
    """The target that answered: the echo shows the Host the gateway sent (host:port)."""
    return str(next(v for n, v in resp_json["headers"] if n.lower() == "host"))


def serving(port: int, n: int = 20) -> set[str]:
    """What served ``n`` requests in a row: targets' ``host:port``, or ``status NNN``."""
    out = set()
    with Conn(port) as c:
        for _ in range(n):
            resp = c.request("GET", "/echo")
            out.add(served_by(resp.json()) if resp.status == 200 else f"status {resp.status}")
            if resp.header("connection") == "close":
                break
    return out
