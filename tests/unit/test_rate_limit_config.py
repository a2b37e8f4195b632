"""rate_limit and state: config errors are reported with their path at load."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config.compile import compile_config
from gateway.config.load import ConfigError, load_text
from gateway.plugin import default_registry

REGISTRY = default_registry()

BASE = """
listeners: [{name: p, bind: "127.0.0.1:1"}]
upstreams: {b: {targets: [{url: "http://127.0.0.1:9"}]}}
"""


def load(extra: str) -> None:
    config, source = load_text(BASE + textwrap.dedent(extra), REGISTRY)
    compile_config(config, source)


def errors(extra: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(extra)
    return str(info.value)


def route(plugin: str) -> str:
    return f"routes: [{{name: r, upstream: b, plugins: [{{rate_limit: {plugin}}}]}}]\n"


def test_valid_configs_load() -> None:
    load(route("{rate: 100/s, burst: 200}"))
    load(route("{key: [ip, 'header:x-tenant'], limits: [{rate: 10/s}, {rate: 1000/h, name: h}]}"))
    load("state: {backend: redis, url: 'redis://127.0.0.1:6379/0', on_error: closed}\n")
    load("state: {backend: redis, url: 'redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/gw'}\n")


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("{}", "give either rate"),
        ("{rate: 1/s, limits: [{rate: 2/s}]}", "give either rate"),
        ("{rate: 100/parsec}", "invalid rate"),
        ("{rate: 2000000/s}", "above one million per second"),
        ("{rate: 10/s, cost: 11}", "cost 11 exceeds the burst"),
        ("{key: 'cookie:x', rate: 1/s}", "key 'cookie:x'"),
        ("{key: 'header:bad name', rate: 1/s}", "not a valid header name"),
        ("{limits: [{rate: 1/s}, {rate: 1/s}]}", "used twice"),
        ("{rate: 1/s, name: 'a\"b'}", "limit name"),
        ("{rate: 1/s, headers: maybe}", "headers"),
        ("{rate: 1/s, missing_key: ignore}", "missing_key"),
        ("{rate: 1/s, bogus: 1}", "bogus"),
    ],
)
def test_bad_plugin_configs(plugin: str, message: str) -> None:
    text = errors(route(plugin))
    assert "routes[0].plugins[0]" in text
    assert message in text


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("{backend: redis}", "url: required"),
        ("{backend: redis, url: 'http://x'}", "url: expected one of"),
        ("{backend: redis, url: 'redis+sentinel://h:1'}", "names the service"),
        ("{backend: memory, url: 'redis://x'}", "only for backend: redis"),
        ("{backend: etcd}", "backend"),
        ("{backend: redis, url: 'redis://x', on_error: retry}", "on_error"),
        ("{backend: redis, url: 'redis://x', timeout: 0s}", "timeout"),
        ("{max_keys: 10}", "max_keys"),
    ],
)
def test_bad_state_configs(state: str, message: str) -> None:
    text = errors(f"state: {state}\n")
    assert "state" in text
    assert message in text


def test_state_timeout_must_be_below_the_plugin_timeout() -> None:
    text = errors(
        "state: {backend: redis, url: 'redis://x', timeout: 5s}\nlimits: {plugin_timeout: 5s}\n"
    )
    assert "state.timeout (5 s) must be below limits.plugin_timeout (5 s)" in text
    load("state: {backend: redis, url: 'redis://x', timeout: 4s}\nlimits: {plugin_timeout: 5s}\n")


def test_plugin_backend_memory_overrides_a_redis_state_backend() -> None:
    text = BASE + "state: {backend: redis, url: 'redis://127.0.0.1:1/0', max_keys: 1024}\n"
    text += "routes: [{name: r, upstream: b, plugins: [{rate_limit: {rate: 1/s}}, "
    text += "{rate_limit: {rate: 1/s, backend: memory, name: node}}]}]\n"
    config, source = load_text(text, REGISTRY)
    runtime = compile_config(config, source)
    backends = [p.state_config for p in runtime.plugins]  # type: ignore[attr-defined]
    assert [b.backend for b in backends] == ["redis", "memory"]
    assert backends[1].max_keys == 1024
