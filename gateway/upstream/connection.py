"""The upstream side of one proxied exchange: an asyncio Protocol per upstream connection.

Theory of operation
-------------------
A connection carries one exchange at a time (no pipelining towards upstreams). The client
side (``gateway.proxy.protocol.ClientConnection``) writes the request through ``write``;
this protocol parses the response with httptools and calls back into the client side:
``upstream_head``, ``upstream_body``, ``upstream_done`` and ``upstream_failed``.

A connection goes back to its pool only when the response was complete, the request was
fully written, and both sides agreed to keep it alive. Anything else — an error, a response
to ``HEAD`` whose body length we cannot trust, bytes arriving while idle — closes it: a
connection in an unknown state is never reused.

httptools cannot be told that a response answers a HEAD request (it would wait for the
Content-Length bytes), so a HEAD exchange ends at the response head and the parser is
replaced before the connection is reused.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.upstream.target import Target

# Response framing as seen from the upstream.
FRAMING_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAMING_LENGTH = 1
FRAMING_CHUNKED = 2
FRAMING_CLOSE = 3  # read until the upstream closes


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_headers",
        "_in_body",
        "_interim",
        "_parser",
        "exchange",
        "framing",
        "idle_since",
        "last_read",
        "length_value",
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
        self._headers: list[tuple[bytes, bytes, bytes]] = []
        self._in_body = False
        self._interim = False
        self.framing = FRAMING_NONE
        self.length_value: bytes | None = None
        self.response_started = False
        self.requests = 0
        self.idle_since = 0.0
        self.last_read = 0.0

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.target.pool.discard(self)
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
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
        self.last_read = ex.conn.server.now
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("upstream_bad_response")
        except httptools.HttpParserError:
            if self.exchange is not None:
                self._fail("upstream_bad_response")

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
        self._headers = []
        self._in_body = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # headers after the head are trailers: dropped, consistently
            self._headers.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        if ex is None:
            return
        self._in_body = True
        status: int = self._parser.get_status_code()
        if status < 200:
            self._interim = True  # 100 Continue, 103 Early Hints: not forwarded
            return
        self._interim = False
        headers = self._headers
        framing = FRAMING_CLOSE
        length = None
        for lname, _, value in headers:
            if lname == b"content-length":
                length = value
                framing = FRAMING_LENGTH
            elif lname == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                framing = FRAMING_CHUNKED
                length = None
                break
        if ex.method == b"HEAD" or status == 204 or status == 304:
            framing = FRAMING_NONE
        self.framing = framing
        self.length_value = length
        self.response_started = True
        ex.conn.upstream_head(ex, status, headers)
        if ex.method == b"HEAD" and self.exchange is ex:
            keep = self._parser.should_keep_alive()
            self._parser = httptools.HttpResponseParser(self)
            self._finish(ex, keep)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        if ex is not None:
            ex.conn.upstream_body(ex, body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        ex = self.exchange
        if ex is not None:
            self._finish(ex, self._parser.should_keep_alive())

    # -- used by the client side ------------------------------------------------------------
    def start(self, ex: Exchange, head: bytes) -> None:
        """Bind an exchange and write its request head."""
        self.exchange = ex
        self.response_started = False
        self.framing = FRAMING_NONE
        self.requests += 1
        self.last_read = ex.conn.server.now
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def usable(self) -> bool:
        t = self.transport
        return t is not None and not t.is_closing() and self.exchange is None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once: its exchange was abandoned mid-way."""
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    def _finish(self, ex: Exchange, keep_alive: bool) -> None:
        self.exchange = None
        ex.conn.upstream_done(ex, self, reusable=keep_alive and self.framing != FRAMING_CLOSE)

    def _fail(self, code: str) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.conn.upstream_failed(ex, code, self)

    def __repr__(self) -> str:
        state = "active" if self.exchange is not None else "idle"
        return f"<UpstreamConnection {self.target.label} {state} requests={self.requests}>"
