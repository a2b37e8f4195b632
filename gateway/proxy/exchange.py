"""One request/response exchange. Per-request state lives in slots here, nowhere else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.http.headers import HeaderLines, Headers
from gateway.plugin import DEFERRED, Deferred
from gateway.speedups import compiled

if TYPE_CHECKING:
    from gateway.plugin import Plugin, Reply
    from gateway.proxy.protocol import ClientConnection
    from gateway.proxy.router import Route
    from gateway.upstream.connection import UpstreamConnection
    from gateway.upstream.target import Target

_monotonic = time.monotonic

# How the request body is framed.
BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2


class Exchange:
    """A request from a client and the response to it.

    Plugins read: ``method``, ``path``, ``query``, ``headers`` (request, editable before the
    upstream is contacted), ``host``, ``client_ip``, ``route``, ``request_id``; after the
    response head: ``status`` and ``response_headers``. ``vars`` is a dict for plugins' own
    per-request state, created on first use via ``ex.var()``/``ex.set_var()``; ``user`` is the
    identity an auth plugin established; ``note()`` records a plugin decision for the access
    log. A request hook that already knows headers the response must carry (the rate
    limiter's ``RateLimit``) adds them with ``add_response_headers()``.
    """

    __slots__ = (
        "body_buf",
        "body_buffered",
        "body_kind",
        "body_received",
        "bytes_out",
        "client_ip",
        "conn",
        "content_length",
        "continue_sent",
        "discard_body",
        "done",
        "expect_continue",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "length_header",
        "max_body",
        "method",
        "notes",
        "path",
        "pending_error",
        "plugins_ran",
        "plugins_since",
        "query",
        "replay",
        "reply_code",
        "request_complete",
        "request_id",
        "response_chunked",
        "response_extra",
        "response_headers",
        "response_started",
        "retries",
        "route",
        "status",
        "t_start",
        "t_upstream",
        "t_upstream_head",
        "task",
        "trace_id",
        "traceparent",
        "tried",
        "upstream",
        "upstream_since",
        "upstream_target",
        "url",
        "user",
        "vars",
        "waiter",
    )

    # The slots' types. Their starting values are set by fill_defaults_py (below the
    # class), but for those __init__ makes per exchange.
    conn: ClientConnection
    url: bytes
    method: bytes
    path: bytes
    query: bytes
    http10: bool
    headers: Headers
    host: bytes
    keep_alive: bool
    request_id: str
    route: Route | None
    client_ip: str
    body_kind: int
    content_length: int
    length_header: bytes | None  # the validated Content-Length, as sent on
    body_received: int
    body_buf: list[bytes] | None
    body_buffered: int
    max_body: int
    request_complete: bool
    expect_continue: bool
    continue_sent: bool
    discard_body: bool
    upstream: UpstreamConnection | None
    upstream_target: Target | None
    status: int
    response_headers: Headers
    response_extra: HeaderLines | None
    response_started: bool
    response_chunked: bool
    bytes_out: int
    reply_code: str
    pending_error: str
    retries: int
    # Retries (gateway.upstream.retry): the body kept for replay; when the sweep first saw
    # the exchange in its upstream phase (for the total timeout); the targets of failed
    # attempts, set on the first retry only (read it with getattr).
    replay: list[bytes] | None
    upstream_since: float
    tried: tuple[Target, ...]
    plugins_ran: int
    plugins_since: float  # when the async request plugins started
    #: what the exchange waits on (a task, a request hook's future, or ``DEFERRED``: a
    #: hook's ``resume``); cancelled if it ends
    task: asyncio.Future[Any] | Deferred | None
    #: in a chain run as a task, the future that a ``DEFERRED`` hook's ``resume`` resolves
    waiter: asyncio.Future[Any] | None
    done: bool
    user: str | None
    #: plugins' own per-request state; a verified client certificate's tls.client_* variables
    vars: dict[str, Any] | None
    notes: dict[str, Any] | None
    t_start: float  # the request's first byte (or the error replacing it)
    t_upstream: float  # upstream request started (0.0: never)
    t_upstream_head: float  # upstream response head received
    trace_id: str
    traceparent: bytes | None

    def __init__(self, conn: ClientConnection) -> None:
        _fill_defaults(self)  # fill_defaults_py, in one call where compiled
        self.conn = conn
        self.headers = Headers()
        self.response_headers = Headers()
        self.client_ip = conn.client_ip
        # A verified client certificate (gateway.tls) shows as tls.client_* variables.
        client_cert = conn.tls_client
        self.vars = None if client_cert is None else client_cert.vars.copy()
        self.t_start = _monotonic()

    def var(self, name: str, default: Any = None) -> Any:
        v = self.vars
        return default if v is None else v.get(name, default)

    def set_var(self, name: str, value: Any) -> None:
        if self.vars is None:
            self.vars = {}
        self.vars[name] = value

    def add_response_headers(self, lines: HeaderLines) -> None:
        """Headers for whatever response this exchange gets (the upstream's, or a ``Reply``
        from any plugin), for a request hook that knows them with the request: no state kept
        until the response, no response hook to run (the limiter's headers cost ~8k
        instructions less per request this way than from ``on_response``: callgrind). They
        follow the response's own headers; when the route has ``on_response`` hooks they
        are added to ``response_headers`` first, for the hooks to see and edit."""
        extra = self.response_extra
        self.response_extra = lines if extra is None else extra + lines

    def resume(self, plugin: Plugin, reply: Reply | None, exc: Exception | None = None) -> None:
        """The answer of ``plugin``'s request hook, which returned ``DEFERRED``: the request
        phase goes on from here (the next hook, the upstream, or this reply; ``exc``: the
        hook failed, see ``resume_failed``). Call it from a later callback. It does nothing
        when the exchange is no longer waiting on that plugin: ended meanwhile (client gone,
        ``plugin_timeout``), or already answered (a second call, which must not answer a
        later hook's wait). While a hook's answer is awaited, ``plugins_ran`` is its
        plugin's position."""
        route = self.route
        if self.done or route is None:
            return
        pos = self.plugins_ran
        plugins = route.chain.plugins
        if pos >= len(plugins) or plugins[pos] is not plugin:
            return
        if self.task is DEFERRED:
            self.task = None
            self.conn.plugins_resumed(self, reply, exc)
        elif self.waiter is not None:
            waiter, self.waiter = self.waiter, None
            if waiter.done():
                pass
            elif exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(reply)

    def resume_failed(self, plugin: Plugin, exc: Exception) -> None:
        """As ``resume``, for a hook that failed: handled as an exception raised by the hook
        (counted, logged, then its ``failure_mode``)."""
        self.resume(plugin, None, exc)

    def wait_deferred(self) -> asyncio.Future[Any]:
        """In a chain run as a task: the future a ``DEFERRED`` hook's ``resume`` resolves."""
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def note(self, key: str, value: Any) -> None:
        """Record a plugin decision for the access log (e.g. ``note("ratelimit", "limited")``)."""
        if self.notes is None:
            self.notes = {}
        self.notes[key] = value

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.request_id} {self.method.decode()} "
            f"{self.url.decode('latin-1')} status={self.status}>"
        )


def fill_defaults_py(ex: Exchange) -> None:
    """An exchange's starting values (the types and meanings are in the class), but for
    those ``__init__`` makes per exchange; ``tried`` stays unset. Immutable values only:
    ``SlotDefaults`` (``gateway/_speedups.c``), compiled, writes the same objects
    (``EXCHANGE_DEFAULTS``, read from this function) into every exchange in one call, ~1k
    instructions less per request than these assignments (callgrind)."""
    ex.url = b""
    ex.method = b""
    ex.path = b""
    ex.query = b""
    ex.http10 = False
    ex.host = b""
    ex.keep_alive = True
    ex.request_id = ""
    ex.route = None
    ex.body_kind = BODY_NONE
    ex.content_length = 0
    ex.length_header = None
    ex.body_received = 0
    ex.body_buf = None
    ex.body_buffered = 0
    ex.max_body = 0
    ex.request_complete = False
    ex.expect_continue = False
    ex.continue_sent = False
    ex.discard_body = False
    ex.upstream = None
    ex.upstream_target = None
    ex.status = 0
    ex.response_extra = None
    ex.response_started = False
    ex.response_chunked = False
    ex.bytes_out = 0
    ex.reply_code = ""
    ex.pending_error = ""
    ex.retries = 0
    ex.replay = None
    ex.upstream_since = 0.0
    ex.plugins_ran = 0
    ex.plugins_since = 0.0
    ex.task = None
    ex.waiter = None
    ex.done = False
    ex.user = None
    ex.notes = None
    ex.t_upstream = 0.0
    ex.t_upstream_head = 0.0
    ex.trace_id = ""
    ex.traceparent = None


def _defaults() -> dict[str, Any]:
    probe = Exchange.__new__(Exchange)
    fill_defaults_py(probe)
    return {name: getattr(probe, name) for name in Exchange.__slots__ if hasattr(probe, name)}


#: what ``fill_defaults_py`` sets
EXCHANGE_DEFAULTS = _defaults()

_fill_defaults: Callable[[Exchange], None] = (
    compiled.SlotDefaults(Exchange, EXCHANGE_DEFAULTS) if compiled is not None else fill_defaults_py
)
