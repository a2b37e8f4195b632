"""Config loading, validation and compiling, without sockets.

Every error is ``path: message (line N)``; these tests check the path, the message and the
line of each, and that one run reports every problem it can find.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping

import pytest

from gateway.config.compile import CompileError, Runtime, compile_config
from gateway.config.load import ConfigError, load_text
from gateway.config.units import parse_duration, parse_size
from gateway.plugin import Registry, default_registry

REGISTRY: Registry = default_registry()

BASE = """\
listeners:
  - {name: public, bind: "127.0.0.1:8080"}
upstreams:
  backend:
    targets: [{url: "http://127.0.0.1:9000"}]
"""


def load(text: str, env: Mapping[str, str] | None = None) -> Runtime:
    config, source = load_text(textwrap.dedent(text), REGISTRY, "test.yaml", env=env or {})
    return compile_config(config, source)


def errors(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises((ConfigError, CompileError)) as info:
        load(text, env)
    exc = info.value
    assert isinstance(exc, ConfigError | CompileError)
    return [str(issue) for issue in exc.issues]


def line(text: str, needle: str, nth: int = 1) -> int:
    """The 1-based line of the ``nth`` line of ``text`` containing ``needle``."""
    seen = 0
    for i, text_line in enumerate(textwrap.dedent(text).splitlines(), 1):
        if needle in text_line:
            seen += 1
            if seen == nth:
                return i
    raise AssertionError(f"{needle!r} not in the config text")


# -- valid configs ---------------------------------------------------------------------------
def test_minimal_config_gets_the_defaults() -> None:
    rt = load("listeners: [{name: a, bind: '127.0.0.1:8080'}]\n")
    c = rt.config
    assert c.workers == 1
    assert c.routes == [] and c.upstreams == {}
    assert c.log.level == "info" and c.log.format == "json"
    assert rt.limits.max_url_bytes == 8192
    assert rt.limits.max_header_bytes == 32 * 1024
    assert rt.limits.max_header_count == 100
    assert rt.limits.max_body_size == 10 * 1024 * 1024
    assert rt.limits.header_timeout == 10.0
    assert [(lst.name, lst.host, lst.port) for lst in rt.listeners] == [("a", "127.0.0.1", 8080)]
    assert rt.forwarding.via == b"1.1 gateway"
    assert rt.router.routes == ()


def test_full_config_loads_and_compiles() -> None:
    text = """\
workers: 2
listeners:
  - {name: public, bind: "0.0.0.0:8080"}
  - {name: v6, bind: "[::1]:8081", backlog: 100}
upstreams:
  api:
    balancer: round_robin
    targets:
      - {url: "http://10.0.0.5:9000", weight: 2}
      - {url: "http://10.0.0.6"}
    timeouts: {connect: 250ms, read: 2m}
    keepalive: {max_idle: 8, idle_timeout: 30s, max_requests: 100}
  demo:
    targets: [{url: "builtin:echo"}]
routes:
  - name: orders
    match:
      hosts: [api.example.com, "*.example.org"]
      path_prefix: /orders
      methods: [get, POST]
      headers: {x-version: "2"}
    upstream: api
    strip_prefix: true
    max_body_size: 1m
    plugins:
      - headers: {request: {set: {x-env: prod}}}
      - cors: {allow_origins: ["https://app.example.com"], max_age: 1h}
  - name: demo
    match: {path_regex: "^/demo/[0-9]+$"}
    upstream: demo
    preserve_host: true
plugins:
  - headers
limits:
  max_url_bytes: 4k
  max_header_bytes: 16k
  max_header_count: 50
  max_body_size: 2m
  header_timeout: 5s
  body_timeout: 1.5
  idle_timeout: 500ms
  send_timeout: 1m
  max_connections: 100
forwarding:
  trusted_proxies: [10.0.0.0/8, "::1", 192.168.1.1]
  via: edge
  request_id_header: x-trace-id
log: {level: debug, format: text}
"""
    rt = load(text)
    assert rt.config.workers == 2
    assert [(lst.host, lst.port, lst.backlog) for lst in rt.listeners] == [
        ("0.0.0.0", 8080, 2048),
        ("::1", 8081, 100),
    ]
    api = rt.upstreams["api"]
    assert [(t.host, t.port, t.weight) for t in api.targets] == [
        ("10.0.0.5", 9000, 2),
        ("10.0.0.6", 80, 1),
    ]
    assert api.targets[1].host_header == b"10.0.0.6"
    assert api.timeouts.connect == 0.25 and api.timeouts.read == 120.0
    assert api.targets[0].pool.max_idle == 8
    assert rt.upstreams["demo"].targets[0].builtin == "echo"
    orders, demo = rt.router.routes
    assert orders.name == "orders" and orders.upstream is api
    assert orders.exact_hosts == frozenset({b"api.example.com"})
    assert orders.wildcard_hosts == (b".example.org",)
    assert orders.methods == frozenset({b"GET", b"POST"})
    assert orders.header_conditions == ((b"x-version", b"2"),)
    assert orders.prefix_rewrite == b"/"
    assert orders.max_body_size == 1024 * 1024
    # global plugins first, then the route's
    assert [p.name for p in orders.chain.plugins] == ["headers", "headers", "cors"]
    assert demo.preserve_host and demo.path_regex is not None
    assert rt.limits.max_url_bytes == 4096
    assert rt.limits.idle_timeout == 0.5 and rt.limits.body_timeout == 1.5
    assert rt.forwarding.via == b"1.1 edge"
    assert rt.forwarding.request_id_header == b"x-trace-id"
    assert rt.forwarding.is_trusted("10.1.2.3") and rt.forwarding.is_trusted("::1")
    assert not rt.forwarding.is_trusted("11.0.0.1")
    assert rt.config.log.format == "text"


def test_config_objects_are_frozen() -> None:
    rt = load(BASE)
    with pytest.raises(ValueError):
        rt.config.workers = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        rt.config.listeners[0].bind = "0.0.0.0:1"  # type: ignore[misc]


def test_via_null_sends_no_via() -> None:
    rt = load(BASE + "forwarding: {via: null}\n")
    assert rt.forwarding.via == b""


# -- workers ----------------------------------------------------------------------------------
def test_workers_auto_is_the_cpu_count() -> None:
    assert load(BASE + "workers: auto\n").config.workers == (os.cpu_count() or 1)


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("4", 4), ("'16'", 16)])
def test_workers_number(value: str, expected: int) -> None:
    assert load(BASE + f"workers: {value}\n").config.workers == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "workers must be between 1 and 1024"),
        ("5000", "workers must be between 1 and 1024"),
        ("many", "expected 'auto' or a number of worker processes"),
        ("true", "expected 'auto' or a number of worker processes"),
        ("1.5", "expected 'auto' or a number of worker processes"),
    ],
)
def test_workers_invalid(value: str, message: str) -> None:
    text = BASE + f"workers: {value}\n"
    assert errors(text) == [f"workers: {message} (line {line(text, 'workers:')})"]


# -- unknown keys, anywhere -------------------------------------------------------------------
def test_unknown_top_level_key() -> None:
    text = BASE + "listners: []\n"
    assert errors(text) == [f"listners: unknown key (line {line(text, 'listners')})"]


def test_unknown_nested_keys_name_their_path_and_line() -> None:
    text = """\
listeners:
  - {name: public, bind: "127.0.0.1:8080", reuse: true}
upstreams:
  backend:
    targets:
      - url: "http://127.0.0.1:9000"
        wieght: 2
    keepalive:
      max_idel: 3
routes:
  - name: r
    upstream: backend
    match:
      path_prefx: /x
limits:
  max_body: 1m
forwarding: {trusted: []}
"""
    assert sorted(errors(text)) == sorted(
        [
            f"listeners[0].reuse: unknown key (line {line(text, 'reuse')})",
            f"upstreams.backend.targets[0].wieght: unknown key (line {line(text, 'wieght')})",
            f"upstreams.backend.keepalive.max_idel: unknown key (line {line(text, 'max_idel')})",
            f"routes[0].match.path_prefx: unknown key (line {line(text, 'path_prefx')})",
            f"limits.max_body: unknown key (line {line(text, 'max_body')})",
            f"forwarding.trusted: unknown key (line {line(text, 'trusted')})",
        ]
    )


def test_unknown_keys_inside_plugin_configs() -> None:
    text = (
        BASE
        + """\
plugins:
  - headers:
      reqest: {}
routes:
  - name: r
    upstream: backend
    plugins:
      - headers:
          response:
            sett: {x-a: b}
      - cors:
          allow_origins: ["*"]
          allow_origin: ["*"]
"""
    )
    assert errors(text) == [
        f"plugins[0].headers.reqest: unknown key (line {line(text, 'reqest')})",
        f"routes[0].plugins[0].headers.response.sett: unknown key (line {line(text, 'sett')})",
        f"routes[0].plugins[1].cors.allow_origin: unknown key (line {line(text, 'allow_origin:')})",
    ]


def test_unknown_plugin_and_malformed_plugin_entries() -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: backend
    plugins:
      - jwtt: {issuer: x}
      - {headers: {}, cors: {allow_origins: ["*"]}}
      - 42
"""
    )
    assert errors(text) == [
        f"routes[0].plugins[0].jwtt: unknown plugin (known: cors, headers, jwt, rate_limit) "
        f"(line {line(text, 'jwtt')})",
        "routes[0].plugins[1]: a plugin entry is a mapping of one plugin name to its config "
        f"(line {line(text, '{headers')})",
        "routes[0].plugins[2]: a plugin entry is a mapping of one plugin name to its config "
        f"(line {line(text, '- 42')})",
    ]


def test_plugin_names_alone_and_null_configs_are_accepted() -> None:
    rt = load(BASE + "plugins: [headers, {headers: null}]\n")
    assert [p.name for p in rt.plugins] == ["headers", "headers"]


def test_plugin_config_values_are_validated() -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: backend
    plugins:
      - headers: {request: {set: {"bad name": x}}}
      - cors: {allow_origins: ["https://a.example"], failure_mode: maybe}
      - cors: {allow_origins: []}
"""
    )
    assert errors(text) == [
        "routes[0].plugins[0].headers.request.set: 'bad name' is not a valid header name "
        f"(line {line(text, 'bad name')})",
        "routes[0].plugins[1].cors.failure_mode: Input should be 'open' or 'closed' "
        f"(line {line(text, 'maybe')})",
        "routes[0].plugins[2].cors.allow_origins: List should have at least 1 item after "
        f"validation, not 0 (line {line(text, 'allow_origins: []')})",
    ]


@pytest.mark.parametrize(
    "name", ["Content-Length", "transfer-encoding", "Host", "connection", "TE", "upgrade"]
)
def test_headers_plugin_refuses_headers_the_gateway_manages(name: str) -> None:
    # e.g. removing Content-Length would let the upstream read a request body as a second
    # request: a configured smuggling hole
    text = BASE + f"plugins:\n  - headers: {{request: {{remove: [{name}]}}}}\n"
    assert errors(text) == [
        f"plugins[0].headers.request.remove: {name!r} is managed by the gateway and cannot be "
        "edited (line 7)"
    ]
    text = BASE + f"plugins:\n  - headers: {{response: {{set: {{{name}: x}}}}}}\n"
    assert errors(text) == [
        f"plugins[0].headers.response.set: {name!r} is managed by the gateway and cannot be "
        "edited (line 7)"
    ]


def test_duplicate_yaml_keys_are_errors() -> None:
    text = """\
listeners: [{name: a, bind: "127.0.0.1:1"}]
upstreams:
  u: {targets: [{url: "http://127.0.0.1:9"}]}
routes:
  - name: r
    upstream: u
    match: {path_prefix: /a, path_prefix: /b}
    upstream: u
routes: []
"""
    assert errors(text) == [
        "routes[0].match.path_prefix: duplicate key (line 7)",
        "routes[0].upstream: duplicate key (line 8)",
        "routes: duplicate key (line 9)",
    ]


# -- required keys and value forms ------------------------------------------------------------
def test_missing_required_keys() -> None:
    text = """\
listeners:
  - {bind: "127.0.0.1:8080"}
upstreams:
  backend: {timeouts: {connect: 1s}}
routes:
  - name: r
  - upstream: backend
"""
    assert sorted(errors(text)) == sorted(
        [
            f"listeners[0].name: required (line {line(text, '{bind')})",
            f"upstreams.backend.targets: required (line {line(text, 'backend:')})",
            f"routes[0].upstream: required (line {line(text, 'name: r')})",
            f"routes[1].name: required (line {line(text, 'upstream: backend')})",
        ]
    )


def test_missing_listeners_in_an_empty_file() -> None:
    assert errors("") == ["listeners: required"]


def test_not_a_mapping() -> None:
    assert errors("- a\n- b\n") == ["the config must be a mapping of keys (line 1)"]


def test_invalid_yaml_names_the_line() -> None:
    text = "listeners:\n  - {name: a, bind: x\nworkers: 1\n"
    (message,) = errors(text)
    assert message.startswith("invalid YAML: ")
    assert message.endswith("(line 3)")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("header_timeout", "5x", "invalid duration '5x': use a number with ms, s, m or h"),
        ("idle_timeout", "-1", "a duration must be positive"),
        ("body_timeout", "0", "a duration must be positive"),
        ("send_timeout", "true", "expected a duration such as 500ms, 5s or 2m"),
        ("header_timeout", ".nan", "a duration must be a finite number"),
        ("header_timeout", ".inf", "a duration must be a finite number"),
        ("max_body_size", "10q", "invalid size '10q': use a number with k, m or g"),
        ("max_url_bytes", "-5", "a size cannot be negative"),
        ("max_header_bytes", "1.5k", "invalid size '1.5k': use a number with k, m or g"),
        ("max_header_count", "0", "Input should be greater than or equal to 1"),
    ],
)
def test_bad_durations_and_sizes(key: str, value: str, message: str) -> None:
    text = BASE + f"limits:\n  {key}: {value}\n"
    assert errors(text) == [f"limits.{key}: {message} (line {line(text, key)})"]


def test_bad_duration_in_an_upstream_and_bad_size_on_a_route() -> None:
    text = (
        BASE.replace(
            'targets: [{url: "http://127.0.0.1:9000"}]',
            'targets: [{url: "http://127.0.0.1:9000"}]\n    timeouts: {read: soon}',
        )
        + "routes:\n  - {name: r, upstream: backend, max_body_size: lots}\n"
    )
    assert errors(text) == [
        "upstreams.backend.timeouts.read: invalid duration 'soon': use a number with ms, s, m "
        f"or h (line {line(text, 'soon')})",
        f"routes[0].max_body_size: invalid size 'lots': use a number with k, m or g "
        f"(line {line(text, 'lots')})",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0), ("1.5", 1.5), (3, 3.0)],
)
def test_parse_duration(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("64k", 65536), ("10m", 10 * 1024**2), ("1g", 1024**3), ("512", 512), ("2KB", 2048), (0, 0)],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_log_level_must_be_known() -> None:
    text = BASE + "log: {level: loud}\n"
    (message,) = errors(text)
    assert message.startswith("log.level: Input should be 'debug', 'info', 'warning' or 'error'")
    assert message.endswith(f"(line {line(text, 'loud')})")


# -- ${ENV} interpolation ---------------------------------------------------------------------
ENV_TEXT = """\
workers: ${WORKERS:-1}
listeners:
  - {name: public, bind: "${HOST}:${PORT:-8080}"}
upstreams:
  backend:
    targets: [{url: "http://${BACKEND_HOST:-127.0.0.1}:9000"}]
routes:
  - name: "price-$$5-$${NOT_A_VAR}"
    upstream: backend
    plugins:
      - headers:
          request:
            set: {authorization: "Bearer ${API_TOKEN}"}
"""


def test_env_variables_are_interpolated() -> None:
    rt = load(ENV_TEXT, env={"HOST": "0.0.0.0", "PORT": "9090", "WORKERS": "3", "API_TOKEN": "s3"})
    assert (rt.listeners[0].host, rt.listeners[0].port) == ("0.0.0.0", 9090)
    assert rt.config.workers == 3
    assert rt.upstreams["backend"].targets[0].host == "127.0.0.1"
    route = rt.router.routes[0]
    # $$ is a literal dollar sign, and stops ${...} from being read as a variable
    assert route.name == "price-$5-${NOT_A_VAR}"
    (plugin,) = route.chain.plugins
    assert plugin.config.model_dump()["request"]["set"] == {"authorization": "Bearer s3"}


def test_env_defaults_apply_when_unset_and_set_values_win() -> None:
    rt = load(ENV_TEXT, env={"HOST": "127.0.0.1", "API_TOKEN": "t", "BACKEND_HOST": "10.0.0.1"})
    assert rt.listeners[0].port == 8080
    assert rt.config.workers == 1
    assert rt.upstreams["backend"].targets[0].host == "10.0.0.1"


def test_empty_default_is_allowed() -> None:
    rt = load(BASE + "forwarding: {via: 'edge${SUFFIX:-}'}\n")
    assert rt.forwarding.via == b"1.1 edge"


def test_missing_env_variable_is_an_error_naming_it_with_its_path() -> None:
    assert errors(ENV_TEXT, env={}) == [
        f"listeners[0].bind: environment variable HOST is not set (line {line(ENV_TEXT, 'bind')})",
        "routes[0].plugins[0].headers.request.set.authorization: environment variable "
        f"API_TOKEN is not set (line {line(ENV_TEXT, 'authorization')})",
    ]


def test_interpolation_does_not_read_the_process_environment_when_given_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GW_TEST_PORT", "7001")
    text = "listeners: [{name: a, bind: '127.0.0.1:${GW_TEST_PORT}'}]\n"
    assert errors(text, env={}) == [
        "listeners[0].bind: environment variable GW_TEST_PORT is not set (line 1)"
    ]
    config, source = load_text(text, REGISTRY)  # env=None: the process environment
    assert compile_config(config, source).listeners[0].port == 7001


def test_interpolated_values_are_validated_like_literal_ones() -> None:
    text = BASE + "workers: ${W}\nlimits: {header_timeout: '${T}'}\n"
    assert errors(text, env={"W": "zero", "T": "5 parsecs"}) == [
        f"workers: expected 'auto' or a number of worker processes (line {line(text, 'workers')})",
        "limits.header_timeout: invalid duration '5 parsecs': use a number with ms, s, m or h "
        f"(line {line(text, 'limits')})",
    ]


# -- cross-references, checked by the compiler ------------------------------------------------
def test_unknown_upstream() -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: nope\n"
    assert errors(text) == [
        f"routes[0].upstream: unknown upstream 'nope' (known: backend) (line {line(text, 'nope')})"
    ]


def test_unknown_upstream_when_none_is_defined() -> None:
    text = "listeners: [{name: a, bind: '127.0.0.1:1'}]\nroutes: [{name: r, upstream: x}]\n"
    assert errors(text) == [
        "routes[0].upstream: unknown upstream 'x' (known: none defined) (line 2)"
    ]


def test_duplicate_route_names() -> None:
    text = (
        BASE
        + """\
routes:
  - {name: same, upstream: backend, match: {path: /a}}
  - {name: other, upstream: backend}
  - {name: same, upstream: backend, match: {path: /b}}
"""
    )
    assert errors(text) == [
        f"routes[2].name: duplicate route name 'same' (line {line(text, 'same', 2)})"
    ]


def test_invalid_regex() -> None:
    text = BASE + "routes:\n  - name: r\n    upstream: backend\n    match: {path_regex: '/(a'}\n"
    (message,) = errors(text)
    assert message.startswith("routes[0].match.path_regex: invalid regular expression: ")
    assert message.endswith(f"(line {line(text, 'path_regex')})")


@pytest.mark.parametrize("match", ["{path: /api}", "{path_regex: '^/api'}", "{}"])
def test_strip_prefix_needs_path_prefix(match: str) -> None:
    text = (
        BASE + f"routes:\n  - name: r\n    upstream: backend\n    strip_prefix: true\n"
        f"    match: {match}\n"
    )
    assert errors(text) == [
        f"routes[0].strip_prefix: needs match.path_prefix (line {line(text, 'strip_prefix')})"
    ]


def test_prefix_rewrite_rules() -> None:
    text = (
        BASE
        + """\
routes:
  - {name: a, upstream: backend, prefix_rewrite: /v2, match: {path: /v1}}
  - {name: b, upstream: backend, prefix_rewrite: v2, match: {path_prefix: /v1}}
  - {name: c, upstream: backend, prefix_rewrite: /v2, strip_prefix: true, match: {path_prefix: /v1}}
"""
    )
    assert errors(text) == [
        f"routes[0].prefix_rewrite: needs match.path_prefix (line {line(text, 'name: a')})",
        f"routes[1].prefix_rewrite: must start with / (line {line(text, 'name: b')})",
        "routes[2].prefix_rewrite: use strip_prefix or prefix_rewrite, not both "
        f"(line {line(text, 'name: c')})",
    ]


def test_match_checks() -> None:
    text = (
        BASE
        + """\
routes:
  - name: r
    upstream: backend
    match:
      hosts: ["*", "a.*.com", "ok.example.com", "*.example.com"]
      path: orders
      methods: [GET, "BAD METHOD"]
      headers: {"bad header": x}
  - name: s
    upstream: backend
    match: {path: /a, path_prefix: /a}
"""
    )
    assert errors(text) == [
        f"routes[0].match.hosts[0]: expected a host name or *.domain (line {line(text, 'hosts')})",
        f"routes[0].match.hosts[1]: expected a host name or *.domain (line {line(text, 'hosts')})",
        f"routes[0].match.path: must start with / (line {line(text, 'path: orders')})",
        f"routes[0].match.methods[1]: not a valid method (line {line(text, 'methods')})",
        "routes[0].match.headers.bad header: not a valid header name "
        f"(line {line(text, 'bad header')})",
        "routes[1].match: use only one of path, path_prefix, path_regex "
        f"(line {line(text, 'path_prefix: /a')})",
    ]


def test_bad_cidr_in_trusted_proxies() -> None:
    text = (
        BASE
        + """\
forwarding:
  trusted_proxies:
    - 10.0.0.0/8
    - 300.1.1.1
    - fe80::/10
    - not-an-address
"""
    )
    assert errors(text) == [
        "forwarding.trusted_proxies[1]: invalid address or CIDR '300.1.1.1' "
        f"(line {line(text, '300.1.1.1')})",
        "forwarding.trusted_proxies[3]: invalid address or CIDR 'not-an-address' "
        f"(line {line(text, 'not-an-address')})",
    ]


def test_bad_forwarding_names() -> None:
    text = BASE + "forwarding:\n  via: 'a, b'\n  request_id_header: 'x id'\n"
    assert errors(text) == [
        f"forwarding.request_id_header: not a valid header name (line {line(text, 'x id')})",
        f"forwarding.via: must be a plain name, or null to send no Via (line {line(text, 'via')})",
    ]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "ftp://x",
            "expected http://host[:port], https://host[:port] or builtin:echo",
        ),
        (
            "10.0.0.1:80",
            "expected http://host[:port], https://host[:port] or builtin:echo",
        ),
        ("http://api.example.com/v1", "a target is http://host[:port] with no path"),
        ("http://api.example.com?x=1", "a target is http://host[:port] with no path"),
        ("http://:80", "a target is http://host[:port] with no path"),
        ("http://api.example.com:99999", "invalid port"),
        ("http://api.example.com:http", "invalid port"),
    ],
)
def test_bad_target_url(url: str, message: str) -> None:
    text = (
        "listeners: [{name: a, bind: '127.0.0.1:1'}]\n"
        "upstreams:\n"
        "  u:\n"
        "    targets:\n"
        f"      - url: '{url}'\n"
    )
    assert errors(text) == [f"upstreams.u.targets[0].url: {message} (line 5)"]


def test_route_to_an_upstream_with_only_bad_targets_reports_the_target_only() -> None:
    text = (
        "listeners: [{name: a, bind: '127.0.0.1:1'}]\n"
        "upstreams: {u: {targets: [{url: 'ftp://x'}]}}\n"
        "routes: [{name: r, upstream: u}]\n"
    )
    assert errors(text) == [
        "upstreams.u.targets[0].url: expected http://host[:port], https://host[:port] or "
        "builtin:echo (line 2)"
    ]


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("8080", "expected host:port, e.g. 0.0.0.0:8080"),
        (":8080", "expected host:port, e.g. 0.0.0.0:8080"),
        ("localhost:http", "expected host:port, e.g. 0.0.0.0:8080"),
        ("127.0.0.1:70000", "port out of range"),
    ],
)
def test_bad_listener_bind(bind: str, message: str) -> None:
    text = f"listeners:\n  - name: a\n    bind: '{bind}'\n"
    assert errors(text) == [f"listeners[0].bind: {message} (line 3)"]


def test_duplicate_listener_names() -> None:
    text = "listeners:\n  - {name: a, bind: '127.0.0.1:1'}\n  - {name: a, bind: '127.0.0.1:2'}\n"
    assert errors(text) == ["listeners[1].name: duplicate listener name 'a' (line 3)"]


# -- several errors at once -------------------------------------------------------------------
def test_compile_reports_every_cross_reference_error_at_once() -> None:
    text = """\
listeners: [{name: a, bind: "127.0.0.1:8080"}]
upstreams:
  good: {targets: [{url: "http://127.0.0.1:9000"}]}
  bad: {targets: [{url: "ftp://x"}]}
routes:
  - {name: r1, upstream: missing}
  - {name: r1, upstream: good, match: {path_regex: "(["}}
  - {name: r2, upstream: good, strip_prefix: true}
forwarding: {trusted_proxies: [bogus]}
"""
    assert errors(text) == [
        "upstreams.bad.targets[0].url: expected http://host[:port], https://host[:port] or "
        "builtin:echo (line 4)",
        "forwarding.trusted_proxies[0]: invalid address or CIDR 'bogus' (line 9)",
        "routes[0].upstream: unknown upstream 'missing' (known: bad, good) (line 6)",
        "routes[1].name: duplicate route name 'r1' (line 7)",
        "routes[1].match.path_regex: invalid regular expression: unterminated character set "
        "at position 1 (line 7)",
        "routes[2].strip_prefix: needs match.path_prefix (line 8)",
    ]


def test_validation_reports_every_error_at_once_including_plugin_configs() -> None:
    text = """\
workers: many
listeners: [{name: a, bind: "127.0.0.1:8080", extra: 1}]
upstreams:
  u: {targets: [{url: "http://127.0.0.1:9000"}]}
routes:
  - name: r
    upstream: u
    plugins:
      - headers: {request: {sett: {}}}
      - cors: {allow_origins: ["*"], allow_credentials: true}
      - nope
limits: {header_timeout: 5x, max_body_size: 10q}
"""
    assert sorted(errors(text)) == sorted(
        [
            "workers: expected 'auto' or a number of worker processes (line 1)",
            "listeners[0].extra: unknown key (line 2)",
            "limits.header_timeout: invalid duration '5x': use a number with ms, s, m or h "
            "(line 12)",
            "limits.max_body_size: invalid size '10q': use a number with k, m or g (line 12)",
            "routes[0].plugins[0].headers.request.sett: unknown key (line 9)",
            "routes[0].plugins[1].cors: allow_credentials cannot be combined with '*' in "
            "allow_origins: list the trusted origins (line 10)",
            "routes[0].plugins[2].nope: unknown plugin (known: cors, headers, jwt, rate_limit) "
            "(line 11)",
        ]
    )


def test_env_errors_are_reported_with_validation_errors() -> None:
    text = BASE + "workers: '${W}'\nlimits: {nope: 1}\n"
    assert sorted(errors(text, env={})) == sorted(
        [
            f"workers: environment variable W is not set (line {line(text, 'workers')})",
            f"workers: expected 'auto' or a number of worker processes "
            f"(line {line(text, 'workers')})",
            f"limits.nope: unknown key (line {line(text, 'nope')})",
        ]
    )


def test_bundled_example_is_valid() -> None:
    from gateway.cli import example_config_text

    config, source = load_text(example_config_text(), REGISTRY, "<bundled example>", env={})
    rt = compile_config(config, source)
    (route,) = rt.router.routes
    assert route.name == "demo" and route.prefix_rewrite == b"/"
    assert rt.upstreams["echo"].targets[0].builtin == "echo"


def test_operations_keys_are_validated() -> None:
    base = 'listeners: [{name: a, bind: "127.0.0.1:8080"}]\n'
    rt = load(base + 'admin: {bind: "127.0.0.1:9901", token: t}\nworkers: 3\n')
    assert rt.config.admin is not None and rt.config.admin.token == "t"
    assert rt.config.workers == 3
    assert rt.config.listener_sharing == "reuseport"
    assert rt.config.drain_timeout == 30.0
    assert rt.config.access_log.enabled and rt.config.access_log.path == "-"
    assert rt.config.tracing.sample_ratio == 1.0
    for text, where in [
        ('admin: {bind: "nowhere"}\n', "admin.bind"),
        ('admin: {bind: "127.0.0.1:8080"}\n', "admin.bind"),
        ("listener_sharing: fork\n", "listener_sharing"),
        ("tracing: {sample_ratio: 2}\n", "tracing.sample_ratio"),
        ("access_log: {path: x, rotate: daily}\n", "access_log.rotate"),
        ("drain_timeout: soon\n", "drain_timeout"),
        ('admin: {token: ""}\n', "admin.token"),  # an empty ${ADMIN_TOKEN}: not "no token"
    ]:
        with pytest.raises((ConfigError, CompileError)) as info:
            load(base + text)
        assert any(str(i).startswith(where) for i in info.value.issues), info.value.issues
