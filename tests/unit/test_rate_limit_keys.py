"""Key extraction: client ip, route, header, API key (hashed), JWT subject and claims (as an
auth plugin sets them on the exchange), composites, and the missing-key policy."""

from __future__ import annotations

import asyncio

import pytest

from gateway import state
from gateway.config.model import StateConfig
from gateway.plugin import Reply
from gateway.proxy.exchange import Exchange
from plugins.rate_limit import RateLimitConfig, RateLimitPlugin
from plugins.rate_limit.keys import compile_key
from tests.support.exchange import make_exchange


def exchange(headers: dict[str, str] | None = None, **attrs: object) -> Exchange:
    ex = make_exchange(
        [(n.encode(), v.encode()) for n, v in (headers or {}).items()], client_ip="192.0.2.7"
    )
    for name, value in attrs.items():
        setattr(ex, name, value)
    return ex


def test_parts() -> None:
    ex = exchange({"X-Tenant": "acme", "X-Api-Key": "secret"}, user="alice")
    ex.set_var("jwt.claims", {"sub": "alice", "org": "acme", "tier": 3})
    assert compile_key("ip")[0](ex) == "192.0.2.7"
    assert compile_key("route")[0](ex) == "orders"
    assert compile_key("header:x-tenant")[0](ex) == "acme"
    assert compile_key("jwt:sub")[0](ex) == "alice"
    assert compile_key("jwt:org")[0](ex) == "acme"
    assert compile_key("jwt:tier")[0](ex) == "3"
    hashed = compile_key("api_key")[0](ex)
    assert hashed is not None and "secret" not in hashed and len(hashed) == 24
    assert compile_key(["jwt:sub", "header:x-tenant"])[0](ex) == "alice\x1facme"


def test_missing_parts_are_none() -> None:
    ex = exchange()
    for spec in ("header:x-tenant", "api_key", "jwt:sub", "jwt:org", ["ip", "jwt:sub"]):
        assert compile_key(spec)[0](ex) is None, spec


@pytest.fixture
def memory_state() -> None:
    state.use_config(StateConfig())


def plugin(**config: object) -> RateLimitPlugin:
    p = RateLimitPlugin(RateLimitConfig(**config))  # type: ignore[arg-type]
    p.route_name = "orders"
    asyncio.run(p.start())
    return p


def test_jwt_subject_keys_separate_users(memory_state: None) -> None:
    p = plugin(key="jwt:sub", rate="1/h", scope="global", name="per-user-test")
    assert p.on_request(exchange(user="alice")) is None  # type: ignore[attr-defined]
    assert p.on_request(exchange(user="bob")) is None  # type: ignore[attr-defined]
    refused = p.on_request(exchange(user="alice"))  # type: ignore[attr-defined]
    assert isinstance(refused, Reply) and refused.status == 429
    asyncio.run(p.stop())


def test_missing_key_policy(memory_state: None) -> None:
    reject = plugin(key="jwt:org", rate="5/h", missing_key="reject")
    reply = reject.on_request(exchange())  # type: ignore[attr-defined]
    assert isinstance(reply, Reply) and reply.status == 403
    assert "JWT claim org" in reply.message
    shared = plugin(key="jwt:org", rate="1/h", missing_key="shared", name="shared-test")
    assert shared.on_request(exchange()) is None  # type: ignore[attr-defined]
    assert shared.on_request(exchange()).status == 429  # type: ignore[attr-defined,union-attr]
    for p in (reject, shared):
        asyncio.run(p.stop())
