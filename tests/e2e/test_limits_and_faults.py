"""Limits and faults end to end: oversized requests, slow clients, connection caps, and
upstreams that refuse, time out, reset, stall or speak bad HTTP.

Every gateway-made error is checked for the JSON shape of DESIGN section 2 and for
``x-request-id``; after every case the gateway process must still be alive. Timeouts are
configured short (about a second) so the cases are quick, but no test asserts how long
anything took: they only wait, with a generous bound, for the outcome.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import h11
import pytest

from tests.conftest import proxy_config
from tests.support.client import (
    Conn,
    Response,
    parse_responses,
    read_until_close,
    request,
    send_and_read,
)
from tests.support.procs import GatewayProcess, UpstreamProcess, free_port

MAX_BODY = 1000
CUTS = {
    "/probe/cut-chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    "/probe/cut-close": b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello",
}


class ProbeUpstream:
    """A raw-socket upstream that reports what happened on each connection, so a test can
    see the gateway give up an exchange (EOF or reset on the upstream side).

    ``GET /probe/stall``: reads the request, never answers. ``GET /probe/slow-body``: sends a
    head promising 1 MB and 10 bytes of it. ``POST /probe/upload``: reads the body.
    Each connection reports ``("request", target)`` once the head is read and then
    ``("closed", body_bytes_read)`` when the gateway closes it, or ``("open", n)`` if it
    did not within the wait. ``GET /probe/cut-chunked`` and ``/probe/cut-close`` send part
    of a chunked or close-delimited body, then reset the connection.
    """

    def __init__(self, wait: float = 8.0) -> None:
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.wait = wait
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(self.wait)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    head += chunk
            except OSError:
                return
            head, _, body = head.partition(b"\r\n\r\n")
            target = head.split(b" ")[1].decode()
            self.events.put(("request", target))
            read = len(body)
            if target in CUTS:
                sock.sendall(CUTS[target])
                time.sleep(0.05)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if target == "/probe/slow-body":
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n" + b"b" * 10)
            deadline = time.monotonic() + self.wait
            try:
                while time.monotonic() < deadline:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    read += len(chunk)
                else:
                    self.events.put(("open", read))
                    return
            except TimeoutError:
                self.events.put(("open", read))
                return
            except ConnectionResetError:
                pass
            self.events.put(("closed", read))

    def next_event(self, timeout: float = 10.0) -> tuple[str, Any]:
        return self.events.get(timeout=timeout)

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture(scope="module")
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: a connect to it hangs (SYNs dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


@pytest.fixture(scope="module")
def probe() -> Iterator[ProbeUpstream]:
    p = ProbeUpstream()
    yield p
    p.close()


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess,
    blackhole: int,
    probe: ProbeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    fast = {"connect": "1s", "read": "1s"}
    config = {
        "upstreams": {
            "backend": {"targets": [{"url": upstream.url}], "timeouts": fast},
            "refused": {"targets": [{"url": f"http://127.0.0.1:{free_port()}"}]},
            "blackhole": {
                "targets": [{"url": f"http://127.0.0.1:{blackhole}"}],
                "timeouts": {"connect": "0.5s", "read": "1s"},
            },
        },
        "routes": [
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "backend"},
            {
                "name": "small",
                "match": {"path_prefix": "/small"},
                "upstream": "backend",
                "max_body_size": 100,
            },
            {
                "name": "big",
                "match": {"path_prefix": "/big"},
                "upstream": "backend",
                "max_body_size": 100_000,
            },
            {"name": "refused", "match": {"path_prefix": "/refused"}, "upstream": "refused"},
            {"name": "blackhole", "match": {"path_prefix": "/blackhole"}, "upstream": "blackhole"},
        ],
        "limits": {
            "max_url_bytes": 512,
            "max_header_bytes": 2048,
            "max_header_count": 20,
            "max_body_size": MAX_BODY,
            "header_timeout": "1s",
            "body_timeout": "1s",
            "idle_timeout": "1s",
            "send_timeout": "1s",
        },
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("gw"))
    yield g
    g.stop()


@pytest.fixture(scope="module")
def probe_gw(
    upstream: UpstreamProcess, probe: ProbeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Long timeouts, so that only the client going away can end the probe's exchanges."""
    config = {
        "upstreams": {
            "backend": {"targets": [{"url": upstream.url}]},
            "probe": {"targets": [{"url": probe.url}], "timeouts": {"read": "60s"}},
        },
        "routes": [
            {"name": "all", "match": {"path_prefix": "/"}, "upstream": "backend"},
            {
                "name": "probe",
                "match": {"path_prefix": "/probe"},
                "upstream": "probe",
                "max_body_size": 100_000_000,
            },
        ],
        "limits": {
            "header_timeout": "60s",
            "body_timeout": "60s",
            "idle_timeout": "60s",
            "send_timeout": "60s",
        },
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("probe-gw"))
    yield g
    g.stop()


@pytest.fixture(autouse=True)
def _gateway_survives(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("gw", "probe_gw"):
        if name in request.fixturenames:
            g: GatewayProcess = request.getfixturevalue(name)
            assert g.alive(), g.logs()[-3000:]
            assert request_ok(g)


def request_ok(g: GatewayProcess) -> bool:
    return request(g.port, "GET", "/echo/still-serving").status == 200


def send_raw(port: int, data: bytes, timeout: float = 8.0) -> tuple[bytes, bool]:
    return send_and_read(port, data, timeout)


def assert_error(resp: Response, status: int, code: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    err = resp.json()["error"]
    assert err["status"] == status and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in resp.body.decode()
    rid = resp.header("x-request-id")
    assert rid and err["request_id"] == rid


def assert_refused(
    g: GatewayProcess, upstream: UpstreamProcess | None, raw: bytes, status: int, code: str
) -> Response:
    """``raw`` is answered with ``status``/``code``, the connection closed, nothing
    forwarded."""
    if upstream is not None:
        upstream.reset()
    data, closed = send_raw(g.port, raw)
    (resp,) = parse_responses(data)
    assert_error(resp, status, code)
    assert resp.header("connection") == "close"
    assert closed
    if upstream is not None:
        assert upstream.received() == []
    return resp


# -- request size limits --------------------------------------------------------------------


def test_url_too_long_gets_414(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    assert request(gw.port, "GET", "/echo/" + "a" * 400).status == 200
    assert_refused(
        gw, upstream, b"GET /%s HTTP/1.1\r\nHost: t\r\n\r\n" % (b"a" * 600), 414, "uri_too_long"
    )


def test_url_too_long_in_many_segments_gets_414(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    """The URL arrives in several reads: the limit holds on the sum, not on each piece."""
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"GET /")
        for _ in range(6):
            time.sleep(0.02)
            s.sendall(b"b" * 100)
        s.sendall(b" HTTP/1.1\r\nHost: t\r\n\r\n")
        data, closed = read_until_close(s)
    (resp,) = parse_responses(data)
    assert_error(resp, 414, "uri_too_long")
    assert closed and upstream.received() == []


def test_header_bytes_over_limit_get_431(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    assert request(gw.port, "GET", "/echo", headers=[("X-Ok", "v" * 1000)]).status == 200
    assert_refused(
        gw,
        upstream,
        b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n" % (b"v" * 3000),
        431,
        "header_fields_too_large",
    )
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 150) for i in range(15))
    assert_refused(
        gw, upstream, b"GET / HTTP/1.1\r\nHost: t\r\n%s\r\n" % many, 431, "header_fields_too_large"
    )


def test_header_count_over_limit_gets_431(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    ok = [(f"X-H{i}", "1") for i in range(15)]
    assert request(gw.port, "GET", "/echo", headers=ok).status == 200
    many = b"".join(b"X-H%d: 1\r\n" % i for i in range(25))
    assert_refused(
        gw, upstream, b"GET / HTTP/1.1\r\nHost: t\r\n%s\r\n" % many, 431, "header_fields_too_large"
    )


def test_trailer_fields_count_against_the_header_limits(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(30))
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n%s\r\n" % trailers
    )
    upstream.reset()
    data, closed = send_raw(gw.port, raw)
    (resp,) = parse_responses(data)
    assert_error(resp, 431, "header_fields_too_large")
    assert closed and upstream.received() == []


def test_content_length_over_limit_is_refused_before_the_body(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        # No body is sent: the 413 must come from the announced length alone.
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
        data, closed = read_until_close(s)
    (resp,) = parse_responses(data)
    assert_error(resp, 413, "payload_too_large")
    assert closed and upstream.received() == []


def test_content_length_over_limit_with_expect_gets_no_100(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        data, closed = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 413 ")
    (resp,) = parse_responses(data)
    assert_error(resp, 413, "payload_too_large")
    assert closed and upstream.received() == []


def test_body_at_the_limit_passes(gw: GatewayProcess) -> None:
    resp = request(gw.port, "POST", "/echo", body=b"x" * MAX_BODY)
    assert resp.status == 200 and resp.json()["body_len"] == MAX_BODY


def test_chunked_body_growing_past_the_limit_gets_413(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"258\r\n" + b"c" * 600 + b"\r\n")
        time.sleep(0.05)  # the first chunk is within the limit and may be on its way
        s.sendall(b"258\r\n" + b"c" * 600 + b"\r\n")
        data, closed = read_until_close(s)
    (resp,) = parse_responses(data)
    assert_error(resp, 413, "payload_too_large")
    assert closed and upstream.received() == []


def test_route_max_body_size_overrides_the_global_limit(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    assert request(gw.port, "POST", "/small/x", body=b"s" * 100).status == 200
    assert_refused(
        gw,
        upstream,
        b"POST /small/x HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n" + b"s" * 101,
        413,
        "payload_too_large",
    )
    assert request(gw.port, "POST", "/other", body=b"o" * 101).status == 200
    big = request(gw.port, "POST", "/big/x", body=b"b" * 50_000)
    assert big.status == 200 and big.json()["body_len"] == 50_000


# -- slow and idle clients ------------------------------------------------------------------


def test_partial_head_gets_408(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Slow: 1\r\n")
        data, closed = read_until_close(s)
    (resp,) = parse_responses(data)
    assert_error(resp, 408, "request_timeout")
    assert closed and upstream.received() == []


def test_slowloris_trickle_does_not_extend_the_header_timeout(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: t\r\n")
        s.settimeout(0.2)
        data = b""
        for i in range(40):  # a header line every 0.2 s, for at most 8 s
            try:
                s.sendall(b"X-Drip-%d: 1\r\n" % (i % 10))
                data = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if data:
                break
        rest, closed = read_until_close(s)
    (resp,) = parse_responses(data + rest)
    assert_error(resp, 408, "request_timeout")
    assert closed and upstream.received() == []


def test_silent_connection_is_closed(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        data, closed = read_until_close(s)
    assert closed and data == b""


def test_partial_body_gets_408(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    upstream.reset()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"p" * 10)
        data, closed = read_until_close(s)
    (resp,) = parse_responses(data)
    assert_error(resp, 408, "body_timeout")
    assert closed and upstream.received() == []


def test_idle_keep_alive_connection_is_closed(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        resp = c.request("GET", "/echo")
        assert resp.status == 200 and resp.header("connection") is None
        assert c.closed_by_peer(timeout=8)


def test_client_that_stops_reading_is_dropped(gw: GatewayProcess) -> None:
    """A client that never reads a large response is cut off after ``send_timeout``."""
    size = 256 * 1024 * 1024
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(8)
        s.connect(("127.0.0.1", gw.port))
        s.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
        time.sleep(3)  # send_timeout is 1 s; the sweep runs twice a second
        total = 0
        closed = False
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(1024 * 1024)
                if not chunk:
                    closed = True
                    break
                total += len(chunk)
        except ConnectionResetError:
            closed = True
    assert closed and total < size


# -- the connection cap ---------------------------------------------------------------------


def test_max_connections(upstream: UpstreamProcess, start_gateway: Any) -> None:
    g: GatewayProcess = start_gateway(proxy_config(upstream.url, limits={"max_connections": 2}))
    with Conn(g.port) as a, Conn(g.port) as b:
        assert a.request("GET", "/echo").status == 200
        assert b.request("GET", "/echo").status == 200
        data, closed = send_raw(g.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        (resp,) = parse_responses(data)
        assert_error(resp, 503, "too_many_connections")
        assert closed
        assert a.request("GET", "/echo").status == 200  # the held ones keep working
    deadline = time.monotonic() + 8
    while True:  # a slot frees once the gateway has seen the close
        data, _ = send_raw(g.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        (resp,) = parse_responses(data)
        if resp.status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert resp.status == 200
    assert g.alive()


# -- upstream faults ------------------------------------------------------------------------


def test_upstream_connection_refused_gets_502(gw: GatewayProcess) -> None:
    for _ in range(2):
        resp = request(gw.port, "GET", "/refused")
        assert_error(resp, 502, "upstream_connect_failed")


def test_upstream_connect_timeout_gets_504(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/blackhole")
    assert_error(resp, 504, "upstream_connect_timeout")


def test_upstream_read_timeout_gets_504(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/stall")
    assert_error(resp, 504, "upstream_timeout")


def test_upstream_reset_before_response_gets_502(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        assert c.request("GET", "/echo").status == 200  # a pooled connection gets reused
        assert_error(c.request("GET", "/reset"), 502, "upstream_reset")


def test_upstream_invalid_http_gets_502(gw: GatewayProcess) -> None:
    assert_error(request(gw.port, "GET", "/bad"), 502, "upstream_bad_response")


def test_error_statuses_from_the_upstream_pass_through(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/status/503")
    assert resp.status == 503 and resp.body == b"status 503\n"


def _assert_cut_short(data: bytes, closed: bool) -> None:
    """A response that started must end visibly incomplete: fewer bytes than its
    Content-Length, and a strict parser must not accept it as complete."""
    assert closed
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 ")
    lengths = [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")[1:]
        if line.lower().startswith(b"content-length:")
    ]
    assert len(lengths) == 1 and len(body) < int(lengths[0])
    with pytest.raises((ConnectionError, h11.RemoteProtocolError)):
        parse_responses(data)


def test_upstream_reset_mid_body_cuts_the_client_connection(gw: GatewayProcess) -> None:
    data, closed = send_raw(gw.port, b"GET /reset-mid?size=50000 HTTP/1.1\r\nHost: t\r\n\r\n")
    _assert_cut_short(data, closed)


def test_upstream_stall_mid_body_cuts_the_client_connection(gw: GatewayProcess) -> None:
    data, closed = send_raw(gw.port, b"GET /stall-mid HTTP/1.1\r\nHost: t\r\n\r\n")
    _assert_cut_short(data, closed)


@pytest.mark.parametrize("path", list(CUTS))
def test_chunked_response_cut_short_has_no_final_chunk(probe_gw: GatewayProcess, path: str) -> None:
    """A chunked or close-delimited upstream body cut by a reset reaches the client as a
    chunked body without the terminating zero chunk, and the connection closes."""
    data, closed = send_raw(probe_gw.port, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    assert closed
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    assert body.startswith(b"5\r\nhello\r\n")
    assert b"0\r\n\r\n" not in body
    with pytest.raises((ConnectionError, h11.RemoteProtocolError)):
        parse_responses(data)


# -- clients that go away -------------------------------------------------------------------


def _drain_events(probe: ProbeUpstream) -> None:
    while True:
        try:
            probe.events.get_nowait()
        except queue.Empty:
            return


def test_client_gone_while_upstream_thinks_cancels_the_exchange(
    probe_gw: GatewayProcess, probe: ProbeUpstream
) -> None:
    _drain_events(probe)
    with socket.create_connection(("127.0.0.1", probe_gw.port), timeout=8) as s:
        s.sendall(b"GET /probe/stall HTTP/1.1\r\nHost: t\r\n\r\n")
        assert probe.next_event() == ("request", "/probe/stall")
    assert probe.next_event()[0] == "closed"


def test_client_gone_mid_response_cancels_the_exchange(
    probe_gw: GatewayProcess, probe: ProbeUpstream
) -> None:
    _drain_events(probe)
    with socket.create_connection(("127.0.0.1", probe_gw.port), timeout=8) as s:
        s.sendall(b"GET /probe/slow-body HTTP/1.1\r\nHost: t\r\n\r\n")
        assert probe.next_event() == ("request", "/probe/slow-body")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert probe.next_event()[0] == "closed"


def test_client_gone_mid_upload_cancels_the_exchange(
    probe_gw: GatewayProcess, probe: ProbeUpstream
) -> None:
    _drain_events(probe)
    size = 50_000_000
    with socket.create_connection(("127.0.0.1", probe_gw.port), timeout=8) as s:
        s.sendall(b"POST /probe/upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        s.sendall(b"u" * 300_000)
        assert probe.next_event() == ("request", "/probe/upload")
    event = probe.next_event()
    assert event[0] == "closed" and event[1] < size


def test_many_aborted_clients_leave_the_gateway_serving(probe_gw: GatewayProcess) -> None:
    for path in (b"/stream?chunks=20&size=1000&delay=0.01", b"/echo", b"/download?size=1000000"):
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", probe_gw.port), timeout=8) as s:
                s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    for _ in range(5):
        assert request_ok(probe_gw)
