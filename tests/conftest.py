"""Shared fixtures: a real test upstream process and a factory of real gateway processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import GatewayProcess, UpstreamProcess
from tests.support.redis import RedisServer


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamProcess]:
    up = UpstreamProcess()
    yield up
    up.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server for the session (see tests/support/redis.py for its faults)."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, running and empty; restarted after a test that killed it,
    thawed after one that froze it."""
    if not redis_server.alive():
        redis_server.start()
    redis_server.flush()
    yield redis_server
    redis_server.thaw()
    if not redis_server.alive():
        redis_server.start()


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any] | str, **kw: Any) -> GatewayProcess:
        gw = GatewayProcess(config, tmp_path / f"gw{len(started)}", **kw)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def proxy_config(upstream_url: str, **route: Any) -> dict[str, Any]:
    """A one-route config sending everything to ``upstream_url``."""
    limits = route.pop("limits", None)
    upstream_extra = route.pop("upstream_extra", {})
    top = route.pop("top", {})
    config: dict[str, Any] = {
        "upstreams": {"backend": {"targets": [{"url": upstream_url}], **upstream_extra}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "backend", **route}],
        "log": {"level": "info"},
        **top,
    }
    if limits:
        config["limits"] = limits
    return config
