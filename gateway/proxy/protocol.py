"""The client side of the data plane: one asyncio Protocol per client connection.

Theory of operation
-------------------
httptools calls plain methods on this object as bytes arrive (``on_url``,
``on_headers_complete``, ...; ``on_header`` is ``RequestFields.on_header``, gateway.http.fields).
Each request becomes an ``Exchange``. One exchange is *active* at a time; requests a client
pipelines behind it are parsed, validated and queued (their bodies buffered up to a
watermark, past which reading pauses) and answered strictly in order.

An active exchange runs the route's request plugins (inline when all are sync, in a task
otherwise), picks a target, takes an idle pooled connection or opens one (a task), writes the
request head, then streams the body as it arrives. The upstream protocol calls back with the
response head, body chunks, completion or failure; the response streams to the client.

Backpressure both ways: when the upstream's write buffer is full, client reading pauses;
when the client's write buffer is full, upstream reading pauses. Reading is paused while any
of several reasons holds (a bit mask), and resumes when none does.

This file owns the connection's keep-alive state machine: an exchange ends when its response
is complete *and* its request was fully read (an unread body is discarded, or the connection
is closed); only then does the next queued exchange start. Framing that could be read two
ways (request smuggling) is refused with 400 and the connection closed; nothing of such a
request reaches an upstream.

Timeouts (header read, body read, idle keep-alive, request plugins, upstream read, client
send, lingering close) are checked by the server's sweep twice a second against a coarse
clock, not by a timer per connection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import httptools

from gateway.http.errors import error_body
from gateway.http.fields import ODD_FIELDS, RequestFields
from gateway.http.headers import (
    HOP_BY_HOP,
    FieldLines,
    Headers,
    connection_tokens,
    is_chunked_only,
    valid_request_id,
)
from gateway.http.status import has_no_body
from gateway.http.target import needs_normalising, normalise_path, split_target
from gateway.plugin import DEFERRED, Reply
from gateway.proxy.chain import Pending, PluginFailure
from gateway.proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Exchange
from gateway.proxy.forward import CONTINUE, connect, request_head, response_head
from gateway.tls import describe_ssl_error, is_handshake_failure, upstream_tls_failed
from gateway.upstream.connection import FRAMING_LENGTH, FRAMING_NONE, UpstreamConnection
from gateway.upstream.retry import failover

if TYPE_CHECKING:
    from gateway.config.compile import Listener, Runtime
    from gateway.server import ServerState
    from gateway.tls import ClientCert, Gate
    from gateway.upstream.target import Target

log = logging.getLogger("gateway.proxy")

# Reasons for which reading from the client is paused (a bit mask).
PAUSE_BUFFER = 1  # request body buffered while no upstream connection is ready
PAUSE_UPSTREAM = 2  # the upstream's write buffer is full
PAUSE_PIPELINE = 4  # too many pipelined requests queued
PAUSE_STOPPED = 8  # parsing has stopped for good (error, upgrade, lingering close)

#: Request body bytes held per connection before reading pauses.
BODY_BUFFER_HIGH = 64 * 1024
#: Pipelined requests queued before reading pauses.
MAX_PIPELINE = 32
#: An unread request body up to this size is read and discarded after an early response,
#: keeping the connection alive; a larger one closes it.
DISCARD_LIMIT = 64 * 1024
#: How long a closing connection keeps reading (and discarding) so the client sees the reply.
LINGER_SECONDS = 2.0

#: Connection options that name no header the forwarding does not drop anyway.
_PLAIN_OPTIONS = HOP_BY_HOP | {b"close"}
_monotonic = time.monotonic


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer with an error code."""

    def __init__(self, code: str, message: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.message = message


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "__weakref__",  # ServerState.handshaking
        "_body_since",
        "_feeding",
        "_headers_since",
        "_paused",
        "active",
        "client_ip",
        "closed",
        "fields",
        "gate",
        "held",
        "hsts",
        "idle_since",
        "limits",
        "linger_until",
        "listener",
        "on_header",
        "parser",
        "parsing",
        "peer_ip",
        "peer_ip_bytes",
        "pipeline",
        "requests",
        "runtime",
        "scheme",
        "server",
        "tls_client",
        "transport",
        "trusted_peer",
        "write_paused",
        "write_paused_since",
    )

    def __init__(self, server: ServerState, listener: Listener | None = None) -> None:
        self.server = server
        self.runtime: Runtime = server.runtime
        self.limits = limits = self.runtime.limits
        # httptools' on_header callback is the fields' own (compiled where built): a field
        # costs no Python-level step (gateway.http.fields).
        self.fields = fields = RequestFields(
            limits.max_header_bytes,
            limits.max_header_count,
            self.runtime.forwarding.request_id_header,
            _Reject,
        )
        self.on_header: Callable[[bytes, bytes], None] = fields.on_header
        # The listener's TLS behaviour (gateway.tls): scheme for X-Forwarded-Proto, the HSTS
        # header line, the verified client certificate, and the gate: when set, every request
        # is answered by it (an https redirect, a 403 for a missing client certificate).
        self.listener = listener
        tls = listener is not None and listener.ssl is not None
        self.scheme = b"https" if tls else b"http"
        if tls:  # made on accept: its connection_made comes once the handshake is done
            server.handshaking.add(self)
        self.hsts = listener.hsts if listener is not None else b""
        self.gate: Gate | None = listener.redirect if listener is not None else None
        self.tls_client: ClientCert | None = None
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.client_ip = ""
        self.trusted_peer = False
        self.active: Exchange | None = None
        self.parsing: Exchange | None = None
        self.pipeline: deque[Exchange] = deque()
        self._paused = 0
        self._feeding = False
        self.write_paused = False
        self.write_paused_since = 0.0
        self.closed = False
        # A response head is held back until the first body bytes (or the end of the
        # upstream read) so head and body leave in one write: one syscall, not two.
        self.held: bytes | None = None
        self.linger_until = 0.0
        self.idle_since = server.now
        self.requests = 0
        self._headers_since = 0.0
        self._body_since = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        # Made here, not in __init__: the parser and the protocol refer to each other, and
        # on a TLS listener the protocol exists from the accept on. A failed handshake (no
        # connection_made) must leave a protocol that reference counting frees at once, so
        # that it leaves ServerState.handshaking, which a draining worker waits on.
        self.parser = httptools.HttpRequestParser(self)
        server = self.server
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if isinstance(peer, tuple) else ""
        self.peer_ip_bytes = self.peer_ip.encode("latin-1")
        self.client_ip = self.peer_ip
        self.trusted_peer = self.runtime.forwarding.is_trusted(self.peer_ip)
        listener = self.listener
        if listener is not None and listener.tls is not None:
            server.handshaking.discard(self)
            listener.tls.accept(self, transport)
        # Idle from now, not from the protocol's creation: on a TLS listener that was before
        # the handshake, and the server's clock can lag by a sweep. A draining worker closes
        # connections idle for DRAIN_IDLE_GRACE: counted from a stale start, it could close
        # a new connection just as its client sends the first request.
        self.idle_since = _monotonic()
        server.connections.add(self)
        if len(server.connections) > self.limits.max_connections:
            ex = Exchange(self)
            ex.keep_alive = False
            self.active = ex
            self._stop_reading()
            self.send_reply(ex, Reply.error("too_many_connections"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        active = self.active
        for ex in (active, *self.pipeline, self.parsing):
            if ex is None or ex.done:
                continue
            ex.done = True
            up = ex.upstream
            if up is not None:
                ex.upstream = None
                up.abort()
            task = ex.task
            if task is not None and not task.done():
                task.cancel()
            if ex is active:
                ex.reply_code = ex.reply_code or "client_closed"
                self._log(ex)
        self.pipeline.clear()
        self.active = self.parsing = None

    def data_received(self, data: bytes) -> None:
        if self._paused & PAUSE_STOPPED:
            return  # lingering close or a dead parser: discard
        self._feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Reject):
                self._reject(cause.code, cause.message)
            else:
                log.error("internal error while parsing a request", exc_info=cause)
                self._reject("bad_request")
        except httptools.HttpParserUpgrade:
            # Raised after on_message_complete of the request that asked for it, which
            # on_headers_complete made the connection's last: it is answered as plain HTTP
            # (Upgrade stripped), and the bytes after it belong to a protocol we do not speak.
            # The requests queued before it keep their keep-alive and are answered first.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._reject("bad_request", f"malformed HTTP request: {_parser_reason(exc)}")
        self._feeding = False
        ex = self.active
        if ex is not None:
            up = ex.upstream
            if up is not None and up.held is not None:
                up.flush_held()

    def eof_received(self) -> bool | None:
        # A client that has gone looks exactly like one that half-closed; as nginx and Envoy
        # do, an EOF ends the connection, so the exchange in progress is cancelled and its
        # upstream connection freed (connection_lost follows) instead of running on unseen.
        return None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = self.server.now
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            ex.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        if ex is not None and ex.upstream is not None and ex.upstream.transport is not None:
            # The pause was the client's doing, not upstream silence: restart the read timer.
            ex.upstream.last_read = self.server.now
            ex.upstream.transport.resume_reading()

    # -- reading pauses ---------------------------------------------------------------------
    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _unpause(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()
                # Time spent paused was the gateway's: the body timer counts from here.
                self._body_since = self.server.now

    def _stop_reading(self) -> None:
        self._pause(PAUSE_STOPPED)

    def pause_reading_for_upstream(self, paused: bool) -> None:
        if paused:
            self._pause(PAUSE_UPSTREAM)
        else:
            self._unpause(PAUSE_UPSTREAM)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.linger_until:
            # The connection's last response went out earlier in this same feed (_close):
            # what follows is not read as a request, whose reply could not be sent.
            raise _Reject("bad_request")
        self.parsing = ex = Exchange(self)
        self._headers_since = self.server.now
        self.fields.reset(ex.headers.items)

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url = ex.url + url if ex.url else url
        if len(ex.url) > self.limits.max_url_bytes:
            raise _Reject("uri_too_long")
        self.fields.size += len(url)

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        self._headers_since = 0.0
        self._body_since = self.server.now
        fields = self.fields
        fields.items = None  # what comes now is trailers: counted, not kept
        parser = self.parser
        ex.method = parser.get_method()
        version = parser.get_http_version()
        ex.http10 = version == "1.0"
        if not ex.http10 and version != "1.1":
            # httptools reads "GET /x\n..." as HTTP/0.9 and accepts "HTTP/2.0"; forwarded as
            # 1.1 either would be framed differently by the next hop.
            raise _Reject("bad_request", f"HTTP/{version} is not supported")
        ex.keep_alive = parser.should_keep_alive()
        self.requests += 1
        rid = fields.rid
        ex.request_id = (
            rid.decode("ascii")
            if rid is not None and valid_request_id(rid)
            else self.server.next_request_id()
        )
        # Framing: refuse anything a second parser could read differently.
        if fields.te_count:
            if fields.length_count:
                raise _Reject("bad_request", "both Content-Length and Transfer-Encoding")
            if fields.te_count > 1 or not is_chunked_only(fields.te):
                raise _Reject("bad_request", "only a single 'chunked' transfer coding is accepted")
            if ex.http10:
                raise _Reject("bad_request", "Transfer-Encoding on an HTTP/1.0 request")
            ex.body_kind = BODY_CHUNKED
        elif fields.length_count:
            value = fields.length.strip()
            if fields.length_count > 1 or not value.isdigit():
                raise _Reject("bad_request", "duplicate or invalid Content-Length")
            ex.content_length = int(value)
            ex.length_header = value
            if ex.content_length:
                ex.body_kind = BODY_LENGTH
        host_count = fields.host_count
        if host_count > 1 or (host_count == 0 and not ex.http10):
            raise _Reject("bad_request", "exactly one Host header is required")
        url = ex.url
        authority = None
        # Byte tests as ``35 not in url`` (an int needle) or ``.find``: on CPython 3.11 a bytes
        # needle for ``in`` is first tried as an int, and the failure is a raised-and-cleared
        # TypeError, ~2k instructions each time (callgrind).
        if url[:1] == b"/" and 35 not in url:  # b"#"; origin-form, the common case, inlined
            q = url.find(b"?")
            if q < 0:
                path = url
            else:
                path, ex.query = url[:q], url[q + 1 :]
        else:
            target = split_target(url)
            if target is None:
                if ex.method == b"CONNECT":
                    raise _Reject("not_implemented", "CONNECT is not supported")
                raise _Reject("bad_request", "invalid request target")
            path, ex.query, authority = target
        if path.find(b"/.") >= 0 or (37 in path and needs_normalising(path)):  # 37: b"%"
            normal = normalise_path(path)
            if normal is None:
                raise _Reject("bad_request", "the path climbs above the root")
            path = normal
        ex.path = path
        host = fields.host
        if authority is not None:
            if host_count and authority.lower() != host.lower():
                # RFC 9112 3.2.2 says to ignore Host here; a hop behind us may not: refuse.
                raise _Reject("bad_request", "the Host header does not match the request target")
            host = authority
        ex.host = host
        expect = fields.expect
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                raise _Reject("expectation_failed")
            # No body, nothing to wait for: a 100 would only precede the final response.
            ex.expect_continue = not ex.http10 and ex.body_kind != BODY_NONE
        listed = fields.connection
        tokens = (
            None if listed is None else frozenset(t for v in listed for t in connection_tokens(v))
        )
        if tokens is not None and b"upgrade" in tokens and parser.should_upgrade():
            # httptools parses nothing after this request (data_received): its response must
            # close the connection, or the client's next request would wait for idle_timeout.
            ex.keep_alive = False
        if tokens is not None and not tokens <= _PLAIN_OPTIONS:
            # RFC 9110 7.6.1: the fields Connection names belong to this hop. They go now,
            # before routing and plugins: removed when forwarding, they would take with them a
            # header a plugin set (an identity), so a client could strip it by naming it.
            # Those the gateway writes itself (Host, X-Forwarded-*, ...) are its own business.
            own = self.runtime.forwarding.request_own
            ex.headers.items = [h for h in ex.headers.items if h[0] not in tokens or h[0] in own]
        route = self.runtime.router.match(host, path, ex.method, ex.headers.items)
        ex.route = route
        max_body = self.limits.max_body_size
        if route is not None and route.max_body_size:
            max_body = route.max_body_size
        ex.max_body = max_body
        if max_body and ex.content_length > max_body:
            raise _Reject("payload_too_large")
        xff = fields.xff
        if xff is not None and self.trusted_peer:
            ex.client_ip = self.runtime.forwarding.client_ip(self.peer_ip, xff)
        if self.active is None:
            self.active = ex
            self._start(ex)
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) >= MAX_PIPELINE:
                self._pause(PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.body_received += len(body)
        if ex.max_body and ex.body_received > ex.max_body:
            raise _Reject("payload_too_large")
        self._body_since = self.server.now
        if ex.discard_body or ex.done:
            return
        replay = ex.replay
        if replay is not None:  # kept for a retry (gateway.upstream.retry)
            replay.append(body)
            retry = ex.route.upstream.retry if ex.route is not None else None
            if retry is None or ex.body_received > retry.max_body:
                ex.replay = None
        up = ex.upstream
        if up is not None:
            # The exchange is progressing: the upstream's read timer counts its silence from
            # here (a body sent slower than the timeout overall is not a silent upstream).
            up.last_read = self._body_since
            up.send_body(body, ex.body_kind == BODY_CHUNKED)
            return
        if ex.body_buf is None:
            ex.body_buf = [body]
        else:
            ex.body_buf.append(body)
        ex.body_buffered += len(body)
        if ex.body_buffered > BODY_BUFFER_HIGH:
            self._pause(PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is None:
            return
        self.parsing = None
        ex.request_complete = True
        up = ex.upstream
        if up is not None and ex.body_kind == BODY_CHUNKED and not ex.done:
            up.write(b"0\r\n\r\n")
        if ex.done and ex is self.active:
            self._next()

    # -- the exchange's life ----------------------------------------------------------------
    def _start(self, ex: Exchange) -> None:
        if ex.pending_error:
            self.send_reply(ex, Reply.error(ex.pending_error))
            return
        gate = self.gate
        if gate is not None:
            self.send_reply(ex, gate(ex))
            return
        route = ex.route
        if route is None:
            self.send_reply(ex, Reply.error("no_route"))
            return
        chain = route.chain
        if chain.request_hooks:
            fn = chain.only_hook
            if fn is not None:  # run_request(), inlined for a lone sync hook
                try:
                    reply = fn(ex)
                except Exception:
                    reply = chain.only_failed(ex)
                if reply is None:
                    ex.plugins_ran = chain.size
                elif reply is DEFERRED:
                    ex.plugins_ran = chain.last_request_pos
                else:
                    pos = chain.last_request_pos
                    reply = chain.hook_answered(ex, pos, chain.plugins[pos], reply)
            elif chain.has_async_request:
                # plugin_timeout counts from here: time queued behind pipelined requests is
                # not the plugins'.
                ex.plugins_since = self.server.now
                ex.task = asyncio.get_running_loop().create_task(self._run_plugins(ex))
                return
            else:
                reply = chain.run_request(ex)
            if reply is not None:
                if reply is DEFERRED:  # _wait_plugins(), inlined for the Redis limiter
                    ex.plugins_since = self.server.now
                    ex.task = DEFERRED
                elif isinstance(reply, Reply):
                    self.send_reply(ex, reply)
                else:  # a sync hook needs I/O this time
                    ex.plugins_since = self.server.now
                    self._wait_plugins(ex, reply)
                return
        else:
            ex.plugins_ran = len(chain.plugins)
        self._forward(ex)

    def _wait_plugins(self, ex: Exchange, pending: Pending) -> None:
        """Go on when a request hook's I/O is done: ``DEFERRED`` when the hook calls
        ``ex.resume``, a future in its done callback, any other awaitable in a task. Each is
        ``ex.task``, cancelled if the exchange ends first."""
        if pending is DEFERRED:
            ex.task = DEFERRED
        elif isinstance(pending, asyncio.Future):
            ex.task = pending
            pending.add_done_callback(functools.partial(self._future_resumed, ex))
        else:
            awaitable = cast(Awaitable[Reply | None], pending)
            ex.task = asyncio.get_running_loop().create_task(self._run_plugins(ex, awaitable))

    def _future_resumed(self, ex: Exchange, fut: asyncio.Future[Reply | None]) -> None:
        if fut.cancelled() or ex.task is not fut:
            return
        ex.task = None
        exc = fut.exception()
        if exc is not None and not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt and the like are not a plugin's failure
        if not ex.done:
            self.plugins_resumed(ex, None if exc is not None else fut.result(), exc)

    def plugins_resumed(self, ex: Exchange, reply: Reply | None, exc: Exception | None) -> None:
        """The request hook the chain stopped at has answered (``Exchange.resume``, or its
        future; the caller checked ``ex.done``, which a closed connection sets on all its
        exchanges): the hooks after it, then the upstream or a reply."""
        assert ex.route is not None
        chain = ex.route.chain
        try:
            if reply is None and exc is None and ex.plugins_ran == chain.last_request_pos:
                ex.plugins_ran = chain.size  # request_done()'s answer, without a call
                self._forward(ex)
                return
            nxt = chain.request_done(ex, reply, exc)
            if nxt is None:
                self._forward(ex)
            elif isinstance(nxt, Reply):
                self.send_reply(ex, nxt)
            else:
                self._wait_plugins(ex, nxt)
        except Exception:
            self._task_failed(ex)

    async def _run_plugins(
        self, ex: Exchange, pending: Awaitable[Reply | None] | None = None
    ) -> None:
        assert ex.route is not None
        if pending is None:
            pending = ex.route.chain.run_request_async(ex)
        reply = await pending
        ex.task = None
        if ex.done or self.closed:
            return
        try:
            if reply is not None:
                self.send_reply(ex, reply)
            else:
                self._forward(ex)
        except Exception:
            self._task_failed(ex)

    def _task_failed(self, ex: Exchange) -> None:
        """A bug (say, a plugin's Reply or header that cannot be serialised) raised in a task,
        where nobody would see it and the client would wait for ever: drop the connection,
        as the same failure in a parser callback does."""
        log.exception("internal error", extra={"request_id": ex.request_id})
        self._abort(ex)

    def _forward(self, ex: Exchange) -> None:
        route = ex.route
        assert route is not None
        upstream = route.upstream
        target = upstream.single  # one target and no limit: nothing to decide (no call)
        if target is None:
            target = upstream.pick(ex)
            if target is None:  # all down with all_down: fail_fast, or every circuit open
                self.send_reply(ex, Reply.error(upstream.refusal))
                return
        ex.upstream_target = target
        ex.t_upstream = _monotonic()
        if ex.body_kind:  # not BODY_NONE
            retry = upstream.retry
            if retry is not None and retry.wants_replay(ex):
                ex.replay = list(ex.body_buf) if ex.body_buf is not None else []
        conn = target.pool.acquire()
        if conn is None:
            ex.task = asyncio.get_running_loop().create_task(self._connect(ex, target))
        else:
            self._attach(ex, conn)

    def _retry(self, ex: Exchange, code: str, status: int, conn: UpstreamConnection | None) -> bool:
        """Start the next attempt of ``ex`` when ``gateway.upstream.retry`` allows one."""
        assert ex.route is not None
        nxt = failover(ex, ex.route.upstream, code, status, conn, self.server.now)
        if nxt is None:
            return False
        target, delay = nxt
        if conn is not None:
            ex.upstream = None
            conn.abort()
            if ex.replay is not None:  # the body went out on that connection: send it again
                ex.body_buf = list(ex.replay)
                ex.body_buffered = ex.body_received
        ex.retries += 1
        ex.upstream_target = target
        ex.task = asyncio.get_running_loop().create_task(self._connect(ex, target, delay))
        return True

    async def _connect(self, ex: Exchange, target: Target, delay: float = 0.0) -> None:
        assert ex.route is not None
        code = ""
        if delay:
            await asyncio.sleep(delay)
        try:
            conn = await connect(target, ex.route.timeouts.connect)
        except TimeoutError:
            code = "upstream_connect_timeout"
        except OSError as exc:
            if target.ssl is not None and is_handshake_failure(exc):
                code = "upstream_tls_failed"
                upstream_tls_failed(target.label)
                log.warning(
                    "TLS handshake with %s (%s) failed: %s",
                    target.label,
                    target.server_hostname,
                    describe_ssl_error(exc),
                    extra={"request_id": ex.request_id},
                )
            else:
                code = "upstream_connect_failed"
                log.warning(
                    "connect to %s failed: %s",
                    target.label,
                    exc,
                    extra={"request_id": ex.request_id},
                )
        ex.task = None
        if code:
            if not ex.done and not self.closed:
                self.upstream_failed(ex, code, None)
            return
        if ex.done or self.closed:
            conn.close()
            return
        try:
            self._attach(ex, conn)
        except Exception:
            self._task_failed(ex)

    def _attach(self, ex: Exchange, conn: UpstreamConnection) -> None:
        assert ex.route is not None and ex.upstream_target is not None
        ex.upstream = conn
        head = request_head(
            ex,
            ex.upstream_target,
            ex.route.upstream_path(ex.path),
            self.trusted_peer,
            self.runtime.forwarding,
        )
        buf = ex.body_buf
        if buf is not None:
            # Head and the body buffered so far leave together.
            ex.body_buf = None
            ex.body_buffered = 0
            if ex.body_kind == BODY_CHUNKED:
                pieces = [p for b in buf for p in (b"%x\r\n" % len(b), b, b"\r\n")]
                if ex.request_complete:
                    pieces.append(b"0\r\n\r\n")
                conn.start(ex, b"".join([head, *pieces]))
            else:
                conn.start(ex, b"".join([head, *buf]))
            self._check_buffer_pause()
        elif ex.request_complete or ex.body_kind == BODY_NONE:
            conn.start(ex, head + b"0\r\n\r\n" if ex.body_kind == BODY_CHUNKED else head)
        else:
            # The body is still to come: when it follows in the bytes being parsed right now,
            # head and body leave in one write (data_received flushes a head left waiting).
            conn.start(ex, head, hold=self._feeding)
        if self.write_paused and conn.transport is not None:
            # The client has not taken what is already sent: read no response for it yet.
            conn.transport.pause_reading()
        if (
            not ex.request_complete
            and ex.expect_continue
            and not ex.continue_sent
            and ex.body_received == 0
        ):
            ex.continue_sent = True
            self._write(CONTINUE)

    def _check_buffer_pause(self) -> None:
        parsing = self.parsing
        if parsing is None or parsing.body_buffered <= BODY_BUFFER_HIGH:
            self._unpause(PAUSE_BUFFER)

    # -- called by the upstream connection --------------------------------------------------
    def upstream_head(self, ex: Exchange, status: int, conn: UpstreamConnection) -> None:
        if ex.done:
            return
        assert ex.route is not None
        if status >= 500:
            retry = ex.route.upstream.retry
            if retry is not None and status in retry.statuses and self._retry(ex, "", status, conn):
                return
        ex.status = status
        ex.response_headers = FieldLines(conn.fields)
        chain = ex.route.chain
        extra = ex.response_extra
        if extra is not None and chain.response_hooks:  # for the hooks to see
            ex.response_headers.items += extra.items
            extra = None
        framing = conn.framing
        length: bytes | None = None
        chunked = False
        if framing == FRAMING_NONE:
            if status != 204:
                length = conn.length_value
        elif framing == FRAMING_LENGTH and not chain.rewrites_body:
            length = conn.length_value
        elif ex.http10:
            ex.keep_alive = False  # the body ends when the connection does
        else:
            chunked = True
        ex.response_chunked = chunked
        if chain.response_hooks:
            try:
                chain.run_response(ex)
            except PluginFailure:
                self.send_reply(ex, Reply.error("plugin_error"))
                return
        if self.server.draining:
            ex.keep_alive = False
        ex.response_started = True
        fwd = self.runtime.forwarding
        self.held = response_head(
            ex,
            length,
            chunked,
            fwd,
            self.server.date_header,
            conn.connection_value,
            b"" if extra is None else extra.raw,
            None
            if chain.response_hooks or conn.field_flags & ODD_FIELDS or not fwd.plain_responses
            else conn,
        )

    def flush_held(self) -> None:
        held = self.held
        if held is not None:
            self.held = None
            self._write(held)

    def upstream_body(self, ex: Exchange, data: bytes) -> None:
        if ex.done:
            return
        assert ex.route is not None
        chain = ex.route.chain
        if chain.body_hooks:
            try:
                data = chain.run_body(ex, data, False)
            except PluginFailure:
                self._abort(ex)
                return
            if not data:
                return
        ex.bytes_out += len(data)
        transport = self.transport
        assert transport is not None
        held = self.held
        if held is not None:
            self.held = None
            if ex.response_chunked:
                transport.write(b"".join((held, b"%x\r\n" % len(data), data, b"\r\n")))
            else:
                transport.write(held + data)
        elif ex.response_chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)

    def upstream_done(self, ex: Exchange, conn: UpstreamConnection, reusable: bool) -> None:
        if ex.done:
            conn.close()
            return
        ex.upstream = None
        if reusable and ex.request_complete and not self.server.draining:
            if self.write_paused and conn.transport is not None:
                conn.transport.resume_reading()  # paused for this client, not for the next
            conn.target.pool.release(conn, self.server.now)
        else:
            conn.close()
        assert ex.route is not None
        chain = ex.route.chain
        out = b"" if self.held is None else self.held
        self.held = None
        if chain.body_hooks:
            try:
                tail = chain.run_body(ex, b"", True)
            except PluginFailure:
                self._abort(ex)
                return
            # A bodiless response (HEAD, 204, 304) stays bodiless: bytes written after its
            # head would be read as the start of the next response.
            if tail and conn.framing != FRAMING_NONE:
                ex.bytes_out += len(tail)
                out += b"%x\r\n%b\r\n" % (len(tail), tail) if ex.response_chunked else tail
        if ex.response_chunked:
            out += b"0\r\n\r\n"
        if out:
            self._write(out)
        self._finished(ex)

    def upstream_failed(self, ex: Exchange, code: str, conn: UpstreamConnection | None) -> None:
        if ex.done:
            return
        ex.upstream = None
        if conn is not None:
            conn.abort()
        # Another attempt (another target, or a fresh connection for a stale pooled one),
        # when the failure, the method and the body allow it (gateway.upstream.retry).
        if self._retry(ex, code, 0, conn):
            return
        if ex.response_started:
            log.warning(
                "upstream failed mid-response (%s); closing the client connection",
                code,
                extra={"request_id": ex.request_id},
            )
            self._abort(ex)
        else:
            self.send_reply(ex, Reply.error(code))

    # -- replies and the end of an exchange -------------------------------------------------
    def send_reply(self, ex: Exchange, reply: Reply) -> None:
        """Answer ``ex`` with a gateway-made response (a plugin's or an error)."""
        if ex.done:
            return
        if ex.response_started:
            self._abort(ex)
            return
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abort()
        task = ex.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        ex.task = None
        if not ex.request_id:
            ex.request_id = self.server.next_request_id()
        ex.status = reply.status
        headers = [(n.lower(), n, v) for n, v in reply.headers]
        if reply.code is not None:
            ex.reply_code = reply.code
            body = error_body(reply.status, reply.code, reply.message, ex.request_id)
            headers.append((b"content-type", b"content-type", b"application/json"))
            if ex.status >= 500 or ex.status in (400, 408, 413, 414, 431):
                ex.keep_alive = False
        else:
            body = reply.body
        extra = ex.response_extra
        if extra is not None and ex.route is not None and ex.route.chain.response_hooks:
            headers += extra.items  # for the hooks to see
            extra = None
        ex.response_headers = Headers(headers)
        if not ex.request_complete and ex.body_kind != BODY_NONE:
            # The rest of the body must be read before the next request: fine when it is
            # short and announced; otherwise (or when the client awaits 100-continue) close.
            remaining = ex.content_length - ex.body_received
            if (
                ex.body_kind == BODY_CHUNKED
                or remaining > DISCARD_LIMIT
                or (ex.expect_continue and not ex.continue_sent)
            ):
                ex.keep_alive = False
        if self.server.draining:
            ex.keep_alive = False
        if ex.route is not None and ex.route.chain.response_hooks:
            try:
                ex.route.chain.run_response(ex)
            except PluginFailure:
                pass  # already counted and logged; the reply goes out as it is
        no_body = has_no_body(ex.status, ex.method)
        length = None if ex.status == 204 or ex.status < 200 else str(len(body)).encode()
        ex.response_started = True
        head = response_head(
            ex,
            length,
            False,
            self.runtime.forwarding,
            self.server.date_header,
            extra=b"" if extra is None else extra.raw,
        )
        self._write(head if no_body else head + body)
        ex.bytes_out = 0 if no_body else len(body)
        self._finished(ex)

    def _finished(self, ex: Exchange) -> None:
        ex.done = True
        self._log(ex)
        if self.closed:
            return
        # The exchange's upstream is gone and can no longer resume reading for it.
        if self._paused & PAUSE_UPSTREAM:
            self._unpause(PAUSE_UPSTREAM)
        if not ex.request_complete:
            ex.body_buf = None
            ex.body_buffered = 0
            self._unpause(PAUSE_BUFFER)
            # The rest of the body must be read before the next request: fine when short and
            # announced, otherwise closing is cheaper (send_reply decides this before its head;
            # an upstream that answered early is covered here).
            if ex.body_kind == BODY_CHUNKED or (
                ex.content_length - ex.body_received > DISCARD_LIMIT
            ):
                ex.keep_alive = False
        if not ex.keep_alive:
            self._close(lingering=not ex.request_complete)
        elif not ex.request_complete:
            ex.discard_body = True  # on_message_complete moves on to the next exchange
        else:
            self._next()

    def _log(self, ex: Exchange) -> None:
        """The log phase: plugins' log hooks, then metrics and the access log."""
        route = ex.route
        if route is not None and route.chain.log_hooks:
            route.chain.run_log(ex)
        observer = self.server.observer
        if observer is not None:
            try:
                observer.finish(ex)
            except Exception:
                log.exception("observer failed", extra={"request_id": ex.request_id})

    def _next(self) -> None:
        self.active = None
        if self.pipeline:
            ex = self.pipeline.popleft()
            if len(self.pipeline) < MAX_PIPELINE // 2:
                self._unpause(PAUSE_PIPELINE)
            self.active = ex
            self._start(ex)
        else:
            # While draining, the worker's drain loop closes this connection once it has been
            # idle for DRAIN_IDLE_GRACE: closing it now would race a client that reuses it
            # at once, having been told nothing (this response's head left before the
            # drain began, so without "Connection: close").
            self.idle_since = self.server.now

    def _reject(self, code: str, message: str | None = None) -> None:
        """Parsing cannot go on: answer the request being parsed with ``code``, then close."""
        if self.linger_until:
            return  # already closing after its last response: nothing more can be written
        self._stop_reading()
        ex = self.parsing
        if ex is None:
            ex = Exchange(self)
        self.parsing = None
        ex.keep_alive = False
        if ex.request_id == "":
            ex.request_id = self.server.next_request_id()
        log.info(
            "rejected request: %s%s",
            code,
            f" ({message})" if message else "",
            extra={"request_id": ex.request_id, "client": self.peer_ip},
        )
        if self.active is None:
            self.active = ex
        if ex is self.active:
            self.send_reply(ex, Reply.error(code, message))
        else:
            ex.pending_error = code
            if ex not in self.pipeline:
                self.pipeline.append(ex)
            for queued in self.pipeline:
                queued.keep_alive = False

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            transport.write(data)

    def _abort(self, ex: Exchange) -> None:
        """The response cannot be completed: drop the connection so the client sees it cut."""
        self.held = None
        up = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abort()
        if not ex.done:
            ex.done = True
            ex.reply_code = ex.reply_code or "aborted"
            self._log(ex)
        if self.transport is not None:
            self.transport.abort()

    def _close(self, lingering: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if lingering and transport.can_write_eof():
            # Half-close and keep draining what the client still sends, so it can read our
            # reply before the socket is torn down (a close with unread data sends a reset).
            transport.write_eof()
            self.linger_until = self.server.now + LINGER_SECONDS
            self._paused = PAUSE_STOPPED
            transport.resume_reading()
        else:
            self._close_now(self.server.now)

    def _close_now(self, now: float) -> None:
        """Close; ``close()`` waits for the write buffer to drain, so a client that reads
        nothing would hold the socket (and a ``max_connections`` slot) forever: the sweep
        aborts a close still pending after ``send_timeout``."""
        assert self.transport is not None
        self.transport.close()
        self.linger_until = now + self.limits.send_timeout

    # -- the server's periodic sweep --------------------------------------------------------
    def check_timeouts(self, now: float) -> None:
        if self.closed or self.transport is None:
            return
        if self.linger_until:
            if now >= self.linger_until:
                if self.transport.is_closing():
                    self.transport.abort()
                else:
                    self._close_now(now)
            return
        limits = self.limits
        ex = self.active
        if ex is None and self.parsing is None:
            idle = limits.idle_timeout if self.requests else limits.header_timeout
            if now - self.idle_since > idle:
                self._close_now(now)
            return
        if self._headers_since and now - self._headers_since > limits.header_timeout:
            self._headers_since = 0.0
            self._reject("request_timeout")
            return
        parsing = self.parsing
        if (
            parsing is not None
            and not self._headers_since
            and not parsing.request_complete
            and not self._paused  # the gateway stopped reading, not the client
            and now - self._body_since > limits.body_timeout
        ):
            if parsing is self.active and parsing.response_started:
                self._abort(parsing)
            else:
                self._reject("body_timeout")
            return
        if ex is None or ex.done:
            return
        if self.write_paused:
            if now - self.write_paused_since > limits.send_timeout:
                log.info("client stopped reading; closing", extra={"request_id": ex.request_id})
                self._abort(ex)
            return
        up = ex.upstream
        route = ex.route
        if not ex.upstream_since and ex.upstream_target is not None:
            # The upstream phase's start, stamped here rather than per request: the sweep's
            # granularity is the timeouts' anyway.
            ex.upstream_since = now
        if (
            route is not None
            and route.timeouts.total
            and ex.upstream_since  # not while the request plugins still run
            and not ex.response_started
            and now - ex.upstream_since > route.timeouts.total
        ):
            self.send_reply(ex, Reply.error("upstream_timeout"))  # retries included: no more
        elif up is not None and route is not None and now - up.last_read > route.timeouts.read:
            self.upstream_failed(ex, "upstream_timeout", up)
        elif (
            up is None
            and ex.task is not None
            and ex.upstream_target is None  # still in the request plugins, not connecting
            and now - ex.plugins_since > limits.plugin_timeout
        ):
            log.warning(
                "request plugins did not finish in time", extra={"request_id": ex.request_id}
            )
            self.send_reply(ex, Reply.error("plugin_timeout"))


def _parser_reason(exc: Exception) -> str:
    text = str(exc)
    return text[:120] if text else type(exc).__name__
