"""Routing without sockets: routes compiled from config text, matched with ``Router.match``.

The host given to ``match`` is the raw Host header value (or the absolute-form authority);
the router lower-cases it and strips the port.
"""

from __future__ import annotations

import textwrap
from typing import Any

import pytest
import yaml

from gateway.config.compile import compile_config
from gateway.config.load import load_text
from gateway.plugin import default_registry
from gateway.proxy.router import Route, Router

REGISTRY = default_registry()


def router(*routes: dict[str, Any]) -> Router:
    config = {
        "listeners": [{"name": "a", "bind": "127.0.0.1:1"}],
        "upstreams": {"u": {"targets": [{"url": "http://127.0.0.1:9"}]}},
        "routes": [{"upstream": "u", **r} for r in routes],
    }
    cfg, source = load_text(yaml.safe_dump(config), REGISTRY, env={})
    return compile_config(cfg, source).router


def name(
    r: Router,
    path: str = "/",
    host: str = "h",
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
) -> str | None:
    items = [(n.lower().encode(), n.encode(), v.encode()) for n, v in headers or []]
    route = r.match(host.encode(), path.encode(), method.encode(), items)
    return None if route is None else route.name


# -- hosts -----------------------------------------------------------------------------------
HOSTS = router(
    {"name": "wild", "match": {"hosts": ["*.example.com"]}},
    {"name": "deep-wild", "match": {"hosts": ["*.eu.example.com"]}},
    {"name": "exact", "match": {"hosts": ["api.example.com", "API2.Example.com"]}},
    {"name": "other", "match": {"hosts": ["other.test"], "path_prefix": "/"}},
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact"),  # exact beats a wildcard listed before it
        ("api2.example.com", "exact"),  # configured hosts are lower-cased
        ("www.example.com", "wild"),
        ("a.b.example.com", "wild"),  # a wildcard matches any depth
        ("x.eu.example.com", "deep-wild"),  # the longer suffix wins
        ("eu.example.com", "wild"),
        ("example.com", None),  # *.example.com needs a label before the suffix
        ("badexample.com", None),
        ("other.test", "other"),
        ("unknown.test", None),
        ("", None),
    ],
)
def test_host_matching(host: str, expected: str | None) -> None:
    assert name(HOSTS, host=host) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com:8443", "exact"),
        ("API.Example.COM", "exact"),
        ("api.example.com.", "exact"),  # a fully qualified name's final dot
        ("www.example.com:80", "wild"),
        ("[::1]:8080", None),
    ],
)
def test_raw_host_header_values_are_normalised(host: str, expected: str | None) -> None:
    assert name(HOSTS, host=host) == expected


def test_route_without_hosts_matches_any_host_but_loses_to_a_host_match() -> None:
    r = router(
        {"name": "any", "match": {"path_prefix": "/"}},
        {"name": "wild", "match": {"hosts": ["*.example.com"], "path_prefix": "/"}},
        {"name": "exact", "match": {"hosts": ["a.example.com"], "path_prefix": "/"}},
    )
    assert name(r, host="a.example.com") == "exact"
    assert name(r, host="b.example.com") == "wild"
    assert name(r, host="elsewhere.org") == "any"
    assert name(r, host="") == "any"


def test_host_rank_beats_path_specificity() -> None:
    r = router(
        {"name": "any-exact-path", "match": {"path": "/x"}},
        {"name": "host-catch-all", "match": {"hosts": ["h.test"]}},
    )
    assert name(r, "/x", host="h.test") == "host-catch-all"
    assert name(r, "/x", host="other.test") == "any-exact-path"


def test_host_falls_back_when_the_specific_host_route_does_not_match() -> None:
    r = router(
        {"name": "exact-orders", "match": {"hosts": ["api.test"], "path_prefix": "/orders"}},
        {"name": "any", "match": {"path_prefix": "/"}},
    )
    assert name(r, "/orders/1", host="api.test") == "exact-orders"
    assert name(r, "/users", host="api.test") == "any"


def test_host_candidates_are_cached_and_bounded() -> None:
    r = router({"name": "any"})
    for i in range(5000):
        assert name(r, host=f"h{i}.test") == "any"
    assert len(r._cache) <= 4096


# -- paths -----------------------------------------------------------------------------------
PATHS = router(
    {"name": "prefix", "match": {"path_prefix": "/orders"}},
    {"name": "regex", "match": {"path_regex": "^/orders/[0-9]+$"}},
    {"name": "prefix-long", "match": {"path_prefix": "/orders/special"}},
    {"name": "exact", "match": {"path": "/orders/exact"}},
    {"name": "slash-prefix", "match": {"path_prefix": "/files/"}},
    {"name": "items-regex", "match": {"path_regex": "/items/[a-z]+"}},
)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/orders", "prefix"),
        ("/orders/", "prefix"),
        ("/orders/abc", "prefix"),
        ("/ordersX", None),  # prefixes are segment-aware
        ("/orders-old", None),
        ("/orders/special", "prefix-long"),
        ("/orders/special/1", "prefix-long"),
        ("/orders/specialty", "prefix"),
        ("/orders/exact", "exact"),  # exact beats every prefix, listed first or not
        ("/orders/exact/", "prefix"),
        ("/orders/42", "prefix"),  # a prefix beats a regex
        ("/files/a", "slash-prefix"),
        ("/files/", "slash-prefix"),
        ("/files", None),  # a prefix ending in / needs the slash
        ("/items/abc", "items-regex"),
        ("/items/abc1", None),  # regexes match the whole path
        ("/x/items/abc", None),
        ("/Orders", None),  # paths are case-sensitive
    ],
)
def test_path_matching(path: str, expected: str | None) -> None:
    assert name(PATHS, path) == expected


def test_regex_beats_no_path_condition() -> None:
    r = router(
        {"name": "catch-all"},
        {"name": "regex", "match": {"path_regex": "/v[0-9]+/.*"}},
    )
    assert name(r, "/v2/x") == "regex"
    assert name(r, "/v/x") == "catch-all"


def test_root_prefix_matches_everything() -> None:
    r = router({"name": "root", "match": {"path_prefix": "/"}})
    for path in ("/", "/a", "/a/b/c"):
        assert name(r, path) == "root"


# -- methods and headers ---------------------------------------------------------------------
METHODS = router(
    {"name": "any", "match": {"path_prefix": "/m"}},
    {"name": "reads", "match": {"path_prefix": "/m", "methods": ["get", "HEAD"]}},
    {"name": "writes", "match": {"path_prefix": "/m", "methods": ["POST", "PUT"]}},
)


@pytest.mark.parametrize(
    ("method", "expected"),
    [("GET", "reads"), ("HEAD", "reads"), ("POST", "writes"), ("PUT", "writes"),
     ("DELETE", "any"), ("get", "any")],  # methods are case-sensitive on the wire
)  # fmt: skip
def test_method_matching(method: str, expected: str) -> None:
    assert name(METHODS, "/m/1", method=method) == expected


def test_method_only_route_returns_none_for_other_methods() -> None:
    r = router({"name": "posts", "match": {"methods": ["POST"]}})
    assert name(r, method="POST") == "posts"
    assert name(r, method="GET") is None


HEADERS = router(
    {"name": "default", "match": {"path_prefix": "/"}},
    {"name": "beta", "match": {"path_prefix": "/", "headers": {"X-Version": "beta"}}},
    {
        "name": "beta-mobile",
        "match": {"path_prefix": "/", "headers": {"x-version": "beta", "x-client": "mobile"}},
    },
)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], "default"),
        ([("X-Version", "beta")], "beta"),
        ([("x-version", "beta")], "beta"),  # names are case-insensitive
        ([("X-Version", "Beta")], "default"),  # values are not
        ([("X-Version", "beta"), ("X-Client", "mobile")], "beta-mobile"),  # more conditions win
        ([("X-Client", "mobile")], "default"),
        ([("X-Version", "alpha"), ("X-Version", "beta")], "beta"),  # any of repeated fields
    ],
)
def test_header_matching(headers: list[tuple[str, str]], expected: str) -> None:
    assert name(HEADERS, "/", headers=headers) == expected


# -- precedence between kinds of condition and config order ----------------------------------
def test_path_specificity_beats_more_conditions() -> None:
    r = router(
        {"name": "prefix-with-method", "match": {"path_prefix": "/a", "methods": ["GET"]}},
        {"name": "exact-no-method", "match": {"path": "/a/b"}},
    )
    assert name(r, "/a/b") == "exact-no-method"
    assert name(r, "/a/c") == "prefix-with-method"


def test_equal_specificity_goes_to_the_first_in_config_order() -> None:
    r = router(
        {"name": "first", "match": {"path_prefix": "/same"}},
        {"name": "second", "match": {"path_prefix": "/same"}},
        {"name": "third", "match": {"path_prefix": "/same", "methods": ["POST"]}},
        {"name": "fourth", "match": {"path_prefix": "/same", "headers": {"x-a": "1"}}},
    )
    assert name(r, "/same") == "first"
    # methods and a header are one condition each: a tie, broken by config order
    assert name(r, "/same", method="POST", headers=[("x-a", "1")]) == "third"
    assert name(r, "/same", method="GET", headers=[("x-a", "1")]) == "fourth"


def test_no_routes_matches_nothing() -> None:
    r = Router([])
    assert r.match(b"h", b"/", b"GET", []) is None
    assert repr(r) == "<Router 0 routes>"


# -- rewrites --------------------------------------------------------------------------------
def _route(r: Router, route_name: str) -> Route:
    (route,) = [x for x in r.routes if x.name == route_name]
    return route


REWRITES = router(
    {"name": "strip", "match": {"path_prefix": "/api"}, "strip_prefix": True},
    {"name": "strip-slash", "match": {"path_prefix": "/svc/"}, "strip_prefix": True},
    {"name": "rewrite", "match": {"path_prefix": "/v1"}, "prefix_rewrite": "/internal/v1"},
    {"name": "rewrite-slash", "match": {"path_prefix": "/old"}, "prefix_rewrite": "/new/"},
    {"name": "plain", "match": {"path_prefix": "/plain"}},
)


@pytest.mark.parametrize(
    ("route_name", "path", "upstream_path"),
    [
        ("strip", "/api", "/"),
        ("strip", "/api/", "/"),
        ("strip", "/api/users/1", "/users/1"),
        ("strip-slash", "/svc/a", "/a"),
        ("strip-slash", "/svc/", "/"),
        ("rewrite", "/v1", "/internal/v1"),
        ("rewrite", "/v1/x", "/internal/v1/x"),
        ("rewrite-slash", "/old/x", "/new/x"),
        ("rewrite-slash", "/old", "/new"),
        ("plain", "/plain/x", "/plain/x"),
    ],
)
def test_upstream_path(route_name: str, path: str, upstream_path: str) -> None:
    route = _route(REWRITES, route_name)
    assert name(REWRITES, path) == route_name
    assert route.upstream_path(path.encode()) == upstream_path.encode()


def test_compiled_route_has_lower_case_byte_conditions() -> None:
    r = router(
        {
            "name": "r",
            "match": {
                "hosts": ["API.Example.com", "*.Example.ORG"],
                "methods": ["get"],
                "headers": {"X-Tenant": "Acme"},
            },
            "preserve_host": True,
        }
    )
    route = _route(r, "r")
    assert route.exact_hosts == frozenset({b"api.example.com"})
    assert route.wildcard_hosts == (b".example.org",)
    assert route.methods == frozenset({b"GET"})
    assert route.header_conditions == ((b"x-tenant", b"Acme"),)
    assert route.preserve_host is True
    assert repr(route) == "<Route r>"


def test_internationalised_host_names_are_compiled_to_their_ascii_form() -> None:
    r = router({"name": "idn", "match": {"hosts": ["bücher.example", "*.münchen.test"]}})
    assert name(r, host="xn--bcher-kva.example") == "idn"
    assert name(r, host="a.xn--mnchen-3ya.test") == "idn"


def test_yaml_text_routes_compile_like_dicts() -> None:
    text = textwrap.dedent(
        """\
        listeners: [{name: a, bind: "127.0.0.1:1"}]
        upstreams: {u: {targets: [{url: "http://127.0.0.1:9"}]}}
        routes:
          - {name: one, upstream: u, match: {hosts: ["*.example.com"], path_prefix: /a}}
        """
    )
    cfg, source = load_text(text, REGISTRY, env={})
    r = compile_config(cfg, source).router
    assert name(r, "/a/b", host="x.example.com") == "one"
