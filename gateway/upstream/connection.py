"""The upstream side of one proxied exchange: an asyncio Protocol per upstream connection.

Theory of operation
-------------------
A connection carries one exchange at a time (no pipelining towards upstreams). The client
side (``gateway.proxy.protocol.ClientConnection``) writes the request through ``start``
(the head) and ``send_body``; this protocol parses the response with httptools and calls back
into the client side: ``upstream_head``, ``upstream_body``, ``upstream_done`` and
``upstream_failed``.

httptools makes no callback per response field here: the head's bytes are kept as they come
(blank lines before the status line dropped, as llhttp skips them; 64 KiB at most), and at
``on_headers_complete`` the field lines are sliced out of them and read in one call
(``gateway.http.fields.scan_fields``, compiled where built). A 1xx that frames content is
refused: what follows it could not be told from the next head.

A connection goes back to its pool only when the response was complete, the request was
fully written, and both sides agreed to keep it alive. Anything else — an error, bytes
beyond the response, bytes arriving while idle — closes it: a connection in an unknown state
is never reused.

httptools cannot be told that a response answers a HEAD request (it would wait for the
Content-Length bytes), so a HEAD exchange ends at the response head and the parser is
replaced before the connection is reused. The old parser still runs to the end of the bytes
being fed and may report the HEAD response complete (``Content-Length: 0``) after a pipelined
exchange has already taken the connection: once an exchange has ended, the rest of that feed
(``_spent``) must bring nothing, and anything it does bring closes the connection.

The target's counters are kept here: ``connections`` (open ones), ``in_flight`` (exchanges
bound to one of them: +1 in ``start``, -1 wherever ``exchange`` goes back to ``None``; only
for targets whose balancer or circuit breaker reads it, ``Target.counted``), the
passive-health outcome of each response head (a 5xx is a failure, anything else resets the
count) and, for ``p2c_ewma``, the time to the response head.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

import httptools

from gateway.http.fields import CHUNKED, scan_fields

_monotonic = time.monotonic

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.upstream.target import Target

# Response framing as seen from the upstream.
FRAMING_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAMING_LENGTH = 1
FRAMING_CHUNKED = 2
FRAMING_CLOSE = 3  # read until the upstream closes

#: An upstream's response head (status line and fields) longer than this fails the exchange
#: (502, ``upstream_bad_response``): it is held in memory until complete.
MAX_RESPONSE_HEAD = 64 * 1024


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_acc",
        "_in_body",
        "_interim",
        "_parser",
        "_spent",
        "connection_value",
        "exchange",
        "field_flags",
        "fields",
        "framing",
        "held",
        "idle_since",
        "last_read",
        "length_value",
        "plain",
        "requests",
        "response_started",
        "target",
        "transport",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        #: the bytes of a response head read so far (a head can span reads)
        self._acc = b""
        #: the response's field lines, raw (``Name: value\r\n`` each)
        self.fields = b""
        self._in_body = False
        self._interim = False
        self.framing = FRAMING_NONE
        self.held: bytes | None = None
        self.length_value: bytes | None = None
        self.connection_value: bytes | None = None
        #: the response's plain field lines, ready to write (gateway.http.fields.scan_fields)
        self.plain = b""
        #: scan_fields' flags (HAS_DATE, HAS_REQUEST_ID, ODD_FIELDS, CHUNKED)
        self.field_flags = 0
        self._spent = False
        self.response_started = False
        self.requests = 0
        self.idle_since = 0.0
        self.last_read = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.target.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        target = self.target
        target.pool.discard(self)
        if self.transport is not None:
            target.connections -= 1
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        if target.counted:
            target.in_flight -= 1
        if self.response_started and self.framing == FRAMING_CLOSE and exc is None:
            ex.conn.upstream_done(ex, self, reusable=False)
        else:
            ex.conn.upstream_failed(ex, "upstream_reset", self)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # An idle connection must stay silent; anything else means we lost track of it.
            self.close()
            return
        client = ex.conn
        self.last_read = client.server.now
        if not self._in_body:
            # A head is being read: keep its bytes for on_headers_complete, which takes the
            # fields from them instead of a callback per field from httptools.
            acc = self._acc
            acc = acc + data if acc else data
            if acc[:1] != b"H":
                # llhttp skips blank lines before a status line: so does the limit below (a
                # stream of CRLFs is not a head), and on_headers_complete's slicing.
                acc = acc.lstrip(b"\r\n")
            self._acc = acc
            if len(acc) > MAX_RESPONSE_HEAD and acc.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD) < 0:
                self._fail("upstream_bad_response")
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("upstream_bad_response")
        except httptools.HttpParserError:
            if self.exchange is not None:
                self._fail("upstream_bad_response")
        self._spent = False
        if client.held is not None:
            client.flush_held()

    def eof_received(self) -> bool | None:
        return None  # let connection_lost decide

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.conn.pause_reading_for_upstream(True)

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.conn.pause_reading_for_upstream(False)

    # -- httptools callbacks ----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self._spent:
            self._extra_bytes()
            return
        self._in_body = False

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self._in_body = True
        status: int = self._parser.get_status_code()
        acc = self._acc  # from the status line on (data_received drops blank lines before it)
        end = acc.find(b"\r\n\r\n")
        if end < 0:  # cannot be: llhttp takes CRLF line ends only
            raise ValueError("a response head with no blank line")
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: not forwarded
            _, length, _, flags = scan_fields(acc[acc.find(b"\r\n") + 2 : end + 2])
            if flags & CHUNKED or (length is not None and length != b"0"):
                # A 1xx has no content (RFC 9110 15.2) and may not frame one (RFC 9112 6.1),
                # but llhttp reads one: what follows could not be told from the next head
                # (an empty chunked body's trailer fields would pose as the final response's).
                raise ValueError("a 1xx response framing content")
            rest = self._acc = acc[end + 4 :].lstrip(b"\r\n")  # the next head may follow
            if len(rest) > MAX_RESPONSE_HEAD and rest.find(b"\r\n\r\n", 0, MAX_RESPONSE_HEAD) < 0:
                raise ValueError("a response head over MAX_RESPONSE_HEAD")
            return
        self._acc = b""
        self._interim = False
        self.fields = fields = acc[acc.find(b"\r\n") + 2 : end + 2]
        self.plain, self.length_value, self.connection_value, flags = scan_fields(fields)
        self.field_flags = flags
        # One clock read serves the upstream-duration metric, the access log and p2c_ewma.
        now = ex.t_upstream_head = _monotonic()
        target = self.target
        if status >= target.watch_from:  # a 5xx, or failures to reset
            target.observe_response(status)
        if target.track_latency:  # p2c_ewma: Target.observe_latency(), inlined (per response)
            rtt = now - ex.t_upstream
            ewma = target.ewma
            target.ewma = rtt if rtt > ewma else (ewma + rtt) * 0.5
        if ex.method == b"HEAD" or status == 204 or status == 304:
            self.framing = FRAMING_NONE
        elif flags & CHUNKED:
            self.framing = FRAMING_CHUNKED
            self.length_value = None
        elif self.length_value is not None:
            self.framing = FRAMING_LENGTH
        else:
            self.framing = FRAMING_CLOSE
        self.response_started = True
        ex.conn.upstream_head(ex, status, self)
        if ex.method == b"HEAD" and self.exchange is ex:
            keep = self._parser.should_keep_alive()
            self._parser = httptools.HttpResponseParser(self)
            self._finish(ex, keep)

    def on_body(self, body: bytes) -> None:
        if self._spent:
            self._extra_bytes()
            return
        if self._interim:
            # A 1xx has no content (RFC 9110 15.2), but llhttp reads one where a 101 or 1xx
            # carries Content-Length or chunked: a broken upstream, and the next head's bytes
            # could not be told from it.
            raise ValueError("a 1xx response with content")
        ex = self.exchange
        if ex is not None:
            ex.conn.upstream_body(ex, body)

    def on_message_complete(self) -> None:
        self._in_body = False
        if self._interim:
            self._interim = False
            return
        if self._spent:
            return  # the stale parser ending a HEAD response that already ended
        ex = self.exchange
        if ex is not None:
            self._finish(ex, self._parser.should_keep_alive())

    # -- used by the client side ------------------------------------------------------------
    def start(self, ex: Exchange, head: bytes, hold: bool = False) -> None:
        """Bind an exchange and write its request head. With ``hold``, the head waits for
        the first body bytes (or ``flush_held``) so that both leave in one write."""
        self.exchange = ex
        self.response_started = False
        self._in_body = False
        self._acc = b""
        self.framing = FRAMING_NONE
        self.requests += 1
        self.last_read = ex.conn.server.now
        target = self.target
        if target.counted:
            target.in_flight += 1
        assert self.transport is not None
        if hold:
            self.held = head
        else:
            self.transport.write(head)

    def write(self, data: bytes) -> None:
        held = self.held
        if held is not None:
            self.held = None
            data = held + data
        if self.transport is not None:
            self.transport.write(data)

    def send_body(self, data: bytes, chunked: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        held = self.held
        if held is not None:
            self.held = None
            if chunked:
                transport.write(b"".join((held, b"%x\r\n" % len(data), data, b"\r\n")))
            else:
                transport.write(held + data)
        elif chunked:
            transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)

    def flush_held(self) -> None:
        held = self.held
        if held is not None and self.transport is not None:
            self.held = None
            self.transport.write(held)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once: its exchange was abandoned mid-way."""
        if self.exchange is not None:
            self.exchange = None
            if self.target.counted:
                self.target.in_flight -= 1
        self.held = None
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, ex: Exchange, keep_alive: bool) -> None:
        self.exchange = None
        if self.target.counted:
            self.target.in_flight -= 1
        self._spent = True
        ex.conn.upstream_done(ex, self, reusable=keep_alive and self.framing != FRAMING_CLOSE)

    def _extra_bytes(self) -> None:
        """The upstream sent more than its response: the connection's state is unknown. An
        exchange that took it meanwhile (a pipelined request) fails instead of reading them."""
        self._spent = False
        self._fail("upstream_bad_response")

    def _fail(self, code: str) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.conn.upstream_failed(ex, code, self)

    def __repr__(self) -> str:
        state = "active" if self.exchange is not None else "idle"
        return f"<UpstreamConnection {self.target.label} {state} requests={self.requests}>"
