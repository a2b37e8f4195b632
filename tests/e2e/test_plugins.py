"""Plugins end to end: the built-in ``headers`` and ``cors``, and the plugin contract proved
through a third-party package that registers itself in the ``gateway.plugins`` entry-point
group (written into a temporary directory and put on the gateway's PYTHONPATH)."""

from __future__ import annotations

import json
import socket
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from tests.support.client import Conn, Response, parse_responses, raw_exchange, request
from tests.support.procs import (
    ROOT,
    GatewayProcess,
    UpstreamProcess,
    free_port,
    run_cli,
    wait_for,
)

APP = "https://app.example.com"
EVIL = "https://evil.example"


def upstream_saw(upstream: UpstreamProcess, target: str) -> list[dict[str, Any]]:
    return [r for r in upstream.received() if r["target"] == target]


def seen_headers(resp: Response) -> list[tuple[str, str]]:
    """The request headers the upstream saw (the echo's JSON), names lower-cased."""
    return [(n.lower(), v) for n, v in resp.json()["headers"]]


# == built-in plugins =========================================================================
@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: 502 from the gateway
    config = {
        "upstreams": {
            "backend": {"targets": [{"url": upstream.url}]},
            "down": {"targets": [{"url": down}], "timeouts": {"connect": "2s"}},
        },
        "routes": [
            {
                "name": "hdr",
                "match": {"path_prefix": "/hdr"},
                "upstream": "backend",
                "prefix_rewrite": "/",
                "plugins": [
                    {
                        "headers": {
                            "request": {
                                "set": {"X-Set": "one"},
                                "add": {"X-Add": "two"},
                                "remove": ["x-remove", "X-Remove-Too"],
                            },
                            "response": {
                                "set": {"X-Resp": "yes", "x-kept": "replaced"},
                                "add": {"X-Resp-Add": "1"},
                                "remove": ["content-type"],
                            },
                        }
                    }
                ],
            },
            {
                "name": "hdr-down",
                "match": {"path_prefix": "/hdr-down"},
                "upstream": "down",
                "plugins": [{"headers": {"response": {"set": {"x-resp": "on-errors-too"}}}}],
            },
            {
                "name": "cors",
                "match": {"path_prefix": "/cors"},
                "upstream": "backend",
                "plugins": [
                    {"headers": {"response": {"set": {"x-outer": "1"}}}},
                    {
                        "cors": {
                            "allow_origins": [APP, "https://admin.example.com"],
                            "allow_methods": ["GET", "POST", "PUT"],
                            "allow_headers": ["Authorization", "content-type", "x-custom"],
                            "expose_headers": ["x-request-id", "x-total"],
                            "allow_credentials": True,
                            "max_age": "10m",
                        }
                    },
                ],
            },
            {
                "name": "cors-any",
                "match": {"path_prefix": "/any-origin"},
                "upstream": "backend",
                "plugins": [{"cors": {"allow_origins": ["*"]}}],
            },
        ],
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("plugins"))
    yield g
    g.stop()


# -- headers ----------------------------------------------------------------------------------
def test_headers_request_edits_are_seen_by_the_upstream(gw: GatewayProcess) -> None:
    resp = request(
        gw.port,
        "GET",
        "/hdr/echo",
        headers=[
            ("X-Set", "zero"),
            ("X-Set", "zero-again"),
            ("X-Add", "zero"),
            ("X-Remove", "gone"),
            ("x-remove-too", "gone"),
            ("X-Other", "kept"),
        ],
    )
    assert resp.status == 200
    seen = seen_headers(resp)
    assert [v for n, v in seen if n == "x-set"] == ["one"]  # set replaces every value
    assert [v for n, v in seen if n == "x-add"] == ["zero", "two"]  # add appends
    assert not [n for n, _ in seen if n in ("x-remove", "x-remove-too")]
    assert ("x-other", "kept") in seen
    assert resp.json()["target"] == "/echo"


def test_headers_response_edits_are_seen_by_the_client(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/hdr/hop")
    assert resp.status == 200 and resp.body == b"hop test"
    assert resp.header("x-resp") == "yes"
    assert resp.header_all("x-kept") == ["replaced"]  # the upstream's value replaced
    assert resp.header("x-resp-add") == "1"
    assert resp.header("content-type") is None
    # framing and the gateway's own headers are untouched by the edits
    assert resp.header("content-length") == "8"
    assert resp.header("x-request-id")


def test_headers_edits_do_not_leak_between_requests(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        for i in range(3):
            resp = c.request("GET", f"/hdr/echo/{i}", headers=[("X-Add", f"client-{i}")])
            assert [v for n, v in seen_headers(resp) if n == "x-add"] == [f"client-{i}", "two"]
            assert resp.header_all("x-resp") == ["yes"]


def test_headers_apply_to_gateway_made_replies(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/hdr-down/x")
    assert resp.status == 502
    assert resp.json()["error"]["code"] == "upstream_connect_failed"
    assert resp.header("x-resp") == "on-errors-too"


# -- cors -------------------------------------------------------------------------------------
def preflight(
    gw: GatewayProcess,
    target: str,
    origin: str,
    method: str,
    req_headers: str | None = None,
) -> Response:
    headers = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if req_headers is not None:
        headers.append(("Access-Control-Request-Headers", req_headers))
    return request(gw.port, "OPTIONS", target, headers=headers)


def test_cors_preflight_is_answered_at_the_edge(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    resp = preflight(gw, "/cors/preflight-ok", APP, "PUT", "Content-Type, X-Custom")
    assert resp.status == 204 and resp.body == b""
    assert resp.header("access-control-allow-origin") == APP
    assert resp.header("access-control-allow-credentials") == "true"
    assert resp.header("access-control-allow-methods") == "GET, POST, PUT"
    assert resp.header("access-control-allow-headers") == "Authorization, content-type, x-custom"
    assert resp.header("access-control-max-age") == "600"
    assert "Origin" in resp.header_all("vary")
    assert resp.header("content-length") is None
    assert resp.header("x-request-id")
    assert resp.header("x-outer") == "1"  # plugins before cors still see its reply
    assert upstream_saw(upstream, "/cors/preflight-ok") == []


@pytest.mark.parametrize(
    ("origin", "method", "req_headers", "message"),
    [
        (EVIL, "GET", None, "CORS preflight: origin not allowed"),
        ("null", "GET", None, "CORS preflight: origin not allowed"),
        (APP, "DELETE", None, "CORS preflight: method not allowed"),
        (APP, "POST", "content-type, x-secret", "CORS preflight: header not allowed"),
    ],
)
def test_cors_disallowed_preflight_is_a_403(
    gw: GatewayProcess,
    upstream: UpstreamProcess,
    origin: str,
    method: str,
    req_headers: str | None,
    message: str,
) -> None:
    target = f"/cors/refused-{method}-{len(origin)}"
    resp = preflight(gw, target, origin, method, req_headers)
    assert resp.status == 403
    assert resp.header("content-type") == "application/json"
    err = resp.json()["error"]
    assert err["code"] == "forbidden" and err["message"] == message
    assert err["request_id"] == resp.header("x-request-id")
    assert resp.header("access-control-allow-origin") is None
    assert upstream_saw(upstream, target) == []


def test_cors_plain_options_goes_upstream(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    resp = request(gw.port, "OPTIONS", "/cors/plain-options", headers=[("Origin", APP)])
    assert resp.status == 200
    assert resp.json()["method"] == "OPTIONS"
    assert resp.header("access-control-allow-origin") == APP
    assert len(upstream_saw(upstream, "/cors/plain-options")) == 1


def test_cors_actual_request_from_an_allowed_origin(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/cors/data", headers=[("Origin", APP)])
    assert resp.status == 200
    assert resp.header_all("access-control-allow-origin") == [APP]
    assert resp.header("access-control-allow-credentials") == "true"
    assert resp.header("access-control-expose-headers") == "x-request-id, x-total"
    assert "Origin" in resp.header_all("vary")
    assert resp.header("x-outer") == "1"


def test_cors_actual_request_from_another_allowed_origin_echoes_it(gw: GatewayProcess) -> None:
    origin = "https://admin.example.com"
    resp = request(gw.port, "POST", "/cors/data", headers=[("Origin", origin)], body=b"{}")
    assert resp.header("access-control-allow-origin") == origin


def test_cors_actual_request_from_a_disallowed_origin(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    resp = request(gw.port, "GET", "/cors/from-evil", headers=[("Origin", EVIL)])
    # not blocked (CORS is enforced by the browser), but not granted either
    assert resp.status == 200
    assert resp.header("access-control-allow-origin") is None
    assert resp.header("access-control-allow-credentials") is None
    assert resp.header("access-control-expose-headers") is None
    assert "Origin" in resp.header_all("vary")
    assert len(upstream_saw(upstream, "/cors/from-evil")) == 1


def test_cors_without_origin_adds_nothing(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/cors/no-origin")
    assert resp.status == 200
    assert not [n for n, _ in resp.headers if n.startswith("access-control-")]


def test_cors_any_origin(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    pre = preflight(gw, "/any-origin/p", "https://x.test", "PATCH", "X-Foo, x-bar")
    assert pre.status == 204
    assert pre.header("access-control-allow-origin") == "*"
    assert pre.header("access-control-allow-credentials") is None
    assert pre.header("access-control-allow-methods") == "GET, HEAD, POST, PUT, PATCH, DELETE"
    # with no allow_headers configured, the requested headers are allowed and echoed
    assert pre.header("access-control-allow-headers") == "x-foo, x-bar"
    assert "Access-Control-Request-Headers" in pre.header_all("vary")
    assert upstream_saw(upstream, "/any-origin/p") == []
    actual = request(gw.port, "GET", "/any-origin/a", headers=[("Origin", "https://x.test")])
    assert actual.header("access-control-allow-origin") == "*"
    assert "Origin" not in actual.header_all("vary")


def test_cors_credentials_with_any_origin_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cors.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            listeners: [{name: a, bind: "127.0.0.1:1"}]
            upstreams: {u: {targets: [{url: "builtin:echo"}]}}
            routes:
              - name: r
                upstream: u
                plugins:
                  - cors:
                      allow_origins: ["*"]
                      allow_credentials: true
                  - cors: {allow_origins: ["https://ok.example/"]}
            """
        )
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: routes[0].plugins[0].cors: allow_credentials cannot be combined with '*' in "
        "allow_origins: list the trusted origins (line 7)",
        f"{path}: routes[0].plugins[1].cors: origin 'https://ok.example/': expected "
        "scheme://host[:port] or '*' (line 10)",
        f"{path}: 2 error(s); config rejected",
    ]


# == the plugin contract, through a third-party package =======================================
PLUGIN_MODULE = '''
"""A third-party plugin package for the tests: registered through entry points only."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

from gateway.plugin import DEFERRED, Plugin, PluginConfig, Reply


def _record(log_file, **fields):
    if log_file:
        with open(log_file, "a") as f:
            f.write(json.dumps(fields) + "\\n")


class MarkConfig(PluginConfig):
    label: str
    log_file: str = ""


class Mark(Plugin):
    """Tags the request and the response with its label; records its log phase."""

    name = "tp_mark"
    Config = MarkConfig

    def on_request(self, ex):
        ex.headers.add(b"x-mark", self.config.label.encode())

    def on_response(self, ex):
        ex.response_headers.add(b"x-mark-resp", self.config.label.encode())

    def on_log(self, ex):
        _record(self.config.log_file, label=self.config.label, path=ex.path.decode(),
                status=ex.status, request_id=ex.request_id)


class AsyncConfig(PluginConfig):
    reply_when: str = ""
    raise_when: str = ""
    hang_when: str = ""


class AsyncWork(Plugin):
    """An async request hook that really awaits (a thread hop), then edits or answers."""

    name = "tp_async"
    Config = AsyncConfig

    async def on_request(self, ex):
        await asyncio.sleep(0.001)
        value = await asyncio.get_running_loop().run_in_executor(None, lambda: "from-thread")
        if self.config.hang_when and ex.headers.get(self.config.hang_when.encode()):
            await asyncio.sleep(3600)  # a plugin awaiting something that never answers
        if self.config.reply_when and ex.headers.get(self.config.reply_when.encode()):
            return Reply(202, b"answered after await", content_type=b"text/plain")
        if self.config.raise_when and ex.headers.get(self.config.raise_when.encode()):
            raise RuntimeError("boom after await")
        ex.headers.add(b"x-async", value.encode())
        return None


class FutureWork(Plugin):
    """A sync request hook that needs I/O: returns a future resolved a moment later (from a
    timer), the way the Redis rate limiter answers; the chain continues without a task."""

    name = "tp_future"
    Config = AsyncConfig

    def on_request(self, ex):
        header = ex.headers.get
        fut = asyncio.get_running_loop().create_future()
        if self.config.hang_when and header(self.config.hang_when.encode()):
            return fut  # never resolved
        if self.config.raise_when and header(self.config.raise_when.encode()):
            asyncio.get_running_loop().call_later(
                0.005, fut.set_exception, RuntimeError("boom in a future")
            )
            return fut
        if self.config.reply_when and header(self.config.reply_when.encode()):
            reply = Reply(203, b"answered by a future", content_type=b"text/plain")
            asyncio.get_running_loop().call_later(0.005, fut.set_result, reply)
            return fut

        def done():
            if not fut.done():
                ex.headers.add(b"x-future", b"resolved")
                fut.set_result(None)

        asyncio.get_running_loop().call_later(0.005, done)
        return fut


class DeferredWork(Plugin):
    """FutureWork with DEFERRED: the hook returns it and answers a moment later through
    ex.resume / ex.resume_failed (no future, no task)."""

    name = "tp_deferred"
    Config = AsyncConfig

    def on_request(self, ex):
        header = ex.headers.get
        loop = asyncio.get_running_loop()
        if self.config.hang_when and header(self.config.hang_when.encode()):
            return DEFERRED  # never resumed
        if self.config.raise_when and header(self.config.raise_when.encode()):
            loop.call_later(0.005, ex.resume_failed, self, RuntimeError("boom, deferred"))
            return DEFERRED
        if self.config.reply_when and header(self.config.reply_when.encode()):
            reply = Reply(203, b"answered by a future", content_type=b"text/plain")
            loop.call_later(0.005, ex.resume, self, reply)
            loop.call_later(0.05, ex.resume, self, None)  # a late second answer: ignored
            return DEFERRED

        def done():
            ex.headers.add(b"x-future", b"resolved")
            ex.resume(self, None)
            ex.resume(self, None)  # a second answer: ignored, even if a later hook now waits

        loop.call_later(0.005, done)
        return DEFERRED


class ShortConfig(PluginConfig):
    status: int = 418
    log_file: str = ""


class Short(Plugin):
    """Answers every request itself."""

    name = "tp_short"
    Config = ShortConfig

    def on_request(self, ex):
        return Reply(self.config.status, b"short-circuited\\n", [(b"X-Short", b"1")],
                     content_type=b"text/plain")

    def on_response(self, ex):
        ex.response_headers.add(b"x-short-resp", str(ex.status).encode())

    def on_log(self, ex):
        _record(self.config.log_file, label="short", path=ex.path.decode(), status=ex.status)


class BoomConfig(PluginConfig):
    hook: Literal["request", "response", "body", "log"] = "request"


class Boom(Plugin):
    """Raises in the configured hook; passes through in the others."""

    name = "tp_boom"
    Config = BoomConfig

    def _maybe(self, hook):
        if self.config.hook == hook:
            raise RuntimeError(f"boom in {hook}")

    def on_request(self, ex):
        self._maybe("request")

    def on_response(self, ex):
        self._maybe("response")
        ex.response_headers.add(b"x-boom-response-ran", b"1")

    def on_response_body(self, ex, chunk, end):
        self._maybe("body")
        return chunk

    def on_log(self, ex):
        self._maybe("log")


class UpperConfig(PluginConfig):
    trailer: str = ""
    hold: bool = False
    log_file: str = ""


class Upper(Plugin):
    """Rewrites a streamed body: upper-cases it (optionally holding it back until the end)
    and appends a trailer line; records what it observed."""

    name = "tp_upper"
    Config = UpperConfig
    rewrites_body = True

    def on_response_body(self, ex, chunk, end):
        calls, seen, ends = ex.var("upper", (0, 0, 0))
        ex.set_var("upper", (calls + 1, seen + len(chunk), ends + end))
        out = chunk.upper()
        if self.config.hold:
            held = ex.var("held", b"") + out
            if not end:
                ex.set_var("held", held)
                return b""
            out = held
        if end:
            out += self.config.trailer.encode()
        return out

    def on_log(self, ex):
        calls, seen, ends = ex.var("upper", (0, 0, 0))
        _record(self.config.log_file, label="upper", path=ex.path.decode(), calls=calls,
                bytes=seen, ends=ends, status=ex.status)


class CountConfig(PluginConfig):
    log_file: str = ""


class Count(Plugin):
    """Observes the body without changing it (no rewrites_body: Content-Length is kept)."""

    name = "tp_count"
    Config = CountConfig

    def on_response_body(self, ex, chunk, end):
        ex.set_var("count", ex.var("count", 0) + len(chunk))
        if end:
            ex.set_var("ended", True)
        return chunk

    def on_log(self, ex):
        _record(self.config.log_file, label="count", path=ex.path.decode(),
                bytes=ex.var("count", 0), ended=ex.var("ended", False))


class LifeConfig(PluginConfig):
    state_file: str


class Life(Plugin):
    """Runs a background task between start() and stop(), once per worker."""

    name = "tp_life"
    Config = LifeConfig

    def __init__(self, config):
        super().__init__(config)
        self.ticks = 0
        self.task = None

    async def start(self):
        _record(self.config.state_file, event="start")
        self.task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self):
        while True:
            self.ticks += 1
            await asyncio.sleep(0.01)

    async def stop(self):
        self.task.cancel()
        _record(self.config.state_file, event="stop", ticking=self.ticks > 0)

    def on_request(self, ex):
        ex.headers.add(b"x-background", b"running" if not self.task.done() else b"stopped")


class Misnamed(Plugin):
    name = "not_what_the_entry_point_says"
'''

ENTRY_POINTS = """\
[gateway.plugins]
tp_mark = thirdparty_gw_plugins:Mark
tp_async = thirdparty_gw_plugins:AsyncWork
tp_future = thirdparty_gw_plugins:FutureWork
tp_deferred = thirdparty_gw_plugins:DeferredWork
tp_short = thirdparty_gw_plugins:Short
tp_boom = thirdparty_gw_plugins:Boom
tp_upper = thirdparty_gw_plugins:Upper
tp_count = thirdparty_gw_plugins:Count
tp_life = thirdparty_gw_plugins:Life
tp_missing = thirdparty_gw_plugins:DoesNotExist
tp_misnamed = thirdparty_gw_plugins:Misnamed
"""


@pytest.fixture(scope="module")
def plugin_pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding an installed-looking distribution: the module plus its
    ``.dist-info`` with METADATA and entry_points.txt."""
    pkgdir = tmp_path_factory.mktemp("thirdparty")
    (pkgdir / "thirdparty_gw_plugins.py").write_text(PLUGIN_MODULE)
    info = pkgdir / "thirdparty_gw_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-gw-plugins\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return pkgdir


def plugin_env(pkgdir: Path) -> dict[str, str]:
    return {"PYTHONPATH": f"{pkgdir}:{ROOT}"}


class Logs:
    """The JSON lines the test plugins append from their on_log hooks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def wait(self, **fields: Any) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            for r in self.records():
                if all(r.get(k) == v for k, v in fields.items()):
                    return r
            return None

        found: dict[str, Any] = wait_for(find, f"an on_log record with {fields}")
        return found


@pytest.fixture(scope="module")
def hooks_log(tmp_path_factory: pytest.TempPathFactory) -> Logs:
    return Logs(tmp_path_factory.mktemp("hooks") / "hooks.jsonl")


def _tp_route(name: str, plugins: list[dict[str, Any]], rewrite: str = "/") -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "upstream": "backend",
        "prefix_rewrite": rewrite,
        "plugins": plugins,
    }


@pytest.fixture(scope="module")
def tgw(
    upstream: UpstreamProcess,
    tmp_path_factory: pytest.TempPathFactory,
    plugin_pkg: Path,
    hooks_log: Logs,
) -> Iterator[GatewayProcess]:
    log = str(hooks_log.path)
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "plugins": [{"tp_mark": {"label": "global", "log_file": log}}],
        "routes": [
            _tp_route(
                "chain",
                [
                    {"tp_mark": {"label": "a"}},
                    {"tp_async": {"raise_when": "x-async-raise"}},
                    {"tp_mark": {"label": "b"}},
                ],
            ),
            _tp_route(
                "future",
                [
                    {"tp_mark": {"label": "a"}},
                    {
                        "tp_future": {
                            "raise_when": "x-future-raise",
                            "reply_when": "x-future-reply",
                            "hang_when": "x-future-hang",
                        }
                    },
                    {"tp_mark": {"label": "b"}},
                ],
            ),
            _tp_route(
                "deferred",
                [
                    {"tp_mark": {"label": "a"}},
                    {
                        "tp_deferred": {
                            "raise_when": "x-future-raise",
                            "reply_when": "x-future-reply",
                            "hang_when": "x-future-hang",
                        }
                    },
                    {"tp_mark": {"label": "b"}},
                ],
            ),
            _tp_route(  # an async hook too: the chain runs as a task, DEFERRED still works
                "deferred-async",
                [
                    {"tp_async": {}},
                    {
                        "tp_deferred": {
                            "raise_when": "x-future-raise",
                            "reply_when": "x-future-reply",
                            "hang_when": "x-future-hang",
                        }
                    },
                    {"tp_mark": {"label": "b"}},
                ],
            ),
            _tp_route(
                "short",
                [
                    {"headers": {"response": {"set": {"x-headers-plugin": "ran"}}}},
                    {"tp_mark": {"label": "before", "log_file": log}},
                    {"tp_short": {"log_file": log}},
                    {"tp_mark": {"label": "after", "log_file": log}},
                ],
            ),
            _tp_route(
                "async-short",
                [
                    {"tp_mark": {"label": "before-async"}},
                    {"tp_async": {"reply_when": "x-answer-here"}},
                    {"tp_mark": {"label": "after-async"}},
                ],
            ),
            _tp_route("boom-req-closed", [{"tp_boom": {"hook": "request"}}]),
            _tp_route(
                "boom-req-open",
                [{"tp_boom": {"hook": "request", "failure_mode": "open"}}, "tp_async"],
            ),
            _tp_route("boom-resp-closed", [{"tp_boom": {"hook": "response"}}]),
            _tp_route(
                "boom-resp-open", [{"tp_boom": {"hook": "response", "failure_mode": "open"}}]
            ),
            _tp_route("boom-body-closed", [{"tp_boom": {"hook": "body"}}]),
            _tp_route("boom-body-open", [{"tp_boom": {"hook": "body", "failure_mode": "open"}}]),
            _tp_route("boom-log", [{"tp_boom": {"hook": "log"}}]),
            _tp_route(
                "upper",
                [{"tp_upper": {"trailer": "data: [done]\n\n", "log_file": log}}],
            ),
            _tp_route("hold", [{"tp_upper": {"hold": True, "trailer": "END\n"}}]),
            _tp_route("count", [{"tp_count": {"log_file": log}}]),
        ],
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("tgw"), extra_env=plugin_env(plugin_pkg))
    yield g
    g.stop()


def test_third_party_plugins_load_from_entry_points(
    tgw: GatewayProcess, plugin_pkg: Path, tmp_path: Path
) -> None:
    assert tgw.alive()
    warnings = [r["msg"] for r in tgw.log_records() if r["level"] == "warning"]
    # a broken entry point is reported and skipped; it does not stop the gateway
    assert any("'tp_missing'" in w and "DoesNotExist" in w for w in warnings), warnings
    assert any("'tp_misnamed'" in w and "differs from entry point name" in w for w in warnings)
    # and ``gateway check`` validates their configs like the built-ins'
    path = tmp_path / "tp.yaml"
    path.write_text(
        "listeners: [{name: a, bind: '127.0.0.1:1'}]\n"
        "upstreams: {u: {targets: [{url: 'builtin:echo'}]}}\n"
        "routes:\n"
        "  - name: r\n"
        "    upstream: u\n"
        "    plugins:\n"
        "      - tp_mark: {lable: x}\n"
        "      - tp_boom: {hook: sometimes}\n"
    )
    result = run_cli("check", "-c", str(path), env=plugin_env(plugin_pkg))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"{path}: routes[0].plugins[0].tp_mark.label: required (line 7)" in lines
    assert f"{path}: routes[0].plugins[0].tp_mark.lable: unknown key (line 7)" in lines
    assert any(line.startswith(f"{path}: routes[0].plugins[1].tp_boom.hook: ") for line in lines)


def test_sync_and_async_request_hooks_run_in_chain_order(tgw: GatewayProcess) -> None:
    resp = request(tgw.port, "GET", "/chain/echo")
    assert resp.status == 200
    seen = seen_headers(resp)
    assert [v for n, v in seen if n == "x-mark"] == ["global", "a", "b"]
    assert ("x-async", "from-thread") in seen  # the async hook's work was awaited
    # response hooks run in reverse: the outermost plugin has the last word
    assert resp.header_all("x-mark-resp") == ["b", "a", "global"]


def test_async_chain_serves_many_requests_on_one_connection(tgw: GatewayProcess) -> None:
    with Conn(tgw.port) as c:
        for i in range(5):
            resp = c.request("POST", f"/chain/echo/{i}", body=b"x" * (i * 1000))
            assert resp.json()["body_len"] == i * 1000
            assert ("x-async", "from-thread") in seen_headers(resp)


def test_pipelined_requests_through_an_async_hook_stay_in_order(tgw: GatewayProcess) -> None:
    raw = b"".join(b"GET /chain/echo/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(5))
    raw += b"GET /chain/echo/last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    responses = parse_responses(raw_exchange(tgw.port, raw))
    targets = [r.json()["target"] for r in responses]
    assert targets == [f"/echo/{i}" for i in range(5)] + ["/echo/last"]


def test_reply_short_circuits_the_chain_and_the_upstream(
    tgw: GatewayProcess, upstream: UpstreamProcess, hooks_log: Logs
) -> None:
    resp = request(tgw.port, "GET", "/short/never-forwarded")
    assert resp.status == 418
    assert resp.body == b"short-circuited\n"
    assert resp.header("content-type") == "text/plain"
    assert resp.header("x-short") == "1"
    rid = resp.header("x-request-id")
    assert rid
    # the plugins that ran get on_response, in reverse order; the one after does not
    assert resp.header("x-short-resp") == "418"
    assert resp.header_all("x-mark-resp") == ["before", "global"]
    assert resp.header("x-headers-plugin") == "ran"
    assert upstream_saw(upstream, "/never-forwarded") == []
    # ... and on_log
    hooks_log.wait(label="short", path="/short/never-forwarded", status=418)
    hooks_log.wait(label="before", request_id=rid, status=418)
    hooks_log.wait(label="global", request_id=rid, status=418)
    assert not [r for r in hooks_log.records() if r.get("label") == "after"]


def test_async_hook_can_short_circuit(tgw: GatewayProcess, upstream: UpstreamProcess) -> None:
    resp = request(tgw.port, "GET", "/async-short/answered", headers=[("x-answer-here", "1")])
    assert resp.status == 202 and resp.body == b"answered after await"
    assert resp.header_all("x-mark-resp") == ["before-async", "global"]
    assert upstream_saw(upstream, "/answered") == []
    passed = request(tgw.port, "GET", "/async-short/y")
    assert passed.status == 200
    assert [v for n, v in seen_headers(passed) if n == "x-mark"] == [
        "global",
        "before-async",
        "after-async",
    ]


def test_exception_in_request_hook_fail_closed(
    tgw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    resp = request(tgw.port, "GET", "/boom-req-closed/x1")
    assert resp.status == 500
    err = resp.json()["error"]
    assert err["code"] == "plugin_error" and err["status"] == 500
    assert err["request_id"] == resp.header("x-request-id")
    assert "boom" not in resp.body.decode()  # no internals leak to the client
    assert upstream_saw(upstream, "/x1") == []
    logged = wait_for(
        lambda: [
            r
            for r in tgw.log_records()
            if r.get("request_id") == err["request_id"] and r["level"] == "error"
        ],
        "the plugin error in the gateway log",
    )
    assert logged[0]["plugin"] == "tp_boom" and logged[0]["hook"] == "on_request"
    assert "RuntimeError: boom in request" in logged[0]["error"]
    assert tgw.alive()
    assert request(tgw.port, "GET", "/chain/echo").status == 200


def test_exception_in_async_request_hook_fail_closed(
    tgw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    resp = request(tgw.port, "GET", "/chain/async-raise", headers=[("x-async-raise", "1")])
    assert resp.status == 500
    assert resp.json()["error"]["code"] == "plugin_error"
    # the failed plugin and those before it ran; the one after did not
    assert resp.header_all("x-mark-resp") == ["a", "global"]
    assert upstream_saw(upstream, "/async-raise") == []
    assert request(tgw.port, "GET", "/chain/echo").status == 200


@pytest.mark.parametrize("route", ["future", "deferred"])
def test_a_hook_future_continues_the_chain_without_a_task(
    tgw: GatewayProcess, upstream: UpstreamProcess, route: str
) -> None:
    passed = request(tgw.port, "GET", f"/{route}/y")
    assert passed.status == 200
    # the hooks after the future's ran once it resolved, in order
    assert [v for n, v in seen_headers(passed) if n in ("x-mark", "x-future")] == [
        "global",
        "a",
        "resolved",
        "b",
    ]
    assert passed.header_all("x-mark-resp") == ["b", "a", "global"]
    # a future resolved with a Reply short-circuits; the plugin after it does not run
    short = request(tgw.port, "GET", f"/{route}/z", headers=[("x-future-reply", "1")])
    assert short.status == 203 and short.body == b"answered by a future"
    assert short.header_all("x-mark-resp") == ["a", "global"]
    assert upstream_saw(upstream, "/z") == []
    # a future that fails is a plugin failure (fail closed), as a hook that raises
    failed = request(tgw.port, "GET", f"/{route}/w", headers=[("x-future-raise", "1")])
    assert failed.status == 500 and failed.json()["error"]["code"] == "plugin_error"
    assert failed.header_all("x-mark-resp") == ["a", "global"]
    assert upstream_saw(upstream, "/w") == []


def test_deferred_hook_in_a_chain_run_as_a_task(
    tgw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    passed = request(tgw.port, "GET", "/deferred-async/y2")
    assert passed.status == 200
    assert [v for n, v in seen_headers(passed) if n in ("x-async", "x-future", "x-mark")] == [
        "global",
        "from-thread",
        "resolved",
        "b",
    ]
    short = request(tgw.port, "GET", "/deferred-async/z2", headers=[("x-future-reply", "1")])
    assert short.status == 203 and short.body == b"answered by a future"
    assert upstream_saw(upstream, "/z2") == []
    failed = request(tgw.port, "GET", "/deferred-async/w2", headers=[("x-future-raise", "1")])
    assert failed.status == 500 and failed.json()["error"]["code"] == "plugin_error"
    assert upstream_saw(upstream, "/w2") == []


@pytest.mark.parametrize("route", ["future", "deferred"])
def test_pipelined_requests_through_a_hook_future_stay_in_order(
    tgw: GatewayProcess, route: str
) -> None:
    raw = b"".join(
        b"GET /%s/p%d HTTP/1.1\r\nHost: t\r\n%s\r\n"
        % (route.encode(), i, b"x-future-reply: 1\r\n" if i % 2 else b"")
        for i in range(6)
    )
    responses = parse_responses(raw_exchange(tgw.port, raw))
    assert [r.status for r in responses] == [200, 203, 200, 203, 200, 203]
    assert [r.json()["target"] for r in responses[::2]] == ["/p0", "/p2", "/p4"]


@pytest.mark.parametrize("route", ["future", "deferred"])
def test_client_gone_while_a_hook_future_waits(tgw: GatewayProcess, route: str) -> None:
    with socket.create_connection(("127.0.0.1", tgw.port)) as sock:
        sock.sendall(
            b"GET /%s/gone HTTP/1.1\r\nHost: t\r\nx-future-hang: 1\r\n\r\n" % route.encode()
        )
        time.sleep(0.1)
    assert tgw.alive()
    assert request(tgw.port, "GET", f"/{route}/after").status == 200


def test_exception_in_request_hook_fail_open(tgw: GatewayProcess) -> None:
    resp = request(tgw.port, "GET", "/boom-req-open/x2")
    assert resp.status == 200
    assert resp.json()["target"] == "/x2"
    assert ("x-async", "from-thread") in seen_headers(resp)  # later plugins still ran


def test_exception_in_response_hook(tgw: GatewayProcess) -> None:
    closed = request(tgw.port, "GET", "/boom-resp-closed/echo")
    assert closed.status == 500
    assert closed.json()["error"]["code"] == "plugin_error"
    opened = request(tgw.port, "GET", "/boom-resp-open/echo")
    assert opened.status == 200
    assert opened.json()["target"] == "/echo"
    assert opened.header("x-boom-response-ran") is None  # the hook stopped at the raise


def test_exception_in_body_hook_fail_closed_cuts_the_response(tgw: GatewayProcess) -> None:
    with Conn(tgw.port) as c, pytest.raises((ConnectionError, h11.RemoteProtocolError)):
        c.request("GET", "/boom-body-closed/download?size=100000")
    assert tgw.alive()
    assert request(tgw.port, "GET", "/chain/echo").status == 200


def test_exception_in_body_hook_fail_open_passes_the_body(tgw: GatewayProcess) -> None:
    resp = request(tgw.port, "GET", "/boom-body-open/download?size=100000")
    assert resp.status == 200 and len(resp.body) == 100000


def test_exception_in_log_hook_does_not_affect_the_response(tgw: GatewayProcess) -> None:
    with Conn(tgw.port) as c:
        for _ in range(2):
            assert c.request("GET", "/boom-log/echo").status == 200
    assert tgw.alive()


SSE_EVENTS = b"".join(b"data: event %d\n\n" % i for i in range(5))


def test_body_hook_rewrites_a_streamed_sse_response(tgw: GatewayProcess, hooks_log: Logs) -> None:
    with Conn(tgw.port) as c:
        resp = c.request("GET", "/upper/sse?events=5&delay=0.01")
        assert resp.status == 200
        assert resp.header("content-type") == "text/event-stream"
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == SSE_EVENTS.upper() + b"data: [done]\n\n"
        rid = resp.header("x-request-id")
        # the connection is still in a clean state
        assert c.request("GET", "/upper/echo").status == 200
    seen = hooks_log.wait(label="upper", path="/upper/sse")
    assert seen["bytes"] == len(SSE_EVENTS)  # the hook observed every upstream byte
    assert seen["ends"] == 1  # and the end exactly once
    assert seen["calls"] >= 2
    hooks_log.wait(label="global", request_id=rid)


def test_body_hook_output_is_streamed_not_buffered(tgw: GatewayProcess) -> None:
    """The upstream sends its head and 100 of 1000 promised bytes, then stalls: the client
    still gets the rewritten bytes, so the hook runs per chunk as they arrive."""
    with socket.create_connection(("127.0.0.1", tgw.port), timeout=10) as s:
        s.sendall(b"GET /upper/stall-mid HTTP/1.1\r\nHost: t\r\n\r\n")
        data = bytearray()
        while b"P" * 100 + b"\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"closed early: {bytes(data)!r}"
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"64\r\n" + b"P" * 100 + b"\r\n"


def test_body_hook_changing_a_content_length_body_is_reframed(tgw: GatewayProcess) -> None:
    from tests.support.upstream_server import PATTERN

    size = 200_000
    expected = (PATTERN * 4)[:size].upper() + b"data: [done]\n\n"
    with Conn(tgw.port) as c:
        resp = c.request("GET", f"/upper/download?size={size}")
        assert resp.status == 200
        assert resp.header("content-length") is None  # the upstream's no longer holds
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == expected
        again = c.request("GET", "/upper/status/200")
        assert again.body == b"STATUS 200\ndata: [done]\n\n"


def test_body_hook_on_http10_client_is_close_delimited(tgw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", tgw.port), timeout=10) as s:
        s.sendall(b"GET /upper/download?size=5000 HTTP/1.0\r\n\r\n")
        data = bytearray()
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 ")
    assert b"content-length" not in head.lower()
    assert b"transfer-encoding" not in head.lower()
    assert body.endswith(b"data: [done]\n\n") and len(body) == 5000 + 14


def test_body_hook_holding_bytes_back_until_the_end(tgw: GatewayProcess) -> None:
    resp = request(tgw.port, "GET", "/hold/sse?events=3&delay=0.01")
    assert resp.body == b"DATA: EVENT 0\n\nDATA: EVENT 1\n\nDATA: EVENT 2\n\nEND\n"


@pytest.mark.parametrize(
    ("method", "target"),
    [("HEAD", "/upper/echo"), ("GET", "/upper/status/204"), ("GET", "/upper/status/304")],
)
def test_body_hook_on_a_response_without_body(
    tgw: GatewayProcess, method: str, target: str
) -> None:
    """A bodiless response stays bodiless: the hook's end-of-body output has nowhere to go."""
    with Conn(tgw.port) as c:
        resp = c.request(method, target)
        assert resp.body == b""
        follow = c.request("GET", "/chain/echo/after-bodiless")
        assert follow.status == 200
        assert follow.json()["target"] == "/echo/after-bodiless"


def test_observing_body_hook_keeps_content_length(tgw: GatewayProcess, hooks_log: Logs) -> None:
    from tests.support.upstream_server import PATTERN

    resp = request(tgw.port, "GET", "/count/download?size=70000")
    assert resp.header("content-length") == "70000"
    assert resp.header("transfer-encoding") is None
    assert resp.body == (PATTERN * 2)[:70000]
    seen = hooks_log.wait(label="count", path="/count/download")
    assert seen == {"label": "count", "path": "/count/download", "bytes": 70000, "ended": True}


def test_plugin_errors_leave_the_gateway_serving(tgw: GatewayProcess) -> None:
    for path in ("/boom-req-closed/a", "/boom-resp-closed/echo", "/boom-log/echo"):
        request(tgw.port, "GET", path)
    assert tgw.alive()
    resp = request(tgw.port, "GET", "/chain/echo/still-up")
    assert resp.status == 200


def test_start_and_stop_run_once_per_worker(
    upstream: UpstreamProcess,
    start_gateway: Callable[..., GatewayProcess],
    plugin_pkg: Path,
    tmp_path: Path,
) -> None:
    state = tmp_path / "life.jsonl"
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "upstream": "backend",
                "plugins": [{"tp_life": {"state_file": str(state)}}],
            }
        ],
    }
    g = start_gateway(config, extra_env=plugin_env(plugin_pkg))
    # start() is awaited before the listener opens
    assert [json.loads(line) for line in state.read_text().splitlines()] == [{"event": "start"}]
    resp = request(g.port, "GET", "/echo")
    assert ("x-background", "running") in seen_headers(resp)
    assert g.stop() == 0
    assert [json.loads(line) for line in state.read_text().splitlines()] == [
        {"event": "start"},
        {"event": "stop", "ticking": True},
    ]


@pytest.mark.parametrize("plugin", ["tp_async", "tp_future", "tp_deferred"])
def test_async_plugin_that_never_finishes_gets_plugin_timeout(
    upstream: UpstreamProcess,
    start_gateway: Callable[..., GatewayProcess],
    plugin_pkg: Path,
    plugin: str,
) -> None:
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [_tp_route("slow", [{plugin: {"hang_when": "x-hang"}}])],
        "limits": {"plugin_timeout": "1s"},
    }
    g = start_gateway(config, extra_env=plugin_env(plugin_pkg))
    resp = request(g.port, "GET", "/slow/echo", headers=[("x-hang", "1")])
    assert resp.status == 504
    assert resp.json()["error"]["code"] == "plugin_timeout"
    assert request(g.port, "GET", "/slow/echo").status == 200  # a request that does not hang
    assert g.alive()


def test_a_lone_sync_request_hook_is_called_by_the_protocol_itself(
    upstream: UpstreamProcess,
    start_gateway: Callable[..., GatewayProcess],
    plugin_pkg: Path,
) -> None:
    # With one sync request hook and no global plugins, the protocol calls the hook directly
    # (Chain.only_hook) instead of running the chain's loop: every kind of answer must still
    # be handled as the loop handles it.
    answers = {"reply_when": "x-reply", "raise_when": "x-raise"}
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [
            _tp_route("mark", [{"tp_mark": {"label": "only"}}]),
            _tp_route("closed", [{"tp_boom": {"hook": "request"}}]),
            _tp_route("open", [{"tp_boom": {"hook": "request", "failure_mode": "open"}}]),
            _tp_route("short", [{"tp_short": {}}]),
            _tp_route("future", [{"tp_future": answers}]),
            _tp_route("deferred", [{"tp_deferred": answers}]),
        ],
    }
    g = start_gateway(config, extra_env=plugin_env(plugin_pkg))
    marked = request(g.port, "GET", "/mark/m")
    assert marked.status == 200 and ("x-mark", "only") in seen_headers(marked)
    assert marked.header_all("x-mark-resp") == ["only"]  # its response hook ran too

    closed = request(g.port, "GET", "/closed/c")
    assert closed.status == 500 and closed.json()["error"]["code"] == "plugin_error"
    assert upstream_saw(upstream, "/c") == []
    opened = request(g.port, "GET", "/open/o")
    assert opened.status == 200 and opened.json()["target"] == "/o"

    short = request(g.port, "GET", "/short/s")
    assert short.status == 418 and short.body == b"short-circuited\n"
    assert short.header_all("x-short-resp") == ["418"]  # the replying plugin's own hook ran

    for route in ("future", "deferred"):
        assert request(g.port, "GET", f"/{route}/p").status == 200
        replied = request(g.port, "GET", f"/{route}/r", headers=[("x-reply", "1")])
        assert replied.status == 203 and replied.body == b"answered by a future"
        failed = request(g.port, "GET", f"/{route}/f", headers=[("x-raise", "1")])
        assert failed.status == 500 and failed.json()["error"]["code"] == "plugin_error"
    assert upstream_saw(upstream, "/r") == [] and upstream_saw(upstream, "/f") == []
    assert g.alive()


def test_a_second_resume_does_not_answer_the_next_deferred_hook(
    upstream: UpstreamProcess,
    start_gateway: Callable[..., GatewayProcess],
    plugin_pkg: Path,
) -> None:
    # Two DEFERRED hooks in a row; the first answers twice. Its second answer comes while
    # the second hook waits and must not be taken for that hook's (here a 203).
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [
            _tp_route("two", [{"tp_deferred": {}}, {"tp_deferred": {"reply_when": "x-b"}}]),
            _tp_route(  # the same with the chain run as a task (an async hook first)
                "two-async",
                ["tp_async", {"tp_deferred": {}}, {"tp_deferred": {"reply_when": "x-b"}}],
            ),
        ],
    }
    g = start_gateway(config, extra_env=plugin_env(plugin_pkg))
    for route in ("two", "two-async"):
        resp = request(g.port, "GET", f"/{route}/t", headers=[("x-b", "1")])
        assert resp.status == 203, (resp.status, resp.body[:80])
        assert resp.body == b"answered by a future"
    assert upstream_saw(upstream, "/t") == []
    assert request(g.port, "GET", "/two/u").status == 200  # no reply_when header: passes
