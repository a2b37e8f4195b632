"""The plugin contract without sockets: hook discovery, the registry and its entry points, and
the compiled ``Chain`` (order, short-circuit, which plugins see the response, failure modes).
The same contract is proved end to end in tests/e2e/test_plugins.py."""

from __future__ import annotations

import asyncio
import logging
from importlib.metadata import EntryPoint
from typing import Any

import pytest
from pydantic import ValidationError

import gateway.plugin
from gateway.plugin import (
    ENTRY_POINT_GROUP,
    Plugin,
    PluginConfig,
    Registry,
    Reply,
    default_registry,
    implemented_hooks,
)
from gateway.proxy.chain import Chain, PluginFailure
from gateway.proxy.exchange import Exchange
from tests.support.exchange import make_exchange


def exchange() -> Exchange:
    ex = make_exchange(route=None)
    ex.request_id = "rid-1"
    ex.set_var("trace", [])
    return ex


def trace(ex: Exchange) -> list[str]:
    value: list[str] = ex.var("trace")
    return value


class LabelConfig(PluginConfig):
    label: str = ""
    reply: int = 0
    fail: str = ""


class Tracer(Plugin):
    """Records every hook it runs in ``ex.vars['trace']``; can reply or raise on demand."""

    name = "tracer"
    Config = LabelConfig

    def _step(self, ex: Exchange, hook: str) -> None:
        assert isinstance(self.config, LabelConfig)
        trace(ex).append(f"{self.config.label}.{hook}")
        if self.config.fail == hook:
            raise RuntimeError(f"{self.config.label} failed in {hook}")

    def on_request(self, ex: Exchange) -> Reply | None:
        self._step(ex, "request")
        assert isinstance(self.config, LabelConfig)
        if self.config.reply:
            return Reply(self.config.reply, b"from " + self.config.label.encode())
        return None

    def on_response(self, ex: Exchange) -> None:
        self._step(ex, "response")

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes:
        self._step(ex, "body")
        assert isinstance(self.config, LabelConfig)
        return chunk + self.config.label.encode() + (b"!" if end else b"")

    def on_log(self, ex: Exchange) -> None:
        self._step(ex, "log")


class AsyncTracer(Tracer):
    name = "async_tracer"

    async def on_request(self, ex: Exchange) -> Reply | None:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().on_request(ex)


class RequestOnly(Plugin):
    name = "request_only"

    def on_request(self, ex: Exchange) -> None:
        trace(ex).append("request_only.request")


class Rewriter(Tracer):
    name = "rewriter"
    rewrites_body = True


def tracer(label: str, cls: type[Tracer] = Tracer, **kw: Any) -> Tracer:
    return cls(cls.Config(label=label, **kw))


# -- hooks and config -------------------------------------------------------------------------
def test_implemented_hooks_records_which_and_whether_async() -> None:
    assert implemented_hooks(Plugin) == {}
    assert implemented_hooks(RequestOnly) == {"on_request": False}
    assert implemented_hooks(Tracer) == {
        "on_request": False,
        "on_response": False,
        "on_response_body": False,
        "on_log": False,
    }
    assert implemented_hooks(AsyncTracer)["on_request"] is True


@pytest.mark.parametrize("hook", ["on_response", "on_response_body", "on_log"])
def test_only_on_request_may_be_async(hook: str) -> None:
    async def hook_fn(self: Plugin, *args: Any) -> None:
        return None

    cls = type("BadAsync", (Plugin,), {"name": "bad_async", hook: hook_fn})
    with pytest.raises(TypeError, match=f"{hook} must be a plain"):
        Registry([cls])


def test_plugin_config_base() -> None:
    assert PluginConfig().failure_mode == "closed"
    assert PluginConfig(failure_mode="open").failure_mode == "open"
    with pytest.raises(ValidationError):
        PluginConfig(failure_mode="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        PluginConfig.model_validate({"unknown": 1})
    config = LabelConfig(label="x")
    with pytest.raises(ValidationError):
        config.label = "y"  # type: ignore[misc]
    plugin = Tracer(LabelConfig(failure_mode="open"))
    assert plugin.fail_open and plugin.errors == 0
    assert repr(plugin) == "<Tracer tracer>"


def test_reply_error() -> None:
    reply = Reply.error("rate_limited", headers=[(b"retry-after", b"1")])
    assert (reply.status, reply.code, reply.message) == (429, "rate_limited", "too many requests")
    assert reply.headers == [(b"retry-after", b"1")]
    custom = Reply.error("forbidden", "not you", status=451)
    assert (custom.status, custom.message) == (451, "not you")
    with pytest.raises(KeyError):
        Reply.error("no_such_code")
    plain = Reply(200, b"hi", [(b"X-A", b"1")], content_type=b"text/plain")
    assert plain.code is None
    assert plain.headers == [(b"X-A", b"1"), (b"content-type", b"text/plain")]


# -- registry ---------------------------------------------------------------------------------
def test_registry_by_name() -> None:
    registry = Registry([Tracer, RequestOnly])
    assert registry.get("tracer") is Tracer
    assert registry.get("nope") is None
    assert registry.names() == ["request_only", "tracer"]
    nameless = type("Nameless", (Plugin,), {})
    with pytest.raises(TypeError, match="has no name"):
        registry.register(nameless)


def test_default_registry_has_the_built_ins() -> None:
    names = default_registry().names()
    assert "headers" in names and "cors" in names


class NotAPlugin:
    name = "not_a_plugin"


def test_entry_points_are_loaded_and_broken_ones_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = __name__
    eps = [
        EntryPoint("tracer", f"{here}:Tracer", ENTRY_POINT_GROUP),
        EntryPoint("request_only", f"{here}:RequestOnly", ENTRY_POINT_GROUP),
        EntryPoint("missing", f"{here}:Missing", ENTRY_POINT_GROUP),
        EntryPoint("not_a_plugin", f"{here}:NotAPlugin", ENTRY_POINT_GROUP),
        EntryPoint("misnamed", f"{here}:Rewriter", ENTRY_POINT_GROUP),
        EntryPoint("gone", "no_such_module_for_gateway_tests:X", ENTRY_POINT_GROUP),
    ]
    seen_groups: list[str] = []

    def fake_entry_points(group: str) -> list[EntryPoint]:
        seen_groups.append(group)
        return eps

    monkeypatch.setattr(gateway.plugin, "entry_points", fake_entry_points)
    registry = Registry([RequestOnly])
    problems = registry.load_entry_points()
    assert seen_groups == ["gateway.plugins"]
    assert registry.get("tracer") is Tracer
    assert registry.get("request_only") is RequestOnly  # already known: kept, not reloaded
    assert len(problems) == 4
    assert problems[0].startswith(f"plugin entry point 'missing' ({here}:Missing): ")
    assert "not a gateway.plugin.Plugin subclass" in problems[1]
    assert "class name 'rewriter' differs from entry point name" in problems[2]
    assert "no_such_module_for_gateway_tests" in problems[3]
    assert registry.names() == ["request_only", "tracer"]


# -- the chain --------------------------------------------------------------------------------
def test_chain_indexes_hooks_by_phase() -> None:
    a, b = tracer("a"), tracer("b")
    only = RequestOnly(PluginConfig())
    chain = Chain([a, only, b])
    assert [p for _, p, _, _ in chain.request_hooks] == [a, only, b]
    # response-side phases run in reverse order, and only for plugins implementing them
    assert [p for _, p, _ in chain.response_hooks] == [b, a]
    assert [p for _, p, _ in chain.body_hooks] == [b, a]
    assert [p for _, p, _ in chain.log_hooks] == [b, a]
    assert not chain.has_async_request and not chain.rewrites_body
    assert Chain([a, tracer("x", AsyncTracer)]).has_async_request
    assert Chain([a, tracer("r", Rewriter)]).rewrites_body
    assert repr(chain) == "<Chain ['tracer', 'request_only', 'tracer']>"


def test_sync_chain_runs_without_an_event_loop() -> None:
    chain = Chain([tracer("a"), tracer("b")])
    ex = exchange()
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # none here: a sync chain must not need one
    assert chain.run_request(ex) is None
    assert ex.plugins_ran == 2
    chain.run_response(ex)
    assert chain.run_body(ex, b"x", False) == b"xba"  # innermost plugin first
    assert chain.run_body(ex, b"", True) == b"b!a!"
    chain.run_log(ex)
    assert trace(ex) == [
        "a.request",
        "b.request",
        "b.response",
        "a.response",
        "b.body",
        "a.body",
        "b.body",
        "a.body",
        "b.log",
        "a.log",
    ]


def test_short_circuit_skips_later_request_hooks_but_not_earlier_response_hooks() -> None:
    chain = Chain([tracer("a"), tracer("b", reply=429), tracer("c")])
    ex = exchange()
    reply = chain.run_request(ex)
    assert reply is not None and reply.status == 429 and reply.body == b"from b"
    assert ex.plugins_ran == 2
    chain.run_response(ex)
    chain.run_log(ex)
    assert trace(ex) == ["a.request", "b.request", "b.response", "a.response", "b.log", "a.log"]


def test_plugins_without_request_hook_before_the_short_circuit_still_respond() -> None:
    class ResponseOnly(Plugin):
        name = "response_only"

        def on_response(self, ex: Exchange) -> None:
            trace(ex).append("response_only.response")

    chain = Chain([ResponseOnly(PluginConfig()), tracer("b", reply=403), tracer("c")])
    ex = exchange()
    assert chain.run_request(ex) is not None
    chain.run_response(ex)
    assert trace(ex) == ["b.request", "b.response", "response_only.response"]


async def test_async_chain_runs_sync_and_async_hooks_in_order() -> None:
    chain = Chain([tracer("a"), tracer("b", AsyncTracer), tracer("c")])
    ex = exchange()
    assert await chain.run_request_async(ex) is None
    assert trace(ex) == ["a.request", "b.request", "c.request"]
    assert ex.plugins_ran == 3
    short = Chain([tracer("a"), tracer("b", AsyncTracer, reply=202), tracer("c")])
    ex2 = exchange()
    reply = await short.run_request_async(ex2)
    assert reply is not None and reply.status == 202
    assert ex2.plugins_ran == 2
    assert trace(ex2) == ["a.request", "b.request"]


class SometimesAsync(Tracer):
    """A sync hook that returns an awaitable when it needs I/O (``label`` ending in "?")."""

    name = "sometimes_async"

    def on_request(self, ex: Exchange) -> Any:
        assert isinstance(self.config, LabelConfig)
        if not self.config.label.endswith("?"):
            return super().on_request(ex)

        async def later() -> Reply | None:
            await asyncio.sleep(0)
            if self.config.fail == "later":  # type: ignore[attr-defined]
                raise RuntimeError("failed while waiting")
            return super(SometimesAsync, self).on_request(ex)

        return later()


async def test_sync_hook_returning_an_awaitable_continues_the_chain_in_order() -> None:
    chain = Chain([tracer("a"), tracer("b?", SometimesAsync), tracer("c"), tracer("d")])
    assert not chain.has_async_request
    ex = exchange()
    pending = chain.run_request(ex)
    assert pending is not None and not isinstance(pending, Reply)
    assert trace(ex) == ["a.request"]  # the rest waits for the awaitable
    assert await pending is None  # type: ignore[misc]
    assert trace(ex) == ["a.request", "b?.request", "c.request", "d.request"]
    assert ex.plugins_ran == 4
    # its Reply short-circuits; an awaitable from the last hook ends the phase
    short = Chain([tracer("a"), tracer("b?", SometimesAsync, reply=401), tracer("c")])
    ex2 = exchange()
    reply = await short.run_request(ex2)  # type: ignore[misc]
    assert reply.status == 401 and ex2.plugins_ran == 2
    last = Chain([tracer("a"), tracer("b?", SometimesAsync)])
    ex3 = exchange()
    assert await last.run_request(ex3) is None  # type: ignore[misc]
    assert ex3.plugins_ran == 2
    # the async chain awaits it too
    mixed = Chain(
        [tracer("a"), tracer("b?", SometimesAsync), tracer("c", AsyncTracer), tracer("d")]
    )
    ex4 = exchange()
    assert await mixed.run_request_async(ex4) is None
    assert trace(ex4) == ["a.request", "b?.request", "c.request", "d.request"]


async def test_sync_hook_awaitable_failure_follows_failure_mode() -> None:
    failing = tracer("b?", SometimesAsync, fail="later")
    reply = await Chain([failing, tracer("c")]).run_request(exchange())  # type: ignore[misc]
    assert reply.code == "plugin_error" and failing.errors == 1
    opened = tracer("b?", SometimesAsync, fail="later", failure_mode="open")
    ex = exchange()
    assert await Chain([opened, tracer("c")]).run_request(ex) is None  # type: ignore[misc]
    assert trace(ex) == ["c.request"]


def test_exception_fail_closed_is_a_500_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    failing = tracer("b", fail="request")
    chain = Chain([tracer("a"), failing, tracer("c")])
    ex = exchange()
    with caplog.at_level(logging.ERROR, logger="gateway.plugin"):
        reply = chain.run_request(ex)
    assert reply is not None
    assert (reply.status, reply.code) == (500, "plugin_error")
    assert failing.errors == 1
    assert ex.plugins_ran == 2  # the failed plugin counts as having run
    (record,) = caplog.records
    assert record.request_id == "rid-1"  # type: ignore[attr-defined]
    assert record.plugin == "tracer" and record.hook == "on_request"  # type: ignore[attr-defined]
    assert record.exc_info is not None


def test_exception_fail_open_carries_on() -> None:
    failing = tracer("b", fail="request", failure_mode="open")
    chain = Chain([tracer("a"), failing, tracer("c")])
    ex = exchange()
    assert chain.run_request(ex) is None
    assert trace(ex) == ["a.request", "b.request", "c.request"]
    assert failing.errors == 1


async def test_exception_in_async_hook_follows_failure_mode() -> None:
    closed = Chain([tracer("a", AsyncTracer, fail="request"), tracer("b")])
    reply = await closed.run_request_async(exchange())
    assert reply is not None and reply.code == "plugin_error"
    opened = Chain([tracer("a", AsyncTracer, fail="request", failure_mode="open"), tracer("b")])
    ex = exchange()
    assert await opened.run_request_async(ex) is None
    assert trace(ex) == ["a.request", "b.request"]


@pytest.mark.parametrize("hook", ["response", "body"])
def test_exception_in_response_phases(hook: str) -> None:
    def run(chain: Chain, ex: Exchange) -> None:
        if hook == "response":
            chain.run_response(ex)
        else:
            chain.run_body(ex, b"x", False)

    closed = Chain([tracer("a"), tracer("b", fail=hook)])
    ex = exchange()
    closed.run_request(ex)
    with pytest.raises(PluginFailure):
        run(closed, ex)
    opened = Chain([tracer("a"), tracer("b", fail=hook, failure_mode="open")])
    ex = exchange()
    opened.run_request(ex)
    run(opened, ex)  # the failing hook is skipped, the others still run
    assert trace(ex)[-1] == f"a.{hook}"


def test_exception_in_log_hook_never_propagates() -> None:
    failing = tracer("b", fail="log")
    chain = Chain([tracer("a"), failing])
    ex = exchange()
    chain.run_request(ex)
    chain.run_log(ex)
    assert trace(ex)[-2:] == ["b.log", "a.log"]
    assert failing.errors == 1
