"""Streaming and backpressure end to end: bodies flow through the gateway without being held.

The 100 MB transfers are generated and checked on the fly (neither the test nor the gateway
may hold the body); a thread samples the gateway's RSS from /proc during each transfer, and
the peak must stay far below the body size. Ordering, never timing, proves that streamed
responses are not buffered: the first event reaches the client while the upstream is provably
still sending (the response is incomplete).
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import h11
import pytest

from tests.conftest import proxy_config
from tests.support.client import Conn, parse_responses
from tests.support.procs import GatewayProcess, UpstreamProcess

MB = 1024 * 1024
BIG = 100 * MB
#: The RSS growth allowed during a 100 MB transfer: a buffered body would need the whole size.
RSS_GROWTH_LIMIT_KIB = 48 * 1024
#: What the test upstream's /download sends: this 64 KiB pattern, repeated.
PATTERN = bytes(range(256)) * 256
_PATTERN_RUN = PATTERN * 20  # any recv (<= 1 MiB) at any offset is a slice of this


class ScriptedUpstream:
    """An upstream the test itself plays, step by step, on raw sockets: it accepts a
    connection, and the test reads the request and writes the response piece by piece.
    Ordering then proves streaming without any clock: the client sees piece one while the
    upstream has provably not written piece two yet. Responses always close the connection,
    so the gateway never pools one and every request arrives on a fresh ``accept()``."""

    def __init__(self, rcvbuf: int = 0) -> None:
        sock = socket.socket()
        if rcvbuf:  # before listen(), so accepted sockets inherit it (and skip autotuning)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.settimeout(15)
        self.listener = sock
        self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def accept(self) -> tuple[socket.socket, bytes, bytes]:
        """The next upstream connection, its request head, and any body bytes after it."""
        conn, _ = self.listener.accept()
        conn.settimeout(15)
        head, rest = _read_head(conn)
        return conn, head, rest

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    up = ScriptedUpstream(rcvbuf=64 * 1024)
    yield up
    up.close()


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess, scripted: ScriptedUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    cfg = proxy_config(upstream.url, limits={"max_body_size": "200m"})
    cfg["upstreams"]["scripted"] = {"targets": [{"url": scripted.url}]}
    cfg["routes"] = [
        {
            "name": "small",
            "match": {"path_prefix": "/small"},
            "upstream": "backend",
            "max_body_size": "1m",
        },
        {"name": "scripted", "match": {"path_prefix": "/scripted"}, "upstream": "scripted"},
        *[
            {"name": f"r{i}", "match": {"path_prefix": p}, "upstream": "backend"}
            for i, p in enumerate(("/echo", "/download", "/sse", "/stream", "/chunked"))
        ],
    ]
    g = GatewayProcess(cfg, tmp_path_factory.mktemp("gw-stream"))
    yield g
    g.stop()


# -- helpers ----------------------------------------------------------------------------------
class RssSampler:
    """Polls the gateway's VmRSS in a thread while a transfer runs; keeps the peak."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.baseline = gw.rss_kib()
        self.peak = self.baseline
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.gw.rss_kib()
            except (OSError, RuntimeError):
                return  # the process is gone; the test's own checks will say why
            self.samples += 1
            self.peak = max(self.peak, rss)
            self._stop.wait(0.005)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _check_rss(name: str, rss: RssSampler) -> None:
    # Shown with ``pytest -rP`` (or ``-s``): the numbers behind the bound.
    print(
        f"{name}: RSS baseline {rss.baseline} KiB, peak +{rss.growth} KiB "
        f"over {rss.samples} samples"
    )
    assert rss.samples > 0
    assert rss.growth < RSS_GROWTH_LIMIT_KIB, (
        f"gateway RSS grew by {rss.growth} KiB during a {BIG // MB} MB transfer "
        f"(baseline {rss.baseline} KiB): the body is being buffered"
    )


def _blocks(total: int, block: int = MB) -> Iterator[bytes]:
    """``total`` bytes in ``block``-sized pieces, each stamped with its index so that a
    reordered, dropped or duplicated piece changes the digest."""
    base = hashlib.sha256(b"seed").digest() * (block // 32)
    sent = 0
    index = 0
    while sent < total:
        piece = struct.pack(">Q", index) + base[8 : min(block, total - sent)]
        yield piece
        sent += len(piece)
        index += 1


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of a response head; returns (head, bytes after it)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a response head: {bytes(buf)!r}")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return head, rest


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    return {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines[1:])}


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _read_body_json(sock: socket.socket, head: bytes, rest: bytes) -> Any:
    length = int(_headers(head)["content-length"])
    body = bytearray(rest)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        body += data
    return json.loads(bytes(body[:length]))


def _upload(port: int, chunked: bool) -> tuple[Any, str]:
    """Stream a BIG body to /echo; returns the upstream's JSON and our own sha256."""
    digest = hashlib.sha256()
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % BIG
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /echo/upload HTTP/1.1\r\nhost: t\r\n%s\r\n\r\n" % framing)
        for piece in _blocks(BIG):
            digest.update(piece)
            if chunked:
                s.sendall(b"%x\r\n" % len(piece))
                s.sendall(piece)
                s.sendall(b"\r\n")
            else:
                s.sendall(piece)
        if chunked:
            s.sendall(b"0\r\n\r\n")
        head, rest = _read_head(s)
        assert _status(head) == 200, head
        return _read_body_json(s, head, rest), digest.hexdigest()


class PatternReader:
    """Reads a response body of the /download pattern, checking every byte as it arrives."""

    def __init__(self, sock: socket.socket, already: bytes = b"") -> None:
        self.sock = sock
        self.offset = 0
        self._check(already)

    def _check(self, data: bytes) -> None:
        if not data:
            return
        start = self.offset % len(PATTERN)
        expected = _PATTERN_RUN[start : start + len(data)]
        assert data == expected, f"body differs from the pattern near offset {self.offset}"
        self.offset += len(data)

    def read(self, bufsize: int) -> int:
        data = self.sock.recv(bufsize)
        if not data:
            raise ConnectionError(f"closed after {self.offset} body bytes")
        self._check(data)
        return len(data)

    def read_until(self, total: int) -> None:
        while self.offset < total:
            self.read(min(MB, total - self.offset))


# -- 100 MB transfers -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_100mb_upload_is_streamed_with_bounded_memory(gw: GatewayProcess, chunked: bool) -> None:
    with RssSampler(gw) as rss:
        seen, sha = _upload(gw.port, chunked)
    assert seen["body_len"] == BIG
    assert seen["body_sha256"] == sha
    headers = {n.lower(): v for n, v in seen["headers"]}
    if chunked:
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    else:
        assert headers["content-length"] == str(BIG) and "transfer-encoding" not in headers
    _check_rss("upload-chunked" if chunked else "upload-length", rss)
    assert gw.alive()


@pytest.mark.slow
def test_100mb_download_is_streamed_with_bounded_memory(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s, RssSampler(gw) as rss:
        s.sendall(b"GET /download?size=%d HTTP/1.1\r\nhost: t\r\n\r\n" % BIG)
        head, rest = _read_head(s)
        assert _status(head) == 200
        assert _headers(head)["content-length"] == str(BIG)
        reader = PatternReader(s, rest)
        reader.read_until(BIG)
        assert reader.offset == BIG
    _check_rss("download", rss)


@pytest.mark.slow
def test_100mb_download_to_a_slow_reader_pauses_the_upstream(gw: GatewayProcess) -> None:
    """The client reads a trickle for a while: without backpressure the gateway would pull the
    whole body from the (fast) upstream into memory meanwhile."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s, RssSampler(gw) as rss:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /download?size=%d HTTP/1.1\r\nhost: t\r\n\r\n" % BIG)
        head, rest = _read_head(s)
        assert _status(head) == 200
        reader = PatternReader(s, rest)
        # The slow phase: ~1 MB in 4 KiB sips. Each sleep gives the gateway ample time to
        # read ahead if it were not paused (the upstream can send 100 MB in well under 1 s).
        while reader.offset < MB:
            reader.read(4096)
            time.sleep(0.002)
        slow_peak = rss.peak
        reader.read_until(BIG)
    print(f"slow phase: RSS peak +{slow_peak - rss.baseline} KiB")
    _check_rss("download-slow-reader", rss)


@pytest.mark.slow
def test_100mb_upload_to_a_slow_upstream_pauses_the_client(
    gw: GatewayProcess, scripted: ScriptedUpstream
) -> None:
    """The upstream reads a trickle at first: the gateway must stop reading the client rather
    than hold what the client sends meanwhile."""
    sent = hashlib.sha256()
    failure: list[BaseException] = []

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", gw.port), timeout=30) as s:
                s.sendall(
                    b"POST /scripted/upload HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % BIG
                )
                for piece in _blocks(BIG):
                    sent.update(piece)
                    s.sendall(piece)
                head, _ = _read_head(s)
                assert _status(head) == 200, head
        except BaseException as exc:
            failure.append(exc)

    with RssSampler(gw) as rss:
        sender = threading.Thread(target=client)
        sender.start()
        up, head, rest = scripted.accept()
        with up:
            assert _headers(head)["content-length"] == str(BIG)
            got = hashlib.sha256(rest)
            received = len(rest)
            # The slow phase: ~2 MB in 8 KiB sips, while the client pushes as fast as it can.
            while received < 2 * MB:
                data = up.recv(8192)
                assert data, "the gateway closed the upstream connection mid-body"
                got.update(data)
                received += len(data)
                time.sleep(0.002)
            while received < BIG:
                data = up.recv(MB)
                assert data, "the gateway closed the upstream connection mid-body"
                got.update(data)
                received += len(data)
            up.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        sender.join(30)
    assert not failure, failure
    assert received == BIG
    assert got.hexdigest() == sent.hexdigest()
    _check_rss("upload-slow-upstream", rss)


# -- streamed responses are not buffered ------------------------------------------------------
_FIRST, _LAST = b"data: first\n\n", b"data: last\n\n"


def _recv_until(sock: socket.socket, buf: bytearray, marker: bytes) -> None:
    while marker not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}; got {bytes(buf)!r}")
        buf += data


def _recv_all(sock: socket.socket, buf: bytearray) -> bytes:
    while data := sock.recv(65536):
        buf += data
    return bytes(buf)


def _read_length_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes]:
    """One Content-Length response from ``sock``, consuming it from the front of ``buf``."""
    _recv_until(sock, buf, b"\r\n\r\n")
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    del buf[: len(head) + 4]
    length = int(_headers(head)["content-length"])
    while len(buf) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        buf += data
    body = bytes(buf[:length])
    del buf[:length]
    return _status(head), body


@pytest.mark.parametrize("framing", ["chunked", "content-length", "close-delimited"])
def test_response_pieces_reach_the_client_before_the_upstream_sends_the_rest(
    gw: GatewayProcess, scripted: ScriptedUpstream, framing: str
) -> None:
    heads = {
        "chunked": b"transfer-encoding: chunked\r\n",
        "content-length": b"content-length: %d\r\n" % (len(_FIRST) + len(_LAST)),
        "close-delimited": b"",
    }

    def frame(piece: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece

    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as client:
        client.sendall(b"GET /scripted/events HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        up, head, _ = scripted.accept()
        with up:
            assert head.startswith(b"GET /scripted/events HTTP/1.1\r\n")
            up.sendall(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                + heads[framing]
                + b"connection: close\r\n\r\n"
                + frame(_FIRST)
            )
            got = bytearray()
            # The upstream (this thread) has written only the first event: the client can
            # only see it if the gateway forwarded it without waiting for more.
            _recv_until(client, got, _FIRST)
            assert _LAST not in got
            up.sendall(frame(_LAST) + (b"0\r\n\r\n" if framing == "chunked" else b""))
        (resp,) = parse_responses(_recv_all(client, got))
    assert resp.status == 200
    assert resp.body == _FIRST + _LAST
    assert resp.header("content-type") == "text/event-stream"
    if framing == "content-length":
        assert resp.header("content-length") == str(len(_FIRST) + len(_LAST))
    else:  # an unframed body is re-framed chunked for a keep-alive HTTP/1.1 client
        assert resp.header("transfer-encoding") == "chunked"


def test_sse_events_arrive_one_by_one(gw: GatewayProcess) -> None:
    """Against the test upstream's slow /sse: when the first event arrives, the response is
    still incomplete (later events and the terminating chunk come after it)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(b"GET /sse?events=3&delay=0.4 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        got = bytearray()
        _recv_until(s, got, b"data: event 0\n\n")
        assert b"data: event 2" not in got and not got.endswith(b"0\r\n\r\n")
        (resp,) = parse_responses(_recv_all(s, got))
    assert resp.body == b"".join(b"data: event %d\n\n" % i for i in range(3))
    assert resp.header("transfer-encoding") == "chunked"


# -- Expect: 100-continue ---------------------------------------------------------------------
def _expect_head(path: str, length: int) -> bytes:
    return b"POST %s HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\nexpect: 100-continue\r\n\r\n" % (
        path.encode(),
        length,
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_expect_100_continue_then_body(gw: GatewayProcess, chunked: bool) -> None:
    body = b"e" * 200_000
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % len(body)
    with Conn(gw.port) as c:
        for _ in range(2):  # a fresh upstream connection, then a pooled one
            c.send(
                b"POST /echo/expect HTTP/1.1\r\nhost: t\r\n%s\r\n"
                b"expect: 100-continue\r\n\r\n" % framing
            )
            interim = bytearray()
            _recv_until(c.sock, interim, b"\r\n\r\n")
            assert bytes(interim) == b"HTTP/1.1 100 Continue\r\n\r\n"
            c.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
            buf = bytearray()
            _recv_until(c.sock, buf, b"\r\n\r\n")
            head, _, rest = bytes(buf).partition(b"\r\n\r\n")
            assert _status(head) == 200
            seen = _read_body_json(c.sock, head, rest)
            assert seen["body_len"] == len(body)
            assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
            names = [n.lower() for n, _ in seen["headers"]]
            assert "expect" not in names


def test_expect_without_a_body_gets_no_100(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        for _ in range(2):
            resp = c.request(
                "POST", "/echo/empty", headers=[("content-length", "0"), ("expect", "100-continue")]
            )
            assert resp.status == 200 and resp.interim == []


@pytest.mark.parametrize(
    ("path", "length", "status"),
    [
        ("/nowhere", 1000, 404),  # no route
        ("/small/echo", 2 * MB, 413),  # Content-Length over the route's limit
    ],
)
def test_expect_rejected_before_the_body_gets_no_100_and_closes(
    gw: GatewayProcess, upstream: UpstreamProcess, path: str, length: int, status: int
) -> None:
    upstream.reset()
    with Conn(gw.port) as c:
        c.send(_expect_head(path, length))
        buf = bytearray()
        _recv_until(c.sock, buf, b"\r\n\r\n")
        assert buf.startswith(b"HTTP/1.1 %d " % status), bytes(buf)
        assert b" 100 " not in buf
        head = bytes(buf).partition(b"\r\n\r\n")[0]
        assert _headers(head).get("connection") == "close"
        assert c.closed_by_peer()
    assert upstream.received() == []


# -- early responses with an unread body ------------------------------------------------------
def test_early_response_with_small_unread_body_keeps_the_connection(gw: GatewayProcess) -> None:
    body = b"u" * 3000
    with Conn(gw.port) as c:
        c.h11.send(
            h11.Request(
                method="POST",
                target="/nowhere",
                headers=[("host", "t"), ("content-length", str(len(body)))],
            )
        )
        c.send(b"POST /nowhere HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(body))
        resp = c.read_response("POST")  # answered before the body was sent
        assert resp.status == 404
        assert resp.header("connection") is None
        c.h11.send(h11.Data(data=body))
        c.h11.send(h11.EndOfMessage())
        c.h11.start_next_cycle()
        c.send(body)  # read and discarded by the gateway
        again = c.request("GET", "/echo/after")
        assert again.status == 200 and again.json()["target"] == "/echo/after"


def test_early_response_with_large_unread_body_closes(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        c.send(b"POST /nowhere HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % (50 * MB))
        c.send(b"u" * 100_000)
        buf = bytearray()
        _recv_until(c.sock, buf, b"\r\n\r\n")
        head = bytes(buf).partition(b"\r\n\r\n")[0]
        assert _status(head) == 404
        assert _headers(head).get("connection") == "close"
        assert c.closed_by_peer()


def test_upstream_early_response_with_large_unread_body_closes(
    gw: GatewayProcess, scripted: ScriptedUpstream
) -> None:
    """The upstream answers without reading a large body: the client gets that answer, and
    then the connection ends rather than the gateway reading 50 MB to throw away."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(
            b"POST /scripted/early HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % (50 * MB)
            + b"x" * 100_000
        )
        up, head, _ = scripted.accept()
        with up:
            assert head.startswith(b"POST /scripted/early ")
            up.sendall(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\nconnection: close\r\n\r\nno"
            )
        buf = bytearray()
        status, body = _read_length_response(s, buf)
        assert (status, body) == (403, b"no")
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except ConnectionResetError:
            pass


def test_pipelined_early_response_with_buffered_body_keeps_the_connection(
    gw: GatewayProcess,
) -> None:
    """A request queued behind a slow one has its body buffered (reading pauses past the
    watermark); answered early with the rest of its body unread, the connection must resume
    reading, discard that rest and serve the next request."""
    length = 100_000
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
        s.sendall(
            b"GET /stream?chunks=2&size=10&delay=0.3 HTTP/1.1\r\nhost: t\r\n\r\n"
            b"POST /nowhere HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n"
            % length
            + b"p" * 80_000
        )
        buf = bytearray()
        status, body = _read_length_response(s, buf)
        assert status == 200 and body == b"s" * 20
        status, _ = _read_length_response(s, buf)
        assert status == 404
        s.sendall(b"p" * (length - 80_000) + b"GET /echo/after HTTP/1.1\r\nhost: t\r\n\r\n")
        status, body = _read_length_response(s, buf)
        assert status == 200 and json.loads(body)["target"] == "/echo/after"


# -- the upstream read timer while the body is still being sent --------------------------------
def _timeouts_gateway(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamProcess
) -> GatewayProcess:
    cfg = proxy_config(
        upstream.url, limits={"max_body_size": "200m"}, upstream_extra={"timeouts": {"read": "1s"}}
    )
    return start_gateway(cfg)


def test_slow_upload_is_not_cut_by_the_upstream_read_timeout(
    start_gateway: Callable[..., GatewayProcess], upstream: UpstreamProcess
) -> None:
    """The upstream's read timeout counts its silence once it has the request; while the
    client is still sending (slower than the timeout overall), the exchange is progressing."""
    g = _timeouts_gateway(start_gateway, upstream)
    piece = b"w" * 10_000
    pieces = 25
    with socket.create_connection(("127.0.0.1", g.port), timeout=15) as s:
        s.sendall(
            b"POST /echo/slow HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n"
            % (len(piece) * pieces)
        )
        for _ in range(pieces):  # at least 2.5 s in all, more than twice the read timeout
            s.sendall(piece)
            time.sleep(0.1)
        head, rest = _read_head(s)
        assert _status(head) == 200, head
        assert _read_body_json(s, head, rest)["body_len"] == len(piece) * pieces
