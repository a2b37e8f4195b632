"""Regressions found in review of the data plane, driven with fake transports (no sockets).

Each test plays one exact event sequence on ``ClientConnection`` / ``UpstreamConnection``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from gateway.plugin import Plugin, PluginConfig, Reply
from gateway.proxy.chain import Chain
from gateway.proxy.exchange import Exchange
from gateway.proxy.protocol import BODY_BUFFER_HIGH
from gateway.upstream.connection import UpstreamConnection
from tests.unit.test_flow_control import (
    GET,
    FakeTransport,
    Harness,
    _connected,
    _settle,
)


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


async def test_body_timeout_does_not_blame_a_client_the_gateway_stopped_reading(
    h: Harness,
) -> None:
    # A pipelined upload waits behind a long response (an SSE stream); reading paused at the
    # buffer watermark is the gateway's doing, not a client pausing mid-body.
    up, _ = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    h.feed(b"POST /up/b HTTP/1.1\r\nhost: t\r\ncontent-length: 200000\r\n\r\n")
    h.feed(b"x" * (BODY_BUFFER_HIGH + 1))
    assert not h.ct.reading
    limits = h.client.limits
    later = h.state.now + limits.body_timeout + 5
    up.last_read = h.state.now = later  # the stream is alive
    h.client.check_timeouts(later)
    queued = h.client.pipeline[0]
    assert queued.pending_error == ""
    up.data_received(b"0\r\n\r\n")  # A ends; B starts and reading resumes
    assert h.ct.reading
    h.client.check_timeouts(later + 1)
    assert h.client.active is queued and queued.pending_error == ""


async def test_retry_after_a_stale_pooled_connection_uses_a_fresh_one(
    h: Harness, pending_connect: list[asyncio.Future[UpstreamConnection]]
) -> None:
    # The upstream restarted: every pooled connection is dead, their FINs not yet read. The
    # one retry must go to a new connection, not to the next dead one in the pool.
    older, _ = h.pooled_upstream()
    newer, _ = h.pooled_upstream()
    older.requests = newer.requests = 1  # both served a request before
    h.feed(GET)
    assert newer.exchange is not None
    newer.connection_lost(None)  # closed as the request went out: retryable
    await _settle()
    assert older.exchange is None, "the retry took another pooled connection"
    assert len(pending_connect) == 1
    fresh, ft = _connected(h)
    pending_connect[0].set_result(fresh)
    await _settle()
    assert ft.take().startswith(b"GET /up/a HTTP/1.1\r\n")
    fresh.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    assert h.ct.take().endswith(b"\r\n\r\nok")


class _BadReplyPlugin(Plugin):
    """An async plugin whose Reply cannot be serialised (str header values): a plugin bug."""

    name = "bad_reply"

    async def on_request(self, ex: Exchange) -> Reply | None:
        await asyncio.sleep(0)
        return Reply(403, b"no", headers=[(b"x-why", "str, not bytes")])  # type: ignore[list-item]


async def test_a_plugin_bug_after_an_async_hook_does_not_hang_the_client(h: Harness) -> None:
    # In the sync path such an exception surfaces from the parser callback and the connection
    # is dropped; in a task it vanished ("exception never retrieved") and the client waited
    # forever: no timeout covers an exchange with no upstream.
    route = h.state.runtime.router.routes[0]
    route.chain = Chain([_BadReplyPlugin(PluginConfig())])
    h.feed(GET)
    await _settle()
    assert h.ct.aborted or h.ct.closing or h.ct.data.startswith(b"HTTP/1.1 500 ")


UPGRADE = b"GET /up/u HTTP/1.1\r\nhost: t\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"


def test_an_upgrade_request_answered_at_once_closes_the_connection(h: Harness) -> None:
    # Nothing is parsed after an upgrade request: a 404 sent keep-alive would leave the
    # client's next request unanswered until idle_timeout.
    h.feed(UPGRADE.replace(b"/up/u", b"/nope"))
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 404 ") and b"connection: close\r\n" in out
    assert h.ct.eof or h.ct.closing


def test_a_request_pipelined_before_an_upgrade_keeps_the_connection_for_it(h: Harness) -> None:
    up, ut = h.pooled_upstream()
    h.feed(GET + UPGRADE)
    assert ut.take().startswith(b"GET /up/a HTTP/1.1\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close" not in out
    assert not h.ct.closing, "closed before the upgrade request was answered"
    sent = ut.take()
    assert sent.startswith(b"GET /up/u HTTP/1.1\r\n") and b"upgrade" not in sent.lower()
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nu")
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"connection: close\r\n" in out


class _SlowPlugin(Plugin):
    """An async request plugin that finishes when the test says so."""

    name = "slow"

    def __init__(self, config: PluginConfig) -> None:
        super().__init__(config)
        self.release = asyncio.Event()

    async def on_request(self, ex: Exchange) -> Reply | None:
        await self.release.wait()
        return None


async def test_plugin_timeout_counts_from_when_the_plugins_start_not_from_parsing(
    h: Harness,
) -> None:
    # A request pipelined behind a slow one waits its turn; that wait is not its plugins'.
    up, ut = h.pooled_upstream()
    plugin = _SlowPlugin(PluginConfig())
    h.state.runtime.router.routes[0].chain = Chain([plugin])
    h.feed(GET + GET.replace(b"/up/a", b"/up/b"))
    plugin.release.set()
    await _settle()
    assert ut.take().startswith(b"GET /up/a HTTP/1.1\r\n")
    plugin.release.clear()
    h.state.now += h.state.runtime.limits.plugin_timeout + 5  # the upstream took its time
    up.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na")
    assert h.ct.take().endswith(b"\r\n\r\na")
    await _settle()  # the second request's plugin has just started
    h.client.check_timeouts(h.state.now + 1)
    assert h.ct.take() == b"", "the second request's plugin was timed out at once"
    plugin.release.set()
    await _settle()
    assert ut.take().startswith(b"GET /up/b HTTP/1.1\r\n")


def test_bytes_after_a_closing_http10_response_are_not_answered(h: Harness) -> None:
    # The 404 ends the connection (HTTP/1.0, no keep-alive); httptools then refuses the
    # rest of the same read. That refusal must not write a 400 after the half-close.
    h.feed(b"GET /nope HTTP/1.0\r\n\r\nGET /nope HTTP/1.0\r\n\r\n")
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.0 404 ") and out.count(b"HTTP/1.0") == 1
    assert h.ct.eof


def test_a_request_after_the_last_response_in_the_same_read_is_not_started(h: Harness) -> None:
    _, ut = h.pooled_upstream()
    h.state.draining = True  # every response is the connection's last
    h.feed(b"GET /nope HTTP/1.1\r\nhost: t\r\n\r\n" + GET)
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 404 ") and out.count(b"HTTP/1.1") == 1
    assert ut.take() == b"", "a request read after the last response went upstream"
