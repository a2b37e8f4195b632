"""Routing end to end: which route answers (each route tags the request it forwards with an
``x-route`` header, seen by the upstream), what path and Host the upstream sees, and the
JSON 404 when nothing matches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.client import Conn, parse_responses, raw_exchange, request
from tests.support.procs import GatewayProcess, UpstreamProcess


def _route(name: str, match: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": match,
        "upstream": "backend",
        "plugins": [{"headers": {"request": {"set": {"x-route": name}}}}],
        **extra,
    }


ROUTES = [
    # hosts (no path condition)
    _route("wild", {"hosts": ["*.example.com"]}),
    _route("deep-wild", {"hosts": ["*.eu.example.com"]}),
    _route("exact-host", {"hosts": ["api.example.com"]}),
    # paths, on their own host; listed least specific first to show order does not decide
    _route("p-prefix", {"hosts": ["paths.test"], "path_prefix": "/orders"}),
    _route("p-regex", {"hosts": ["paths.test"], "path_regex": "^/items/[0-9]+$"}),
    _route("p-prefix-long", {"hosts": ["paths.test"], "path_prefix": "/orders/special"}),
    _route("p-exact", {"hosts": ["paths.test"], "path": "/orders/exact"}),
    # methods and headers
    _route("m-any", {"hosts": ["methods.test"]}),
    _route("m-write", {"hosts": ["methods.test"], "methods": ["POST", "PUT"]}),
    _route("h-default", {"hosts": ["headers.test"]}),
    _route("h-beta", {"hosts": ["headers.test"], "headers": {"x-version": "beta"}}),
    # same specificity: config order decides
    _route("o-first", {"hosts": ["order.test"], "path_prefix": "/same"}),
    _route("o-second", {"hosts": ["order.test"], "path_prefix": "/same"}),
    # rewrites
    _route("strip", {"hosts": ["rewrite.test"], "path_prefix": "/api"}, strip_prefix=True),
    _route(
        "rewrite",
        {"hosts": ["rewrite.test"], "path_prefix": "/v1"},
        prefix_rewrite="/internal/v1",
    ),
    _route("preserve", {"hosts": ["preserve.test"]}, preserve_host=True),
    # no host condition: any host, but only this path
    _route("fallback", {"path": "/fallback"}),
]


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    config = {"upstreams": {"backend": {"targets": [{"url": upstream.url}]}}, "routes": ROUTES}
    g = GatewayProcess(config, tmp_path_factory.mktemp("routing"))
    yield g
    g.stop()


def seen(
    gw: GatewayProcess,
    target: str,
    host: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The request as the upstream saw it, plus the route that forwarded it."""
    resp = request(gw.port, method, target, headers=headers, host=host)
    assert resp.status == 200, resp.body
    record: dict[str, Any] = resp.json()
    hdrs = {n.lower(): v for n, v in record["headers"]}
    record["route"] = hdrs.get("x-route")
    record["host"] = hdrs.get("host")
    return record


def route_of(gw: GatewayProcess, target: str, host: str, **kw: Any) -> str | None:
    resp = request(gw.port, kw.pop("method", "GET"), target, host=host, **kw)
    if resp.status == 404:
        assert resp.json()["error"]["code"] == "no_route"
        return None
    assert resp.status == 200, resp.body
    hdrs = {n.lower(): v for n, v in resp.json()["headers"]}
    return hdrs["x-route"]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact-host"),
        ("api.example.com:8443", "exact-host"),  # the port is not part of the match
        ("API.Example.COM", "exact-host"),  # nor is case
        ("www.example.com", "wild"),
        ("www.example.com:80", "wild"),
        ("a.b.example.com", "wild"),
        ("x.eu.example.com", "deep-wild"),
        ("example.com", None),
        ("notexample.com", None),
    ],
)
def test_hosts(gw: GatewayProcess, host: str, expected: str | None) -> None:
    assert route_of(gw, "/anything", host) == expected


def test_absolute_form_target_routes_on_its_authority(gw: GatewayProcess) -> None:
    data = raw_exchange(
        gw.port,
        b"GET http://api.example.com:8080/x?y=1 HTTP/1.1\r\nHost: api.example.com:8080\r\n"
        b"Connection: close\r\n\r\n",
    )
    (resp,) = parse_responses(data)
    assert resp.status == 200
    record = resp.json()
    assert record["target"] == "/x?y=1"
    hdrs = {n.lower(): v for n, v in record["headers"]}
    assert hdrs["x-route"] == "exact-host"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders", "p-prefix"),
        ("/orders/", "p-prefix"),
        ("/orders/1?x=2", "p-prefix"),
        ("/ordersX", None),  # segment-aware prefix
        ("/orders/special/9", "p-prefix-long"),  # the longer prefix wins
        ("/orders/exact", "p-exact"),  # exact beats any prefix
        ("/orders/exact/more", "p-prefix"),
        ("/items/42", "p-regex"),
        ("/items/42x", None),  # the regex matches the whole path
        ("/other", None),
    ],
)
def test_paths(gw: GatewayProcess, path: str, expected: str | None) -> None:
    assert route_of(gw, path, "paths.test") == expected


def test_path_is_matched_after_dot_segments_are_resolved(gw: GatewayProcess) -> None:
    assert route_of(gw, "/items/../orders/exact", "paths.test") == "p-exact"


@pytest.mark.parametrize(
    ("method", "expected"),
    [("GET", "m-any"), ("POST", "m-write"), ("PUT", "m-write"), ("DELETE", "m-any")],
)
def test_methods(gw: GatewayProcess, method: str, expected: str) -> None:
    assert route_of(gw, "/m", "methods.test", method=method) == expected


def test_headers(gw: GatewayProcess) -> None:
    assert route_of(gw, "/", "headers.test") == "h-default"
    assert route_of(gw, "/", "headers.test", headers=[("X-Version", "beta")]) == "h-beta"
    assert route_of(gw, "/", "headers.test", headers=[("X-Version", "gamma")]) == "h-default"


def test_config_order_breaks_ties(gw: GatewayProcess) -> None:
    assert route_of(gw, "/same/x", "order.test") == "o-first"


def test_route_without_hosts_serves_any_host(gw: GatewayProcess) -> None:
    assert route_of(gw, "/fallback", "whatever.test") == "fallback"
    # but a host-matched route, when one matches, wins over it
    assert route_of(gw, "/fallback", "www.example.com") == "wild"


@pytest.mark.parametrize(
    ("target", "upstream_target"),
    [
        ("/api", "/"),
        ("/api/", "/"),
        ("/api/users/7", "/users/7"),
        ("/api/users?page=2&q=a%20b", "/users?page=2&q=a%20b"),
        ("/v1", "/internal/v1"),
        ("/v1/orders?x=1", "/internal/v1/orders?x=1"),
    ],
)
def test_strip_prefix_and_prefix_rewrite(
    gw: GatewayProcess, target: str, upstream_target: str
) -> None:
    record = seen(gw, target, "rewrite.test")
    assert record["target"] == upstream_target


def test_host_sent_upstream(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    record = seen(gw, "/p", "preserve.test:8443")
    assert record["route"] == "preserve"
    assert record["host"] == "preserve.test:8443"  # preserve_host: the client's, as sent
    other = seen(gw, "/p", "www.example.com")
    assert other["host"] == f"127.0.0.1:{upstream.port}"  # otherwise the target's
    xfh = {n.lower(): v for n, v in other["headers"]}["x-forwarded-host"]
    assert xfh == "www.example.com"


def test_no_route_is_a_json_404_on_a_kept_alive_connection(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    with Conn(gw.port) as c:
        resp = c.request("GET", "/nowhere-no-route-404", host="unknown.test")
        assert resp.status == 404
        assert resp.header("content-type") == "application/json"
        err = resp.json()["error"]
        assert err == {
            "status": 404,
            "code": "no_route",
            "message": "no route matches this request",
            "request_id": resp.header("x-request-id"),
        }
        assert resp.header("content-length") == str(len(resp.body))
        # a 404 does not close the connection
        again = c.request("GET", "/anything", host="api.example.com")
        assert again.status == 200
    assert not any(r["target"] == "/nowhere-no-route-404" for r in upstream.received())


def test_head_request_gets_a_404_without_body(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        resp = c.request("HEAD", "/nowhere", host="unknown.test")
        assert resp.status == 404 and resp.body == b""
        assert c.request("GET", "/x", host="api.example.com").status == 200
