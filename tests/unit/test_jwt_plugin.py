"""The jwt plugin's request hook without sockets: static keys, an injected clock, a bare
Exchange. Covers config validation, token sources, the verified-token cache, forwarding,
identity, error replies (RFC 6750 challenges) and the awaitable returned on an unknown kid."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from gateway.plugin import Reply
from gateway.proxy.chain import Chain
from gateway.proxy.exchange import Exchange
from plugins.jwt import JwtPlugin
from plugins.jwt.config import JwtConfig
from tests.support.exchange import make_exchange
from tests.support.jwks_server import ec_key, ed_key, mint, public_jwk, rsa_key

ISS = "https://idp.example/"
NOW = 1_800_000_000.0
RSA = rsa_key()
EC = ec_key()
ED = ed_key()
SECRET = "s" * 64


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def plugin(clock: Clock | None = None, **cfg: Any) -> JwtPlugin:
    base: dict[str, Any] = {
        "issuer": ISS,
        "audience": "orders",
        "keys": [
            {"jwk": public_jwk(RSA, "rsa1")},
            {"jwk": public_jwk(EC, "ec1")},
            {"jwk": public_jwk(ED, "ed1")},
        ],
    }
    base.update(cfg)
    return JwtPlugin(JwtConfig.model_validate(base), clock=clock or Clock())


def token(key: Any = RSA, alg: str = "RS256", kid: str | None = "rsa1", **claims: Any) -> str:
    claims.setdefault("iss", ISS)
    claims.setdefault("aud", "orders")
    claims.setdefault("sub", "alice")
    return mint(key, alg, kid=kid, now=NOW, **claims)


def exchange(
    headers: list[tuple[bytes, bytes]] | None = None, method: bytes = b"GET", query: bytes = b""
) -> Exchange:
    return make_exchange(headers, method=method, query=query)


def bearer(tok: str, *more: tuple[bytes, bytes]) -> Exchange:
    return exchange([(b"Authorization", b"Bearer " + tok.encode()), *more])


def challenge(reply: Any) -> str:
    assert isinstance(reply, Reply)
    values = [v.decode() for n, v in reply.headers if n.lower() == b"www-authenticate"]
    assert len(values) == 1
    return values[0]


# -- config ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({}, "issuer required"),
        ({"issuer": ISS}, "exactly one key source"),
        ({"issuer": ISS, "jwks_url": "ftp://x"}, "http:// or https://"),
        ({"issuer": ISS, "jwks_url": "http://x", "algorithms": ["none"]}, "never accepted"),
        ({"issuer": ISS, "jwks_url": "http://x", "algorithms": ["HS256"]}, "no secret key"),
        ({"issuer": ISS, "keys": [{"secret": "short"}], "algorithms": ["HS256"]}, "32 bytes"),
        ({"issuer": ISS, "keys": [{"secret": "s" * 40}], "algorithms": ["HS512"]}, "64 bytes"),
        ({"issuer": ISS, "keys": [{"secret": SECRET}]}, "no HS256"),
        ({"issuer": ISS, "keys": [{"pem": "nope"}]}, "expected a PEM"),
        ({"issuer": ISS, "keys": [{"file": "/nonexistent/k.pem"}]}, "cannot read"),
        ({"issuer": ISS, "keys": [{"pem": "x", "secret": "y"}]}, "exactly one of"),
        ({"issuer": "x", "discovery": True}, "discovery needs"),
        ({"issuer": ISS, "jwks_url": "http://x", "forward_claims": {"sub": "bad name"}}, "valid"),
        ({"issuer": ISS, "jwks_url": "http://x", "forward_claims": {"sub": "Host"}}, "managed"),
        ({"issuer": ISS, "jwks_url": "http://x", "token": {"from": "cookie"}}, "needs a name"),
        ({"issuer": ISS, "jwks_url": "http://x", "claims": {"r": {}}}, "exactly one of"),
        ({"issuer": ISS, "jwks_url": "http://x", "issuers": []}, None),
        ({"issuers": [{"issuer": ISS, "jwks_url": "http://x"}] * 2}, "listed twice"),
        ({"issuer": ISS, "jwks_url": "http://x", "jwks": {"min_refresh": "48h"}}, "min_refresh"),
        ({"issuer": ISS, "jwks_url": "http://x", "typo": 1}, "Extra inputs"),
    ],
)
def test_config_errors(cfg: dict[str, Any], message: str | None) -> None:
    if message is None:
        JwtConfig.model_validate(cfg)
        return
    with pytest.raises(ValidationError, match=message):
        JwtConfig.model_validate(cfg)


def test_keys_from_files_pem_and_jwk(tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        EC.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    jwk = tmp_path / "k.json"
    jwk.write_text(json.dumps(public_jwk(RSA, "rsa1")))
    p = plugin(keys=[{"file": str(pem), "kid": "ec1"}, {"file": str(jwk)}])
    assert p.on_request(bearer(token())) is None
    assert p.on_request(bearer(token(EC, "ES256", "ec1"))) is None


def test_the_plugin_is_a_builtin() -> None:
    from gateway.plugin import default_registry

    assert default_registry().get("jwt") is JwtPlugin


# -- verification through the hook ------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [(RSA, "RS256", "rsa1"), (RSA, "PS512", "rsa1"), (EC, "ES256", "ec1"), (ED, "EdDSA", "ed1")],
)
def test_valid_tokens_pass_and_set_identity(key: Any, alg: str, kid: str) -> None:
    p = plugin()
    ex = bearer(token(key, alg, kid, scope="a b"))
    assert p.on_request(ex) is None
    assert ex.user == "alice"
    assert ex.var("jwt.claims")["scope"] == "a b"
    assert ex.notes == {"jwt": "verified"}


def test_hmac_issuer_and_several_issuers() -> None:
    p = plugin(
        issuer=None,
        audience=None,
        keys=None,
        issuers=[
            {"issuer": "hs", "keys": [{"secret": SECRET, "kid": "h"}], "algorithms": ["HS384"]},
            {"issuer": ISS, "keys": [{"jwk": public_jwk(EC, "ec1")}], "audience": ["x", "y"]},
        ],
    )
    assert p.on_request(bearer(token(SECRET, "HS384", "h", iss="hs"))) is None
    assert p.on_request(bearer(token(EC, "ES256", "ec1", aud=["y"]))) is None
    # each issuer's keys and algorithms are its own
    r = p.on_request(bearer(token(SECRET, "HS384", "h", iss=ISS, aud="y")))
    assert isinstance(r, Reply) and r.status == 401
    r = p.on_request(bearer(token(SECRET, "HS256", "h", iss="hs")))
    assert 'error_description="the token\'s algorithm is not allowed"' in challenge(r)
    r = p.on_request(bearer(token(EC, "ES256", "ec1", iss="elsewhere")))
    assert "issuer" in challenge(r)


@pytest.mark.parametrize(
    ("claims", "description"),
    [
        ({"exp": NOW - 100}, "the token has expired"),
        ({"nbf": NOW + 100}, "the token is not valid yet"),
        ({"iss": "https://other/"}, "the token's issuer is not accepted"),
        ({"aud": "billing"}, "the token is not meant for this audience"),
    ],
)
def test_invalid_tokens_get_401_with_an_rfc6750_challenge(
    claims: dict[str, Any], description: str
) -> None:
    p = plugin()
    if "exp" in claims:
        tok = mint(RSA, "RS256", kid="rsa1", now=NOW - 400, ttl=300, iss=ISS, aud="orders")
    else:
        tok = token(**claims)
    ex = bearer(tok)
    reply = p.on_request(ex)
    assert isinstance(reply, Reply) and reply.status == 401 and reply.code == "invalid_token"
    assert challenge(reply) == (
        f'Bearer error="invalid_token", error_description="{description}"'.replace('"the', '"the')
    )
    assert ex.user is None and ex.var("jwt.claims") is None


def test_missing_token_gets_a_bare_challenge_and_anonymous_passes() -> None:
    for ex in (exchange(), exchange([(b"authorization", b"Basic dTpw")])):
        reply = plugin().on_request(ex)
        assert isinstance(reply, Reply) and reply.status == 401 and reply.code == "unauthorized"
        assert challenge(reply) == "Bearer"
        assert ex.notes == {"jwt": "missing"}
    ex = exchange([(b"X-User-Id", b"mallory")])
    anon = plugin(allow_anonymous=True, forward_claims={"sub": "x-user-id"})
    assert anon.on_request(ex) is None
    assert ex.user is None and ex.notes == {"jwt": "anonymous"}
    assert ex.headers.get(b"x-user-id") is None  # no identity, and no spoofed one either
    # a bad token is refused even when anonymous requests are allowed
    reply = plugin(allow_anonymous=True).on_request(bearer("a.b.c"))
    assert isinstance(reply, Reply) and reply.status == 401


def test_scopes_and_claim_matchers_get_403() -> None:
    p = plugin(
        scopes={"all_of": ["orders:read", "orders:write"]}, claims={"tier": {"in": ["gold"]}}
    )
    ok = bearer(token(scope="orders:read orders:write", tier="gold"))
    assert p.on_request(ok) is None
    reply = p.on_request(bearer(token(scope="orders:read", tier="gold")))
    assert isinstance(reply, Reply) and reply.status == 403 and reply.code == "insufficient_scope"
    assert challenge(reply).startswith('Bearer error="insufficient_scope"')
    assert challenge(reply).endswith('scope="orders:read orders:write"')
    reply = p.on_request(bearer(token(scope="orders:read orders:write", tier="silver")))
    assert isinstance(reply, Reply) and reply.status == 403


def test_cors_preflight_skips_the_check() -> None:
    preflight = exchange(
        [(b"Origin", b"https://a.example"), (b"Access-Control-Request-Method", b"GET")],
        method=b"OPTIONS",
    )
    assert plugin().on_request(preflight) is None
    assert isinstance(plugin().on_request(exchange(method=b"OPTIONS")), Reply)
    assert isinstance(plugin(skip_preflight=False).on_request(preflight), Reply)


# -- token sources ---------------------------------------------------------------------------
def test_token_from_header_cookie_and_query() -> None:
    tok = token().encode()
    p = plugin(token={"from": "header", "name": "X-Token"})
    assert p.on_request(exchange([(b"x-token", tok)])) is None
    p = plugin(token={"from": "cookie", "name": "at"}, forward_token=False)
    ex = exchange([(b"Cookie", b"a=1; at=" + tok + b"; b=2")])
    assert p.on_request(ex) is None
    assert ex.headers.get(b"cookie") == b"a=1; b=2"
    p = plugin(token={"from": "query", "name": "access_token"}, forward_token=False)
    ex = exchange(query=b"x=1&access_token=" + tok)
    assert p.on_request(ex) is None
    assert ex.query == b"x=1"
    assert isinstance(p.on_request(exchange(query=b"x=1")), Reply)


def test_bearer_scheme_is_case_insensitive_and_token_can_be_stripped() -> None:
    p = plugin(forward_token=False)
    ex = exchange([(b"authorization", b"bEaReR " + token().encode()), (b"x-other", b"1")])
    assert p.on_request(ex) is None
    assert ex.headers.get(b"authorization") is None and ex.headers.get(b"x-other") == b"1"


# -- forwarding ------------------------------------------------------------------------------
def test_claims_forwarded_and_client_copies_removed_first() -> None:
    p = plugin(forward_claims={"sub": "X-User-Id", "groups": "x-groups", "n": "x-n", "bad": "x-b"})
    tok = token(groups=["a", "b"], n=3, bad="evil\r\nx-injected: 1")
    for _ in range(2):  # the first request verifies, the second is a cache hit
        ex = bearer(tok, (b"x-user-id", b"spoofed"), (b"X-User-Id", b"spoofed2"), (b"x-b", b"no"))
        assert p.on_request(ex) is None
        assert ex.headers.get_all(b"x-user-id") == [b"alice"]
        assert ex.headers.get(b"x-groups") == b"a,b"
        assert ex.headers.get(b"x-n") == b"3"
        assert ex.headers.get(b"x-b") is None  # a value that could split headers is not sent
        assert ex.headers.get(b"authorization") is not None  # forwarded by default
    assert ex.notes == {"jwt": "cached"}


# -- the verified-token cache ----------------------------------------------------------------
def test_cache_hit_skips_verification_and_never_outlives_exp() -> None:
    clock = Clock()
    p = plugin(clock=clock)
    tok = token(exp=NOW + 60)
    assert p.on_request(bearer(tok)) is None
    assert len(p.cache) == 1
    # a cached entry answers without the key: prove it by emptying the key set
    keys = p.issuers[ISS].keys.keyset
    p.issuers[ISS].keys.keyset = type(keys)([])  # type: ignore[misc]
    ex = bearer(tok)
    assert p.on_request(ex) is None and ex.notes == {"jwt": "cached"} and ex.user == "alice"
    p.issuers[ISS].keys.keyset = keys
    clock.now = NOW + 60  # exp reached: the entry is gone, the token re-verified (leeway 30 s)
    ex = bearer(tok)
    assert p.on_request(ex) is None and ex.notes == {"jwt": "verified"}
    assert len(p.cache) == 0  # past exp: not cached again
    clock.now = NOW + 91
    reply = p.on_request(bearer(tok))
    assert isinstance(reply, Reply) and "expired" in challenge(reply)


def test_cache_is_bounded_lru_and_can_be_disabled() -> None:
    p = plugin(cache={"max_entries": 2})
    toks = [token(jti=str(i)) for i in range(3)]
    for t in toks[:2]:
        p.on_request(bearer(t))
    p.on_request(bearer(toks[0]))  # toks[0] is now the most recent
    p.on_request(bearer(toks[2]))  # evicts toks[1]
    assert list(p.cache.entries) == [b"Bearer " + toks[0].encode(), b"Bearer " + toks[2].encode()]
    off = plugin(cache={"max_entries": 0})
    off.on_request(bearer(toks[0]))
    assert len(off.cache) == 0


def test_removed_key_drops_its_cache_entries() -> None:
    p = plugin()
    p.on_request(bearer(token()))
    p.on_request(bearer(token(EC, "ES256", "ec1")))
    rsa_thumb = p.issuers[ISS].keys.keyset.by_kid["rsa1"].thumb  # type: ignore[union-attr]
    p._keys_removed(frozenset({rsa_thumb}))
    assert len(p.cache) == 1


def test_rejections_are_counted_by_route_and_reason() -> None:
    from plugins.jwt import REJECTIONS

    malformed, missing = (
        REJECTIONS.labels("orders", "malformed"),
        REJECTIONS.labels("orders", "missing"),
    )
    before = (malformed.value, missing.value)  # the in-process counts, not yet flushed
    p = plugin()
    for _ in range(3):
        p.on_request(bearer("garbage"))
    p.on_request(exchange())
    assert (malformed.value - before[0], missing.value - before[1]) == (3, 1)


# -- an unknown kid: the awaitable, and the chain that runs it ----------------------------------
class _WaitingKeys:
    """A key source whose refetch the test completes by hand."""

    remote = True

    def __init__(self, keyset: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.keyset = keyset
        self.future: asyncio.Future[None] = loop.create_future()
        self.asked = 0
        self.remembered: list[str | None] = []

    def refetch_for(self, kid: str | None) -> asyncio.Future[None] | None:
        self.asked += 1
        return None if self.future.done() else self.future

    def remember_unknown(self, kid: str | None) -> None:
        self.remembered.append(kid)


async def test_unknown_kid_waits_for_the_refetch_through_the_chain() -> None:
    p = plugin()
    old = p.issuers[ISS].keys
    waiting = _WaitingKeys(old.keyset, asyncio.get_running_loop())
    p.issuers[ISS].keys = waiting  # type: ignore[assignment]
    chain = Chain([p])
    new_key = ec_key()
    ex = bearer(token(new_key, "ES256", "ec2"))
    pending = chain.run_request(ex)
    assert pending is not None and not isinstance(pending, Reply)
    task = asyncio.ensure_future(pending)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert not task.done()  # waiting on the refetch
    from plugins.jwt.keys import KeySet, parse_jwk_dict

    waiting.keyset = KeySet([*old.keyset.keys, parse_jwk_dict(public_jwk(new_key, "ec2"))])  # type: ignore[union-attr]
    waiting.future.set_result(None)
    assert await task is None
    assert ex.user == "alice" and ex.plugins_ran == 1
    # still unknown after the refetch: refused, and remembered
    bogus = bearer(token(ec_key(), "ES256", "nope"))
    reply = chain.run_request(bogus)
    assert isinstance(reply, Reply) and "not known" in challenge(reply)


async def test_unknown_kid_wait_is_bounded() -> None:
    p = plugin(keys=None, jwks_url="http://127.0.0.1:9/jwks", jwks={"unknown_kid_wait": "50ms"})
    waiting = _WaitingKeys(None, asyncio.get_running_loop())
    p.issuers[ISS].keys = waiting  # type: ignore[assignment]
    pending = p.on_request(bearer(token()))
    assert pending is not None and not isinstance(pending, Reply)
    reply = await pending  # type: ignore[misc]
    assert isinstance(reply, Reply) and reply.status == 503 and reply.code == "jwks_unavailable"
