"""The plugin contract. This file owns it.

Theory of operation
-------------------
A plugin class has a ``name``, a frozen ``Config`` model validated when the config is loaded,
and any of four hooks. One instance exists per (route, plugin entry) per worker; it holds the
immutable config and per-worker caches. Per-request state lives on the ``Exchange``.

Hooks (each optional; the compiler records which a plugin implements):

``on_request(ex) -> Reply | None``
    Sync or ``async``. Runs in chain order (global plugins first, then the route's). Returning a
    ``Reply`` short-circuits: later plugins' ``on_request`` and the upstream are skipped. A sync
    hook allocates no coroutine: when a chain's request hooks are all sync, the request is
    forwarded without creating a task. A sync hook that needs I/O only sometimes (the JWT
    plugin on an unknown key id) may return an awaitable of ``Reply | None`` instead: the
    rest of the request phase then runs in a task, under the same ``plugin_timeout``. An
    ``asyncio.Future`` costs less: the chain goes on in its done callback, without a task.
    ``DEFERRED`` costs least (the Redis rate limiter answers this way): the hook keeps the
    exchange and, from a later callback (never from within the hook), calls
    ``ex.resume(self, reply)``, or ``ex.resume_failed(self, exc)`` for a failure; the chain
    goes on right there, with no future, no task and no extra loop iteration. A call for an
    exchange that is no longer waiting on that plugin does nothing: one that ended meanwhile
    (client gone, ``plugin_timeout``), or a second answer (say, an I/O reply racing the
    plugin's own fallback timer: the first wins).
``on_response(ex)``
    Sync. Runs when the response head is known (from the upstream or a ``Reply``), before it is
    written: may edit ``ex.response_headers`` and ``ex.status``. Runs for every plugin whose
    ``on_request`` ran (or that has none and precedes the short-circuit), in reverse order,
    so the limiter can put headers on its own 429.
``on_response_body(ex, chunk, end) -> bytes``
    Sync. Sees every body chunk of the upstream response, in order, and returns the bytes to
    send (``b""`` to hold them back). ``end`` is true once, with the last chunk (possibly empty).
    A plugin whose class sets ``rewrites_body = True`` makes the route answer chunked, since
    the upstream's Content-Length no longer holds. With no body hook on a route, body bytes
    pass through untouched.
``on_log(ex)``
    Sync. Runs once per request after the response is finished or aborted. Plugins needing
    I/O here schedule it themselves (``asyncio.get_running_loop().create_task``).

``start()`` / ``stop()`` are awaited once per worker, for background tasks.

An exception in a hook is a bug: it is counted (``Plugin.errors``), logged with the request id,
and handled by the plugin's ``failure_mode``: ``closed`` (default) answers 500 ``plugin_error``,
``open`` carries on as if the hook had returned ``None`` / the chunk unchanged.

Third-party plugins register in the ``gateway.plugins`` entry-point group::

    [project.entry-points."gateway.plugins"]
    my_plugin = "my_package.module:MyPlugin"
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from gateway.http.errors import ERRORS

if TYPE_CHECKING:
    pass

ENTRY_POINT_GROUP = "gateway.plugins"


class PluginConfig(BaseModel):
    """Base of every plugin's config: frozen, unknown keys rejected, ``failure_mode`` shared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_mode: Literal["open", "closed"] = "closed"


class Reply:
    """A response the gateway makes itself (a short-circuit, an error).

    ``headers`` are ``(name, value)`` pairs of bytes; names are sent as given. For gateway
    errors use ``Reply.error``, whose JSON body gets the request id when it is sent.
    """

    __slots__ = ("body", "code", "headers", "message", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        content_type: bytes | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = list(headers)
        if content_type is not None:
            self.headers.append((b"content-type", content_type))
        self.code: str | None = None
        self.message = ""

    @classmethod
    def error(
        cls,
        code: str,
        message: str | None = None,
        headers: Iterable[tuple[bytes, bytes]] = (),
        status: int | None = None,
    ) -> Reply:
        default_status, default_message = ERRORS[code]
        reply = cls(status or default_status, b"", headers)
        reply.code = code
        reply.message = message or default_message
        return reply

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.code or ''}>"


class Deferred:
    """The type of ``DEFERRED``: what a sync ``on_request`` returns when its answer comes
    later, through ``ex.resume(plugin, reply)`` / ``ex.resume_failed(plugin, exc)`` (see the
    module's docstring). While the exchange waits it is ``ex.task``, so it answers ``done()``
    and ``cancel()`` as a future would; cancelling does nothing: a later ``resume`` finds the
    exchange done, or no longer waiting on that plugin, and does nothing either."""

    __slots__ = ()

    def done(self) -> bool:
        return False

    def cancel(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "DEFERRED"


DEFERRED = Deferred()


class Plugin:
    """Base class of plugins. Subclasses set ``name`` and ``Config`` and define hooks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: Set by a plugin whose ``on_response_body`` changes the body's length.
    rewrites_body: ClassVar[bool] = False

    def __init__(self, config: PluginConfig) -> None:
        self.config = config
        self.fail_open = config.failure_mode == "open"
        self.errors = 0
        #: The route this instance belongs to (set by the compiler); None for global plugins.
        self.route_name: str | None = None

    async def start(self) -> None:
        """Start per-worker background work. Called once per worker before serving."""

    async def stop(self) -> None:
        """Stop what ``start`` started. Called once per worker on shutdown."""

    def status(self) -> dict[str, Any]:
        """State for the admin ``/status`` (JSON-able). ``"ready": False`` makes ``/readyz``
        answer 503. Plugins with nothing to report keep this default."""
        return {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


HOOKS = ("on_request", "on_response", "on_response_body", "on_log")


def implemented_hooks(cls: type[Plugin]) -> dict[str, bool]:
    """``{hook name: is_async}`` for the hooks ``cls`` defines."""
    found: dict[str, bool] = {}
    for hook in HOOKS:
        fn = getattr(cls, hook, None)
        if fn is not None and callable(fn):
            found[hook] = inspect.iscoroutinefunction(fn)
    for hook in ("on_response", "on_response_body", "on_log"):
        if found.get(hook):
            raise TypeError(f"plugin {cls.name!r}: {hook} must be a plain (sync) method")
    return found


class Registry:
    """Plugin classes by name: the built-ins plus the ``gateway.plugins`` entry points."""

    def __init__(self, classes: Iterable[type[Plugin]] = ()) -> None:
        self._classes: dict[str, type[Plugin]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[Plugin]) -> None:
        if not cls.name:
            raise TypeError(f"{cls.__qualname__} has no name")
        implemented_hooks(cls)
        self._classes[cls.name] = cls

    def get(self, name: str) -> type[Plugin] | None:
        return self._classes.get(name)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def load_entry_points(self) -> list[str]:
        """Register every entry point of the group; return the errors of those that failed."""
        problems: list[str] = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._classes:
                continue
            try:
                cls: Any = ep.load()
                if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                    raise TypeError("not a gateway.plugin.Plugin subclass")
                if cls.name != ep.name:
                    raise TypeError(f"class name {cls.name!r} differs from entry point name")
                self.register(cls)
            except Exception as exc:
                problems.append(f"plugin entry point {ep.name!r} ({ep.value}): {exc}")
        return problems


def default_registry() -> Registry:
    from plugins.cors import CorsPlugin
    from plugins.headers import HeadersPlugin
    from plugins.jwt import JwtPlugin
    from plugins.rate_limit import RateLimitPlugin

    registry = Registry([HeadersPlugin, CorsPlugin, JwtPlugin, RateLimitPlugin])
    registry.load_entry_points()
    return registry


__all__ = ["ENTRY_POINT_GROUP", "Plugin", "PluginConfig", "Registry", "Reply"]
