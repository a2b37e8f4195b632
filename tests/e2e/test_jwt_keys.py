"""JWKS fetching over real HTTP: the plugin (in this process, on the test's event loop) against
a real JWKS/discovery server on loopback (tests/support/jwks_server.py). Rotation, removal,
stale-if-error, single flight, the unknown-kid throttle, discovery, and header-borne key URLs
that must never be fetched. The same behaviours through a gateway process are in
test_jwt_gateway.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from gateway.plugin import Reply
from gateway.proxy.exchange import Exchange
from plugins.jwt import JwtPlugin
from plugins.jwt.config import JwksSettings, JwtConfig
from plugins.jwt.jwks import FETCHES, STALE, _refresh_in
from tests.support.exchange import make_exchange
from tests.support.jwks_server import JwksServer, ec_key, mint, public_jwk, rsa_key

RSA = rsa_key()
RSA_JWK = public_jwk(RSA, "k1")


@pytest.fixture
def server() -> Iterator[JwksServer]:
    s = JwksServer()
    s.set_keys(RSA_JWK)
    yield s
    s.stop()


@pytest.fixture
async def make_plugin() -> AsyncIterator[Callable[..., Awaitable[JwtPlugin]]]:
    started: list[JwtPlugin] = []

    async def make(server: JwksServer, **cfg: Any) -> JwtPlugin:
        conf: dict[str, Any] = {"issuer": server.issuer, "jwks_url": server.jwks_url}
        conf.update(cfg)
        p = JwtPlugin(JwtConfig.model_validate(conf))
        p.route_name = "keys"
        await p.start()
        started.append(p)
        return p

    yield make
    for p in started:
        await p.stop()


def exchange(token: str) -> Exchange:
    return make_exchange([(b"Authorization", b"Bearer " + token.encode())], route=None)


async def run(p: JwtPlugin, token: str) -> Reply | None:
    """The hook's result, awaiting it when it waits for a refetch."""
    result = p.on_request(exchange(token))
    if result is not None and not isinstance(result, Reply):
        result = await result
    return result


def tok(server: JwksServer, key: Any = RSA, kid: str = "k1", alg: str = "RS256", **c: Any) -> str:
    return mint(key, alg, kid=kid, iss=server.issuer, sub="alice", **c)


async def until(predicate: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + 10.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# -- tests -----------------------------------------------------------------------------------
async def test_keys_are_loaded_at_start(server: JwksServer, make_plugin: Any) -> None:
    p = await make_plugin(server)
    assert server.hits("/jwks") == 1
    status = p.status()
    assert status["ready"] is True
    assert status["issuers"][server.issuer]["kids"] == ["k1"]
    assert await run(p, tok(server)) is None


async def test_new_kid_passes_after_exactly_one_refetch(
    server: JwksServer, make_plugin: Any
) -> None:
    p = await make_plugin(server)
    new = ec_key()
    server.set_keys(RSA_JWK, public_jwk(new, "k2"))
    token = tok(server, new, "k2", "ES256")
    results = await asyncio.gather(*(run(p, token) for _ in range(50)))  # single flight
    assert results == [None] * 50
    assert server.hits("/jwks") == 2
    assert await run(p, token) is None and server.hits("/jwks") == 2


async def test_removed_key_fails_after_the_refresh_that_removed_it(
    server: JwksServer, make_plugin: Any
) -> None:
    server.max_age = 0  # refresh as often as min_refresh allows
    p = await make_plugin(server, jwks={"min_refresh": "100ms", "unknown_kid_throttle": "1h"})
    token = tok(server)
    assert await run(p, token) is None
    assert len(p.cache) == 1  # verified and cached
    new = ec_key()
    server.set_keys(public_jwk(new, "k2"))
    fetched = server.hits("/jwks")
    await until(lambda: server.hits("/jwks") > fetched + 1, "a refresh")
    assert len(p.cache) == 0  # the cached token went with its key
    reply = await run(p, token)
    assert isinstance(reply, Reply) and reply.status == 401
    assert await run(p, tok(server, new, "k2", "ES256")) is None


async def test_endpoint_down_keeps_the_last_good_keys(server: JwksServer, make_plugin: Any) -> None:
    p = await make_plugin(
        server, jwks={"refresh": "100ms", "min_refresh": "100ms", "retry": "100ms"}
    )
    errors = FETCHES.labels(server.issuer, "error")
    before = errors.value
    server.down = True
    fetched = server.hits("/jwks")
    # The server counts a fetch when it arrives, the plugin its failure when the 503 is read:
    # wait for the counter, not the hits.
    await until(lambda: errors.value - before >= 2, "failed refreshes")
    assert server.hits("/jwks") >= fetched + 2
    status = p.status()["issuers"][server.issuer]
    assert status["stale"] is True and "HTTP 503" in status["last_error"]
    assert STALE.labels(server.issuer).value == 1
    assert await run(p, tok(server)) is None  # stale-if-error
    server.down = False
    await until(lambda: not p.status()["issuers"][server.issuer]["stale"], "recovery")
    assert STALE.labels(server.issuer).value == 0


async def test_bogus_kids_cause_at_most_one_fetch_per_throttle_window(
    server: JwksServer, make_plugin: Any
) -> None:
    p = await make_plugin(server, jwks={"unknown_kid_throttle": "1h"})
    assert server.hits("/jwks") == 1
    bogus = tok(server, rsa_key("attacker"), "bogus")
    results = await asyncio.gather(*(run(p, bogus) for _ in range(1000)))
    assert all(isinstance(r, Reply) and r.status == 401 for r in results)
    assert server.hits("/jwks") == 2  # the startup fetch and one refetch
    # other unknown kids in the same window: no fetch either
    for i in range(20):
        assert isinstance(await run(p, tok(server, RSA, f"other{i}")), Reply)
    assert server.hits("/jwks") == 2
    assert p.status()["issuers"][server.issuer]["unknown_kid_refetches"] == 1


async def test_throttle_window_allows_the_next_refetch(
    server: JwksServer, make_plugin: Any
) -> None:
    p = await make_plugin(server, jwks={"unknown_kid_throttle": "200ms"})
    bogus = tok(server, RSA, "bogus")
    assert isinstance(await run(p, bogus), Reply)
    assert server.hits("/jwks") == 2
    assert isinstance(await run(p, bogus), Reply)  # negatively cached: no fetch
    assert server.hits("/jwks") == 2
    await asyncio.sleep(0.25)  # the window is over (a lower bound, not a timing assertion)
    new = ec_key()
    server.set_keys(RSA_JWK, public_jwk(new, "k3"))
    assert await run(p, tok(server, new, "k3", "ES256")) is None
    assert server.hits("/jwks") == 3


async def test_discovery_finds_the_jwks(server: JwksServer, make_plugin: Any) -> None:
    p = await make_plugin(server, jwks_url=None, discovery=True)
    assert server.hits("/.well-known/openid-configuration") == 1
    assert server.hits("/jwks") == 1
    assert await run(p, tok(server)) is None


async def test_discovery_with_a_different_issuer_is_refused(make_plugin: Any) -> None:
    liar = JwksServer(issuer="https://someone-else.example/")
    try:
        conf = {"jwks": {"startup_timeout": "2s"}, "jwks_url": None, "discovery": True}
        p = await make_plugin(liar, issuer=liar.url, **conf)
        status = p.status()
        assert status["ready"] is False
        assert "differs" in status["issuers"][liar.url]["last_error"]
        assert liar.hits("/jwks") == 0
    finally:
        liar.stop()


async def test_start_with_the_endpoint_down_is_bounded_then_recovers(
    server: JwksServer, make_plugin: Any
) -> None:
    server.down = True
    p = await make_plugin(
        server, jwks={"startup_timeout": "2s", "retry": "100ms", "unknown_kid_throttle": "1h"}
    )
    assert p.status()["ready"] is False
    reply = await run(p, tok(server))
    assert isinstance(reply, Reply) and reply.status == 503 and reply.code == "jwks_unavailable"
    server.down = False
    await until(lambda: p.status()["ready"], "the retry")
    assert await run(p, tok(server)) is None


async def test_jku_x5u_x5c_jwk_headers_are_never_fetched(
    server: JwksServer, make_plugin: Any
) -> None:
    listener = JwksServer()
    attacker = rsa_key("attacker")
    listener.set_keys(public_jwk(attacker, "k1"))
    try:
        p = await make_plugin(server)
        for headers in (
            {"jku": listener.jwks_url},
            {"x5u": listener.url + "/cert.pem"},
            {"jwk": public_jwk(attacker, "k1")},
            {"x5c": ["MIIB"], "jku": listener.jwks_url, "x5u": listener.url},
        ):
            token = mint(attacker, "RS256", kid="k1", iss=server.issuer, headers=headers)
            reply = await run(p, token)
            assert isinstance(reply, Reply) and reply.status == 401
            unknown = mint(attacker, "RS256", kid="zz", iss=server.issuer, headers=headers)
            assert isinstance(await run(p, unknown), Reply)
        await asyncio.sleep(0.1)  # let any (wrong) background fetch reach the listener
        assert listener.hits() == 0 and listener.connections == 0
    finally:
        listener.stop()


async def test_routes_naming_the_same_issuer_share_one_fetcher(
    server: JwksServer, make_plugin: Any
) -> None:
    a = await make_plugin(server)
    b = await make_plugin(server)
    assert a.issuers[server.issuer].keys is b.issuers[server.issuer].keys
    assert server.hits("/jwks") == 1


def test_cache_control_max_age_is_clamped() -> None:
    s = JwksSettings(refresh=600, min_refresh=60, max_refresh=3600)
    assert _refresh_in("public, max-age=300", s) == 300
    assert _refresh_in("max-age=5", s) == 60
    assert _refresh_in("max-age=999999", s) == 3600
    assert _refresh_in("no-store", s) == 60
    assert _refresh_in(None, s) == 600
