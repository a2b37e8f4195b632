"""The jwt plugin through a real gateway process: real client sockets, the real test upstream,
and real JWKS servers on loopback (rotated, emptied and taken down by the tests)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.e2e.test_plugins import wait_for
from tests.support.client import Conn, Response, request
from tests.support.jwks_server import JwksServer, ec_key, mint, public_jwk, rsa_key
from tests.support.procs import GatewayProcess, UpstreamProcess, wait_for_port

RSA = rsa_key()


@pytest.fixture(scope="module")
def idp() -> Iterator[JwksServer]:
    s = JwksServer()
    s.set_keys(public_jwk(RSA, "k1"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rotating() -> Iterator[JwksServer]:
    s = JwksServer()
    s.set_keys(public_jwk(RSA, "r1"))
    s.max_age = 0  # refreshed every min_refresh
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess,
    idp: JwksServer,
    rotating: JwksServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    def jwt(server: JwksServer, **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "issuer": server.issuer,
            "audience": "orders",
            "jwks_url": server.jwks_url,
            "jwks": {"unknown_kid_throttle": "1h"},
            "forward_claims": {"sub": "X-User-Id", "tenant": "x-tenant"},
        }
        conf.update(extra)
        return {"jwt": conf}

    def route(name: str, plugin: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path_prefix": f"/{name}"},
            "upstream": "backend",
            "plugins": [plugin],
        }

    fast = {"min_refresh": "200ms", "retry": "200ms", "unknown_kid_throttle": "1h"}
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [
            route("api", jwt(idp)),
            route("scoped", jwt(idp, scopes={"all_of": ["orders:write"]})),
            route("anon", jwt(idp, allow_anonymous=True)),
            route("strip", jwt(idp, forward_token=False)),
            route("rotating", jwt(rotating, jwks=fast)),
        ],
        "log": {"level": "info"},
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("jwt"))
    yield g
    g.stop()


def token(server: JwksServer, key: Any = RSA, kid: str = "k1", alg: str = "RS256", **c: Any) -> str:
    c.setdefault("aud", "orders")
    return mint(key, alg, kid=kid, iss=server.issuer, sub="alice", **c)


def get(gw: GatewayProcess, path: str, tok: str | None, *headers: tuple[str, str]) -> Response:
    hdrs = list(headers)
    if tok is not None:
        hdrs.append(("Authorization", f"Bearer {tok}"))
    return request(gw.port, "GET", path, headers=hdrs)


def upstream_headers(resp: Response) -> list[tuple[str, str]]:
    return [(n.lower(), v) for n, v in resp.json()["headers"]]


def test_valid_token_reaches_the_upstream_with_identity_headers(
    gw: GatewayProcess, idp: JwksServer
) -> None:
    resp = get(gw, "/api/echo", token(idp, tenant="t1"), ("x-user-id", "mallory"))
    assert resp.status == 200
    seen = upstream_headers(resp)
    assert [v for n, v in seen if n == "x-user-id"] == ["alice"]  # the client's copy removed
    assert ("x-tenant", "t1") in seen
    assert any(n == "authorization" for n, _ in seen)
    # the same token again: a cache hit, same result
    resp = get(gw, "/api/echo", token(idp, tenant="t1"))
    assert resp.status == 200 and ("x-user-id", "alice") in upstream_headers(resp)


def test_missing_and_bad_tokens_get_401_json_and_a_challenge(
    gw: GatewayProcess, idp: JwksServer, upstream: UpstreamProcess
) -> None:
    resp = get(gw, "/api/echo", None)
    assert resp.status == 401
    assert resp.header("www-authenticate") == "Bearer"
    body = resp.json()["error"]
    assert body["code"] == "unauthorized" and body["request_id"] == resp.header("x-request-id")
    expired = mint(RSA, "RS256", kid="k1", iss=idp.issuer, aud="orders", ttl=-120)
    for tok, description in [
        (expired, "the token has expired"),
        (token(idp, aud="billing"), "the token is not meant for this audience"),
        (token(idp, nbf=int(time.time()) + 3600), "the token is not valid yet"),
        ("not-a-token", "the token is not a well-formed JWS compact serialization"),
    ]:
        resp = get(gw, "/api/echo", tok)
        assert resp.status == 401
        assert resp.header("www-authenticate") == (
            f'Bearer error="invalid_token", error_description="{description}"'
        )
        assert resp.json()["error"]["code"] == "invalid_token"


def test_missing_scope_gets_403(gw: GatewayProcess, idp: JwksServer) -> None:
    resp = get(gw, "/scoped/echo", token(idp, scope="orders:read"))
    assert resp.status == 403
    assert (resp.header("www-authenticate") or "").startswith('Bearer error="insufficient_scope"')
    assert resp.json()["error"]["code"] == "insufficient_scope"
    assert get(gw, "/scoped/echo", token(idp, scope="orders:read orders:write")).status == 200


def test_anonymous_and_token_stripping(gw: GatewayProcess, idp: JwksServer) -> None:
    resp = get(gw, "/anon/echo", None, ("X-User-Id", "mallory"))
    assert resp.status == 200
    assert ("x-user-id", "mallory") not in upstream_headers(resp)
    assert get(gw, "/anon/echo", "junk").status == 401
    resp = get(gw, "/strip/echo", token(idp))
    assert resp.status == 200
    assert not [n for n, _ in upstream_headers(resp) if n == "authorization"]


def test_oversized_tokens_are_refused_before_the_upstream(
    gw: GatewayProcess, idp: JwksServer, upstream: UpstreamProcess
) -> None:
    upstream.reset()
    big = token(idp, pad="x" * 20_000)  # under the header limit, over max_token_size
    resp = get(gw, "/api/echo", big)
    assert resp.status == 401 and "too large" in (resp.header("www-authenticate") or "")
    huge = token(idp, pad="x" * 100_000)  # over the header limit: the parser refuses it first
    assert get(gw, "/api/echo", huge).status in (401, 431)
    assert upstream.received() == []


def test_attack_tokens_through_the_gateway(
    gw: GatewayProcess, idp: JwksServer, upstream: UpstreamProcess
) -> None:
    import base64
    import hashlib
    import hmac
    import json

    from cryptography.hazmat.primitives import serialization

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = b64(json.dumps({"iss": idp.issuer, "aud": "orders", "sub": "root",
                             "exp": int(time.time()) + 300}).encode())  # fmt: skip
    pem = RSA.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_head = b64(b'{"alg":"HS256","kid":"k1"}')
    confused = f"{hs_head}.{claims}." + b64(
        hmac.new(pem, f"{hs_head}.{claims}".encode(), hashlib.sha256).digest()
    )
    es_head = b64(b'{"alg":"ES256","kid":"k1"}')
    upstream.reset()
    attacks = [
        *(f"{b64(json.dumps({'alg': a}).encode())}.{claims}." for a in ("none", "None", "NONE")),
        confused,
        f"{es_head}.{claims}.{b64(bytes(64))}",  # ECDSA r = s = 0
        token(idp, rsa_key("attacker")),  # known kid, unknown key
        token(idp)[:-8] + "AAAAAAAA",  # signature bytes changed
        "%%%.@@@.###",
    ]
    for tok in attacks:
        assert get(gw, "/api/echo", tok).status == 401, tok
    assert upstream.received() == []


def test_bogus_kids_cause_at_most_one_fetch(gw: GatewayProcess, idp: JwksServer) -> None:
    before = idp.hits("/jwks")
    bogus = token(idp, rsa_key("attacker"), "bogus-kid")
    with Conn(gw.port) as c:
        for _ in range(1000):
            resp = c.request("GET", "/api/echo", [("Authorization", f"Bearer {bogus}")])
            assert resp.status == 401
    assert idp.hits("/jwks") - before <= 1  # the throttle window is an hour


def test_rotation_new_kid_passes_and_removed_key_fails(
    gw: GatewayProcess, rotating: JwksServer
) -> None:
    old = token(rotating, kid="r1")
    assert get(gw, "/rotating/echo", old).status == 200
    new_key = ec_key()
    rotating.set_keys(public_jwk(RSA, "r1"), public_jwk(new_key, "r2"))
    new = token(rotating, new_key, "r2", "ES256")
    assert get(gw, "/rotating/echo", new).status == 200  # at most one refetch away
    rotating.set_keys(public_jwk(new_key, "r2"))  # r1 removed
    fetched = rotating.hits("/jwks")
    wait_for(lambda: rotating.hits("/jwks") >= fetched + 2, "refreshes")
    assert get(gw, "/rotating/echo", old).status == 401  # cached, but its key is gone
    assert get(gw, "/rotating/echo", new).status == 200


def test_endpoint_down_keeps_cached_keys_working(gw: GatewayProcess, rotating: JwksServer) -> None:
    key = ec_key()
    rotating.set_keys(public_jwk(key, "d1"))
    tok = token(rotating, key, "d1", "ES256")
    wait_for(lambda: get(gw, "/rotating/echo", tok).status == 200, "the new key")
    rotating.down = True
    try:
        failed = rotating.hits("/jwks")
        wait_for(lambda: rotating.hits("/jwks") >= failed + 2, "failing refreshes")
        fresh = token(rotating, key, "d1", "ES256", jti="another")  # not cached: verified anew
        assert get(gw, "/rotating/echo", fresh).status == 200
        assert get(gw, "/rotating/echo", tok).status == 200
        assert "serving the previous keys" in gw.logs()
    finally:
        rotating.down = False


def test_rejections_metric_access_log_and_status(gw: GatewayProcess, idp: JwksServer) -> None:
    expired = mint(RSA, "RS256", kid="k1", iss=idp.issuer, aud="orders", ttl=-120)
    for _ in range(3):
        assert get(gw, "/api/expired-probe", expired).status == 401
    assert get(gw, "/api/ok-probe", token(idp)).status == 200
    pattern = re.compile(
        r'gateway_jwt_rejections_total\{(?=[^}]*route="api")(?=[^}]*reason="expired")[^}]*\} '
        r"([0-9.e+]+)"
    )

    def expired_count() -> float:
        m = pattern.search(gw.admin("GET", "/metrics").body.decode())
        return float(m.group(1)) if m else 0.0

    wait_for(lambda: expired_count() >= 3, "the rejection counter")
    records = wait_for(
        lambda: [r for r in gw.access_records() if r["path"].endswith("-probe")], "access log"
    )
    rejected = [r for r in records if r["path"] == "/api/expired-probe"]
    assert rejected and all(r["plugins"] == {"jwt": "expired"} for r in rejected)
    assert all(r["code"] == "invalid_token" and r["user"] is None for r in rejected)
    ok = wait_for(lambda: [r for r in gw.access_records() if r["path"] == "/api/ok-probe"], "ok")
    assert ok[0]["user"] == "alice" and ok[0]["plugins"]["jwt"] in ("verified", "cached")
    status = gw.admin("GET", "/status").json()
    jwt_status = [
        p
        for w in status["workers"]
        for p in w.get("plugins", [])
        if p["plugin"] == "jwt" and p["route"] == "api"
    ]
    assert jwt_status and jwt_status[0]["ready"] is True
    assert jwt_status[0]["issuers"][idp.issuer]["kids"] == ["k1"]


def test_readyz_waits_for_the_keys(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    idp = JwksServer()
    idp.down = True
    try:
        config = {
            "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
            "routes": [
                {
                    "name": "api",
                    "match": {"path_prefix": "/"},
                    "upstream": "backend",
                    "plugins": [
                        {
                            "jwt": {
                                "issuer": idp.issuer,
                                "jwks_url": idp.jwks_url,
                                "jwks": {"startup_timeout": "1s", "retry": "200ms"},
                            }
                        }
                    ],
                }
            ],
        }
        g = start_gateway(config, wait=False)  # it will not be ready: no keys

        def readyz() -> Response | None:
            try:
                return g.admin("GET", "/readyz", timeout=2.0)
            except OSError:
                return None  # the admin listener is not up yet

        # the worker started (its start() gave up waiting for the keys after 1 s) and serves,
        # but says it is not ready
        not_ready = wait_for(
            lambda: (r := readyz()) is not None and b"a plugin is not ready" in r.body and r,
            "the plugin's status",
            timeout=30,
        )
        assert not_ready.status == 503
        wait_for_port(g.port, g.proc)
        resp = get(g, "/echo", token(idp, aud=None))
        assert resp.status == 503 and resp.json()["error"]["code"] == "jwks_unavailable"
        idp.set_keys(public_jwk(RSA, "k1"))
        idp.down = False
        wait_for(lambda: g.admin("GET", "/readyz").status == 200, "readiness")
        assert get(g, "/echo", token(idp, aud=None)).status == 200
    finally:
        idp.stop()


def test_jku_and_x5u_listeners_receive_nothing(gw: GatewayProcess, idp: JwksServer) -> None:
    listener = JwksServer()
    attacker = rsa_key("attacker")
    listener.set_keys(public_jwk(attacker, "k1"), public_jwk(attacker, "planted"))
    try:
        for kid in ("k1", "planted"):  # a known kid, and one the gateway has never seen
            for headers in (
                {"jku": listener.jwks_url},
                {"x5u": listener.url + "/x.pem"},
                {"jwk": public_jwk(attacker, kid)},
            ):
                tok = mint(attacker, "RS256", kid=kid, iss=idp.issuer, aud="orders",
                           headers=headers)  # fmt: skip
                assert get(gw, "/api/echo", tok).status == 401
        time.sleep(0.2)  # room for a (wrong) background fetch to arrive; not a timing assert
        assert listener.hits() == 0 and listener.connections == 0
    finally:
        listener.stop()
