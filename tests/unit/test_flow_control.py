"""Flow control of the client protocol, driven without sockets (as uvicorn tests its own).

``ClientConnection`` and ``UpstreamConnection`` get fake transports that record writes and
whether reading is paused; the tests feed bytes with ``data_received`` and play the
transports' flow-control callbacks (``pause_writing``/``resume_writing``) themselves, so every
interleaving is exact: no sleeping, no clocks but the server's own (set by hand).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config.compile import compile_config
from gateway.config.load import load_text
from gateway.plugin import default_registry
from gateway.proxy.protocol import BODY_BUFFER_HIGH, DISCARD_LIMIT, ClientConnection
from gateway.server import ServerState
from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.target import Target

CONFIG = """\
listeners:
  - {name: public, bind: "127.0.0.1:8080"}
upstreams:
  backend:
    targets: [{url: "http://127.0.0.1:9"}]
    timeouts: {read: 10s}
routes:
  - name: up
    match: {path_prefix: /up}
    upstream: backend
limits:
  max_body_size: 100m
"""
READ_TIMEOUT = 10.0


class FakeTransport:
    """Enough of ``asyncio.Transport`` for the protocols: records what they do to it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reading = True
        self.closing = False
        self.aborted = False
        self.eof = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        assert not self.eof, "write after write_eof"  # uvloop raises RuntimeError
        self.data += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class Harness:
    def __init__(self) -> None:
        config, source = load_text(CONFIG, default_registry())
        self.state = ServerState(compile_config(config, source))
        self.target: Target = self.state.runtime.targets()[0]
        self.client = ClientConnection(self.state)
        self.ct = FakeTransport()
        self.client.connection_made(self.ct)  # type: ignore[arg-type]

    def pooled_upstream(self) -> tuple[UpstreamConnection, FakeTransport]:
        """An idle upstream connection in the target's pool, taken by the next exchange."""
        up = UpstreamConnection(self.target)
        t = FakeTransport()
        up.connection_made(t)  # type: ignore[arg-type]
        self.target.pool.release(up, self.state.now)
        return up, t

    def feed(self, data: bytes) -> None:
        self.client.data_received(data)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.client.connection_lost(None)


def _post(path: bytes, length: int, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n%s\r\n" % (path, length, extra)


GET = b"GET /up/a HTTP/1.1\r\nhost: t\r\n\r\n"


def _ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


# -- request body: buffering before the upstream is ready, and 100-continue -------------------
def _connected(h: Harness) -> tuple[UpstreamConnection, FakeTransport]:
    up = UpstreamConnection(h.target)
    t = FakeTransport()
    up.connection_made(t)  # type: ignore[arg-type]
    return up, t


async def _settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_body_is_buffered_up_to_the_watermark_until_the_upstream_is_ready(
    h: Harness, pending_connect: list[asyncio.Future[UpstreamConnection]]
) -> None:
    piece = b"b" * (BODY_BUFFER_HIGH // 4)
    h.feed(_post(b"/up/x", 8 * len(piece)))
    await _settle()
    assert len(pending_connect) == 1
    for i in range(4):
        h.feed(piece)
        assert h.ct.reading, f"paused after {i + 1} pieces, at or under the watermark"
    h.feed(piece)  # past BODY_BUFFER_HIGH
    assert not h.ct.reading
    up, ut = _connected(h)
    pending_connect[0].set_result(up)
    await _settle()
    sent = ut.take()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /up/x HTTP/1.1\r\n")
    assert body == piece * 5  # flushed in order, once
    assert h.ct.reading  # the buffer is gone: reading resumes
    h.feed(piece * 3)  # the rest streams straight through
    assert ut.take() == piece * 3
    up.data_received(_ok(b"done"))
    assert h.ct.take().startswith(b"HTTP/1.1 200 OK\r\n")


async def test_chunked_body_buffered_before_connect_is_sent_chunked(
    h: Harness, pending_connect: list[asyncio.Future[UpstreamConnection]]
) -> None:
    h.feed(b"POST /up/c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await _settle()
    up, ut = _connected(h)
    pending_connect[0].set_result(up)
    await _settle()
    h.feed(b"6\r\n world\r\n0\r\n\r\n")
    head, _, body = ut.take().partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"


async def test_100_continue_waits_for_the_upstream(
    h: Harness, pending_connect: list[asyncio.Future[UpstreamConnection]]
) -> None:
    h.feed(_post(b"/up/e", 10, b"expect: 100-continue\r\n"))
    await _settle()
    assert h.ct.data == b""  # nothing promised before an upstream is there to take the body
    up, ut = _connected(h)
    pending_connect[0].set_result(up)
    await _settle()
    assert h.ct.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in ut.data.lower()
    h.feed(b"0123456789")
    assert ut.take().endswith(b"\r\n\r\n0123456789")


def test_100_continue_with_a_pooled_upstream(h: Harness) -> None:
    _, ut = h.pooled_upstream()
    h.feed(_post(b"/up/e", 10, b"Expect: 100-continue\r\n"))
    assert h.ct.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in ut.data.lower()


def test_no_100_continue_for_a_request_without_a_body(h: Harness) -> None:
    up, _ = h.pooled_upstream()
    h.feed(_post(b"/up/e", 0, b"expect: 100-continue\r\n"))
    up.data_received(_ok(b"x"))
    assert h.ct.take().startswith(b"HTTP/1.1 200 OK\r\n")


def test_no_100_continue_when_rejected_before_the_body(h: Harness) -> None:
    h.feed(_post(b"/nowhere", 10, b"expect: 100-continue\r\n"))
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 404 ")
    assert b" 100 " not in out
    assert b"connection: close" in out  # the client may still send the body: do not parse it


# -- backpressure: upstream write buffer -> client reading, and back ----------------------------
def test_full_upstream_write_buffer_pauses_client_reading(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(_post(b"/up/u", 1000))
    h.feed(b"a" * 400)
    up.pause_writing()  # what the upstream transport does past its high-water mark
    assert not h.ct.reading
    h.feed(b"a" * 100)  # bytes already read still go through (the transport buffers them)
    up.resume_writing()
    assert h.ct.reading
    h.feed(b"a" * 500)
    assert ut.take().endswith(b"a" * 1000)


def test_full_client_write_buffer_pauses_upstream_reading(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
    h.client.pause_writing()
    assert not ut.reading
    h.client.resume_writing()
    assert ut.reading
    up.data_received(b"56789")
    assert h.ct.take().endswith(b"\r\n\r\n0123456789")


def test_connection_released_while_the_client_is_paused_is_not_pooled_paused(
    h: Harness,
) -> None:
    """The response completes in the very read that filled the client's buffer: the upstream
    connection goes back to the pool, and must not stay paused for the next client."""
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
    h.client.pause_writing()
    up.data_received(b"56789")  # complete: released to the pool
    assert h.target.pool.idle_count == 1
    assert ut.reading, "a paused connection went back to the pool"
    h.client.resume_writing()
    assert ut.reading


def test_next_exchange_starts_paused_while_the_client_is_not_reading(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(GET + b"GET /up/b HTTP/1.1\r\nhost: t\r\n\r\n")  # pipelined
    h.client.pause_writing()
    up.data_received(_ok(b"first"))  # done; the same pooled connection takes the next one
    assert up.exchange is not None and up.exchange.path == b"/up/b"
    assert not ut.reading, "the next response would pile up in the client's buffer"
    h.client.resume_writing()
    assert ut.reading
    up.data_received(_ok(b"second"))
    out = h.ct.take()
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"second")


# -- timers around backpressure ---------------------------------------------------------------
def test_a_long_client_pause_does_not_count_as_upstream_silence(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
    h.client.pause_writing()
    h.state.now += READ_TIMEOUT * 3  # the client took its time (send_timeout is longer)
    h.client.check_timeouts(h.state.now)
    h.client.resume_writing()
    h.client.check_timeouts(h.state.now)  # a sweep before the upstream's next read lands
    assert not ut.closing and not h.ct.closing
    up.data_received(b"56789")
    assert h.ct.take().endswith(b"0123456789")


def test_a_slowly_sent_body_does_not_count_as_upstream_silence(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(_post(b"/up/slow", 50))
    for _ in range(5):
        h.state.now += READ_TIMEOUT * 0.6
        h.client.check_timeouts(h.state.now)
        h.feed(b"x" * 10)
    assert not ut.closing and not h.ct.closing
    up.data_received(_ok(b"ok"))
    assert h.ct.take().startswith(b"HTTP/1.1 200 OK\r\n")


def test_an_upstream_that_stops_reading_the_body_times_out(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(_post(b"/up/stuck", 5000))
    h.feed(b"x" * 1000)
    up.pause_writing()
    h.state.now += READ_TIMEOUT + 1
    h.client.check_timeouts(h.state.now)
    assert ut.aborted
    assert h.ct.take().startswith(b"HTTP/1.1 504 ")


# -- early responses with the request body unread ---------------------------------------------
def test_early_reply_to_a_buffered_pipelined_request_resumes_reading(h: Harness) -> None:
    """The queued request's body filled the buffer (reading paused); answered early (no route)
    with a small rest unread, reading must resume to discard the rest."""
    up, _ = h.pooled_upstream()
    length = BODY_BUFFER_HIGH + DISCARD_LIMIT // 2
    h.feed(GET + _post(b"/nowhere", length) + b"p" * (BODY_BUFFER_HIGH + 1))
    assert not h.ct.reading
    up.data_received(_ok(b"first"))
    out = h.ct.take()
    assert out.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 404 " in out
    assert b"connection: close" not in out
    assert h.ct.reading, "reading stayed paused with the rest of the body unread"
    h.feed(b"p" * (length - BODY_BUFFER_HIGH - 1) + GET)
    assert up.exchange is not None and up.exchange.path == b"/up/a"


def test_upstream_early_response_clears_the_upstream_pause(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(_post(b"/up/early", 10_000))
    h.feed(b"x" * 6_000)
    up.pause_writing()  # the upstream is not reading the body...
    assert not h.ct.reading
    up.data_received(_ok(b"no thanks"))  # ...it answered without it
    assert h.ct.take().endswith(b"no thanks")
    assert ut.closing  # the request was not fully sent: never pooled
    assert h.ct.reading, "the client stays paused for an upstream that is gone"
    h.feed(b"x" * 4_000 + GET)  # the rest is discarded; the next request is served
    assert h.client.active is not None and h.client.active.path == b"/up/a"


def test_upstream_early_response_with_a_large_unread_body_closes(h: Harness) -> None:
    up, _ = h.pooled_upstream()
    h.feed(_post(b"/up/early", 50 * 1024 * 1024))
    h.feed(b"x" * 100_000)
    up.data_received(_ok(b"no thanks"))
    assert h.ct.take().endswith(b"no thanks")
    # Discarding 50 MB to keep the connection would cost more than a new connection.
    assert h.ct.eof or h.ct.closing


def test_a_connection_is_idle_from_when_it_is_made_not_from_when_it_was_created() -> None:
    # On a TLS listener the protocol is created at accept and connection_made comes after the
    # handshake, and the server's clock may lag: a draining worker (which closes connections
    # idle for DRAIN_IDLE_GRACE) must not see a brand-new connection as long idle.
    config, source = load_text(CONFIG, default_registry())
    state = ServerState(compile_config(config, source))
    state.now -= 5.0  # the clock as a slow handshake (or a late sweep) leaves it
    client = ClientConnection(state)
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    state.tick()
    assert state.now - client.idle_since < 1.0
    client.connection_lost(None)
