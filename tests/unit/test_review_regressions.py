"""Regressions found in review of the data plane, driven with fake transports (no sockets).

Each test plays one exact event sequence on ``ClientConnection`` / ``UpstreamConnection``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.test_flow_control import GET, FakeTransport, Harness


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.client.connection_lost(None)


HEAD = b"HEAD /up/h HTTP/1.1\r\nhost: t\r\n\r\n"


async def test_pipelined_request_after_head_with_empty_length_gets_its_own_response(
    h: Harness,
) -> None:
    # A HEAD response with Content-Length: 0 ends at its head; httptools, not knowing it
    # answers HEAD, then reports the message complete itself. The pipelined GET behind it
    # takes the same pooled connection at once: that late "complete" must not end the GET.
    up, ut = h.pooled_upstream()
    h.feed(HEAD + GET)
    assert ut.take().startswith(b"HEAD /up/h HTTP/1.1\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert out.count(b"HTTP/1.1") == 1, "the GET was answered with nothing"
    assert ut.take().startswith(b"GET /up/a HTTP/1.1\r\n"), "the GET went to the same connection"
    assert up.exchange is not None, "the GET's exchange was ended before its response"
    assert h.target.pool.idle_count == 0, "a connection with a request in flight was pooled"
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nget")
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nget")
    assert h.target.pool.idle_count == 1


async def test_bytes_after_a_complete_response_in_the_same_read_are_not_pooled(
    h: Harness,
) -> None:
    # An upstream that sends more than its response (a wrong Content-Length, a stray second
    # response) leaves the connection in an unknown state: never reuse it.
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nx: ")
    assert h.ct.take().endswith(b"\r\n\r\nok")
    assert ut.closing, "a connection that sent extra bytes was kept"
    assert h.target.pool.acquire() is None


async def test_bytes_after_a_head_response_fail_the_pipelined_request_not_feed_it(
    h: Harness,
) -> None:
    # After a HEAD response with Content-Length, the stale parser reads the rest of the
    # segment as "body": those bytes must never reach the next exchange's client.
    up, ut = h.pooled_upstream()
    h.feed(HEAD + GET)
    ut.take()
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nJUNK")
    out = h.ct.take()
    assert b"JUNK" not in out
    assert ut.closing


def _close_stuck(h: Harness, t: FakeTransport) -> None:
    """The fake transport stays 'closing' until the test says otherwise: as a real one does
    while its write buffer holds bytes the client never reads."""
    assert t.closing and not t.aborted


async def test_a_connection_close_reply_the_client_never_reads_is_aborted(h: Harness) -> None:
    # transport.close() waits for the write buffer to drain; a client that reads nothing
    # would hold the socket (and a max_connections slot) forever.
    up, _ = h.pooled_upstream()
    h.feed(b"GET /up/a HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    _close_stuck(h, h.ct)
    limits = h.client.limits
    h.client.check_timeouts(h.state.now + limits.send_timeout + limits.idle_timeout + 10)
    h.client.check_timeouts(h.state.now + 2 * (limits.send_timeout + limits.idle_timeout) + 20)
    assert h.ct.aborted


async def test_an_idle_close_the_client_never_reads_is_aborted(h: Harness) -> None:
    up, _ = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    limits = h.client.limits
    t1 = h.state.now + limits.idle_timeout + 1
    h.client.check_timeouts(t1)
    _close_stuck(h, h.ct)
    h.client.check_timeouts(t1 + limits.send_timeout + 1)
    assert h.ct.aborted


async def test_a_lingering_close_the_client_never_reads_is_aborted(h: Harness) -> None:
    h.feed(b"POST /nowhere HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
    assert h.ct.take().startswith(b"HTTP/1.1 404 ")
    assert h.ct.eof  # half-closed, lingering
    limits = h.client.limits
    t1 = h.state.now + 60
    h.client.check_timeouts(t1)
    _close_stuck(h, h.ct)
    h.client.check_timeouts(t1 + limits.send_timeout + 1)
    assert h.ct.aborted
