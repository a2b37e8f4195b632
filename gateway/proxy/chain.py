"""A route's compiled plugin chain: which plugins implement which phase, sync or async.

Built once per route at config load (global plugins first, then the route's). A phase
iterates only the plugins that implement it; a chain whose request hooks are all sync is
run without creating a coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway.plugin import DEFERRED, Deferred, Plugin, Reply, implemented_hooks

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange

log = logging.getLogger("gateway.plugin")

Hook = Callable[..., Any]
#: What the request phase answers: go on (None), a reply, or what to wait for.
Pending = Reply | Awaitable[Reply | None] | asyncio.Future[Reply | None] | Deferred | None


class PluginFailure(Exception):
    """A fail-closed plugin raised in a phase where the exchange cannot go on."""


class Chain:
    __slots__ = (
        "_after",
        "body_hooks",
        "has_async_request",
        "last_request_pos",
        "log_hooks",
        "only_hook",
        "plugins",
        "request_hooks",
        "response_hooks",
        "rewrites_body",
        "size",
    )

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        self.plugins = tuple(plugins)
        request: list[tuple[int, Plugin, Hook, bool]] = []
        response: list[tuple[int, Plugin, Hook]] = []
        body: list[tuple[int, Plugin, Hook]] = []
        logs: list[tuple[int, Plugin, Hook]] = []
        for pos, plugin in enumerate(self.plugins):
            hooks = implemented_hooks(type(plugin))
            if "on_request" in hooks:
                request.append((pos, plugin, plugin.on_request, hooks["on_request"]))  # type: ignore[attr-defined]
            if "on_response" in hooks:
                response.append((pos, plugin, plugin.on_response))  # type: ignore[attr-defined]
            if "on_response_body" in hooks:
                body.append((pos, plugin, plugin.on_response_body))  # type: ignore[attr-defined]
            if "on_log" in hooks:
                logs.append((pos, plugin, plugin.on_log))  # type: ignore[attr-defined]
        self.request_hooks = tuple(request)
        #: plugin position -> index in ``request_hooks`` of the hook after that plugin's
        self._after = {hook[0]: i + 1 for i, hook in enumerate(request)}
        self.has_async_request = any(is_async for *_, is_async in request)
        #: the position of the plugin with the last request hook (-1: none): when that hook's
        #: deferred answer is None, the request phase is over (``request_done``'s answer)
        self.last_request_pos = request[-1][0] if request else -1
        #: a lone sync request hook, which the protocol calls itself (``run_request``'s loop
        #: would cost ~1k instructions more per request): answers go to ``hook_answered``
        self.only_hook: Hook | None = (
            request[0][2] if len(request) == 1 and not request[0][3] else None
        )
        self.size = len(self.plugins)
        # Response-side phases run in reverse order: the outermost plugin sees the final word.
        self.response_hooks = tuple(reversed(response))
        self.body_hooks = tuple(reversed(body))
        self.log_hooks = tuple(reversed(logs))
        self.rewrites_body = any(type(p).rewrites_body for _, p, _ in body)

    # -- request phase ----------------------------------------------------------------------
    def run_request(self, ex: Exchange, start: int = 0) -> Pending:
        """The request phase when every hook is sync, from hook ``start`` on. When a sync hook
        needs I/O this time it returns ``DEFERRED``, an ``asyncio.Future`` or another
        awaitable:

        - ``DEFERRED`` or a future is returned as it is, with ``ex.plugins_ran`` set to the
          position of its plugin: the caller waits for ``ex.resume`` or the future's done
          callback (no task, no coroutine), then calls ``request_done``;
        - any other awaitable: the rest of the phase is returned as an awaitable too, which
          the caller runs in a task."""
        hooks = self.request_hooks[start:] if start else self.request_hooks
        for pos, plugin, fn, _ in hooks:
            try:
                reply = fn(ex)
            except Exception:
                reply = _failed(plugin, ex, "on_request")
            if reply is not None:
                if reply is DEFERRED:
                    ex.plugins_ran = pos
                    return reply
                return self.hook_answered(ex, pos, plugin, reply)
        ex.plugins_ran = len(self.plugins)
        return None

    def hook_answered(self, ex: Exchange, pos: int, plugin: Plugin, reply: Any) -> Pending:
        """The hook of the plugin at ``pos`` answered something other than None (and than
        ``DEFERRED``, which callers handle inline): as ``run_request`` answers."""
        if isinstance(reply, Reply):
            ex.plugins_ran = pos + 1
            return reply
        if reply is DEFERRED or isinstance(reply, asyncio.Future):
            ex.plugins_ran = pos
            return reply
        return self._resume(ex, pos, plugin, reply)

    def only_failed(self, ex: Exchange) -> Reply | None:
        """``only_hook`` raised (call in the ``except`` block)."""
        return _failed(self.request_hooks[0][1], ex, "on_request")

    def request_done(self, ex: Exchange, reply: Reply | None, exc: Exception | None) -> Pending:
        """The hook that ``run_request`` stopped at has answered (``reply``, or ``exc`` when
        it failed): that reply, or the hooks after it, as ``run_request`` answers."""
        pos = ex.plugins_ran
        if exc is not None:
            reply = _failed(self.plugins[pos], ex, "on_request", exc)
        if reply is not None:
            ex.plugins_ran = pos + 1
            return reply
        return self.run_request(ex, self._after[pos])  # none left: None

    async def run_request_async(self, ex: Exchange, start: int = 0) -> Reply | None:
        hooks = self.request_hooks[start:] if start else self.request_hooks
        for pos, plugin, fn, is_async in hooks:
            try:
                reply = (await fn(ex)) if is_async else fn(ex)
                if reply is DEFERRED:  # answered through ex.resume: wait for it here
                    ex.plugins_ran = pos  # as the sync chain does (ex.resume checks it)
                    reply = await ex.wait_deferred()
                elif reply is not None and not isinstance(reply, Reply):
                    reply = await reply  # a sync hook that needed I/O this time
            except Exception:
                reply = _failed(plugin, ex, "on_request")
            if reply is not None:
                ex.plugins_ran = pos + 1
                return reply  # type: ignore[no-any-return]
        ex.plugins_ran = len(self.plugins)
        return None

    async def _resume(
        self, ex: Exchange, pos: int, plugin: Plugin, pending: Awaitable[Reply | None]
    ) -> Reply | None:
        """Finish a sync hook's awaitable, then the hooks after it."""
        try:
            reply = await pending
        except Exception:
            reply = _failed(plugin, ex, "on_request")
        if reply is not None:
            ex.plugins_ran = pos + 1
            return reply
        return await self.run_request_async(ex, self._after[pos])  # none left: None

    # -- response phases --------------------------------------------------------------------
    def run_response(self, ex: Exchange) -> None:
        """Raises ``PluginFailure`` when a fail-closed plugin raised."""
        ran = ex.plugins_ran
        for pos, plugin, fn in self.response_hooks:
            if pos < ran:
                try:
                    fn(ex)
                except Exception:
                    if _failed(plugin, ex, "on_response") is not None:
                        raise PluginFailure(plugin.name) from None

    def run_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes:
        ran = ex.plugins_ran
        for pos, plugin, fn in self.body_hooks:
            if pos < ran:
                try:
                    chunk = fn(ex, chunk, end)
                except Exception:
                    if _failed(plugin, ex, "on_response_body") is not None:
                        raise PluginFailure(plugin.name) from None
        return chunk

    def run_log(self, ex: Exchange) -> None:
        ran = ex.plugins_ran
        for pos, plugin, fn in self.log_hooks:
            if pos < ran:
                try:
                    fn(ex)
                except Exception:
                    _failed(plugin, ex, "on_log")

    def __repr__(self) -> str:
        return f"<Chain {[p.name for p in self.plugins]}>"


EMPTY_CHAIN = Chain(())


def _failed(
    plugin: Plugin, ex: Exchange, hook: str, exc: BaseException | None = None
) -> Reply | None:
    """A hook raised (in an ``except`` block), or failed with ``exc`` (a deferred answer)."""
    plugin.errors += 1
    log.error(
        "plugin %s failed in %s",
        plugin.name,
        hook,
        exc_info=exc or True,
        extra={"request_id": ex.request_id, "plugin": plugin.name, "hook": hook},
    )
    if plugin.fail_open:
        return None
    return Reply.error("plugin_error")
