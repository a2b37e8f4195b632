"""Plain proxying end to end: framing both ways, headers, keep-alive, pipelining, HTTP/1.0."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.speedups import NO_SPEEDUPS_ENV
from tests.conftest import proxy_config
from tests.support.client import Conn, parse_responses, raw_exchange, request
from tests.support.procs import GatewayProcess, UpstreamProcess


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    g = GatewayProcess(proxy_config(upstream.url), tmp_path_factory.mktemp("gw"))
    yield g
    g.stop()


def test_get_is_proxied_with_forwarding_headers(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/echo/a?b=1", host="api.example.com:8080")
    assert resp.status == 200
    seen = resp.json()
    assert seen["method"] == "GET"
    assert seen["target"] == "/echo/a?b=1"
    headers = {n.lower(): v for n, v in seen["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "api.example.com:8080"
    assert headers["via"] == "1.1 gateway"
    # Host is the target's by default (preserve_host: false)
    assert headers["host"].startswith("127.0.0.1:")
    rid = resp.header("x-request-id")
    assert rid and headers["x-request-id"] == rid
    assert resp.header("via") == "1.1 gateway"
    assert resp.header("date")


def test_request_id_is_propagated_when_valid_and_replaced_when_not(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/echo", headers=[("X-Request-Id", "abc-123")])
    assert resp.header("x-request-id") == "abc-123"
    assert ["x-request-id", "abc-123"] in [[n.lower(), v] for n, v in resp.json()["headers"]]
    bad = request(gw.port, "GET", "/echo", headers=[("X-Request-Id", "has spaces <script>")])
    rid = bad.header("x-request-id")
    assert rid and rid != "has spaces <script>"
    sent = [v for n, v in bad.json()["headers"] if n.lower() == "x-request-id"]
    assert sent == [rid]


def test_spoofed_forwarding_headers_from_untrusted_peer_are_replaced(gw: GatewayProcess) -> None:
    resp = request(
        gw.port,
        "GET",
        "/echo",
        headers=[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
        ],
    )
    headers = {n.lower(): v for n, v in resp.json()["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "test.local"


def test_hop_by_hop_request_headers_are_dropped(gw: GatewayProcess) -> None:
    resp = request(
        gw.port,
        "GET",
        "/echo",
        headers=[
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Keep-Alive", "300"),
            ("TE", "trailers"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Upgrade-Insecure-Requests", "1"),
            ("X-Custom", "Kept"),
        ],
    )
    names = [n.lower() for n, _ in resp.json()["headers"]]
    for dropped in ("connection", "x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert dropped not in names
    assert "x-custom" in names and "upgrade-insecure-requests" in names


def test_header_order_and_case_are_preserved(gw: GatewayProcess) -> None:
    resp = request(
        gw.port, "GET", "/echo", headers=[("X-First", "1"), ("x-SECOND", "2"), ("X-Third", "3")]
    )
    names = [n for n, _ in resp.json()["headers"]]
    assert names.index("X-First") < names.index("x-SECOND") < names.index("X-Third")


def test_hop_by_hop_response_headers_are_dropped(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/hop")
    assert resp.status == 200 and resp.body == b"hop test"
    assert resp.header("x-private") is None
    assert resp.header("keep-alive") is None
    assert resp.header("proxy-authenticate") is None
    assert resp.header("x-kept") == "yes"
    assert resp.header("via") == "1.1 upstream-proxy, 1.1 gateway"


def test_upstream_response_headers_are_copied_once_in_order(gw: GatewayProcess) -> None:
    # The upstream's own Date and request id stand (the gateway adds neither); its other
    # fields keep their order and repeats; framing and Connection are the gateway's.
    with Conn(gw.port) as c:
        c.send(b"GET /own-headers HTTP/1.1\r\nHost: t\r\n\r\n")
        resp = c.read_response()
    assert resp.status == 200 and resp.body == b"own headers"
    names = [n.lower() for n, _ in resp.headers]
    assert resp.header_all("date") == ["Mon, 01 Jan 2024 00:00:00 GMT"]
    assert resp.header_all("x-request-id") == ["from-upstream"]
    assert resp.header_all("x-plain") == ["a", "b"]
    assert resp.header_all("content-length") == ["11"]
    assert "connection" not in names
    assert names.index("server") < names.index("date") < names.index("x-request-id")
    assert names.index("x-request-id") < names.index("x-plain")


def test_post_with_content_length_body(gw: GatewayProcess) -> None:
    body = b"x" * 100_000
    resp = request(gw.port, "POST", "/echo", body=body)
    seen = resp.json()
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_chunked_request_body_is_forwarded_chunked(gw: GatewayProcess) -> None:
    raw = (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    with Conn(gw.port) as c:
        c.send(raw)
        resp = c.read_response()
    seen = resp.json()
    assert seen["body"] == "hello world"
    headers = {n.lower(): v for n, v in seen["headers"]}
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers


def test_keep_alive_serves_many_requests_on_one_connection(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    with Conn(gw.port) as c:
        for i in range(20):
            resp = c.request("GET", f"/echo/{i}")
            assert resp.status == 200
            assert resp.json()["target"] == f"/echo/{i}"
            assert resp.header("connection") is None


def test_upstream_connections_are_reused(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    request(gw.port, "GET", "/echo/warm")
    upstream.reset()
    for _ in range(10):
        assert request(gw.port, "GET", "/echo").status == 200
    assert upstream.connections() <= 1


def test_pipelined_requests_are_answered_in_order(gw: GatewayProcess) -> None:
    reqs = (
        b"".join(b"GET /echo/%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(10))
        + b"GET /echo/last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    data = raw_exchange(gw.port, reqs)
    responses = parse_responses(data)
    assert [r.json()["target"] for r in responses] == [f"/echo/{i}" for i in range(10)] + [
        "/echo/last"
    ]


def test_pipelined_requests_with_bodies(gw: GatewayProcess) -> None:
    reqs = (
        b"".join(
            b"POST /echo/%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
            % (i, 1000 * i, b"b" * (1000 * i))
            for i in range(1, 6)
        )
        + b"GET /echo/end HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    responses = parse_responses(raw_exchange(gw.port, reqs))
    assert [r.json()["body_len"] for r in responses] == [1000, 2000, 3000, 4000, 5000, 0]


def test_connection_close_is_honoured(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        resp = c.request("GET", "/echo", headers=[("Connection", "close")])
        assert resp.status == 200
        assert resp.header("connection") == "close"
        assert c.closed_by_peer()


def test_http10_client(gw: GatewayProcess) -> None:
    data = raw_exchange(gw.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.0 200 ")
    (resp,) = parse_responses(data)
    assert resp.json()["method"] == "GET"


def test_http10_client_keep_alive(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        c.send(b"GET /echo/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += c.sock.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"connection: keep-alive" in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < length:
            body += c.sock.recv(65536)
        assert len(body) == length
        c.send(b"GET /echo/2 HTTP/1.0\r\n\r\n")
        rest = bytearray()
        while chunk := c.sock.recv(65536):  # without keep-alive, the gateway closes after it
            rest += chunk
        (second,) = parse_responses(bytes(rest))
        assert second.json()["target"] == "/echo/2"
        assert second.header("connection") == "close"


def test_http10_client_gets_chunked_upstream_body_close_delimited(gw: GatewayProcess) -> None:
    data = raw_exchange(gw.port, b"GET /chunked?chunks=3&size=4 HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert len(body) == 12


def test_head_response_has_no_body(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        resp = c.request("HEAD", "/head-length")
        assert resp.status == 200 and resp.body == b""
        assert resp.header("content-length") == "1234"
        again = c.request("GET", "/echo")
        assert again.status == 200


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses(gw: GatewayProcess, status: int) -> None:
    with Conn(gw.port) as c:
        resp = c.request("GET", f"/status/{status}")
        assert resp.status == status and resp.body == b""
        assert c.request("GET", "/echo").status == 200


def test_interim_responses_are_not_forwarded(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/interim")
    assert resp.status == 200 and resp.body == b"final answer"
    assert resp.interim == []


def test_chunked_response(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/chunked?chunks=5&size=7")
    assert resp.header("transfer-encoding") == "chunked"
    assert len(resp.body) == 35


def test_close_delimited_response_becomes_chunked(gw: GatewayProcess) -> None:
    with Conn(gw.port) as c:
        resp = c.request("GET", "/close-delimited?size=5000")
        assert resp.body == b"c" * 5000
        assert resp.header("transfer-encoding") == "chunked"
        assert c.request("GET", "/echo").status == 200


def test_http10_upstream_response(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/http10")
    assert resp.status == 200 and resp.body == b"old-style response"


def test_response_trailers_are_dropped_consistently(gw: GatewayProcess) -> None:
    data = raw_exchange(gw.port, b"GET /trailers HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    (resp,) = parse_responses(data)
    assert resp.body == b"hello world"
    assert b"x-checksum" not in data


def test_sse_stream_passes_through(gw: GatewayProcess) -> None:
    resp = request(gw.port, "GET", "/sse?events=3")
    assert resp.header("content-type") == "text/event-stream"
    assert resp.body.count(b"data: event") == 3


def test_unknown_route_gets_json_404(upstream: UpstreamProcess, start_gateway) -> None:  # type: ignore[no-untyped-def]
    cfg = proxy_config(upstream.url)
    cfg["routes"][0]["match"] = {"path_prefix": "/only"}
    g = start_gateway(cfg)
    resp = request(g.port, "GET", "/elsewhere")
    assert resp.status == 404
    err = resp.json()["error"]
    assert err["code"] == "no_route" and err["status"] == 404
    assert err["request_id"] == resp.header("x-request-id")
    assert resp.header("content-type") == "application/json"


def test_empty_query_is_forwarded_as_sent(gw: GatewayProcess) -> None:
    assert request(gw.port, "GET", "/echo/q?").json()["target"] == "/echo/q?"
    assert request(gw.port, "GET", "/echo/q").json()["target"] == "/echo/q"


def test_the_pure_python_fallback_proxies_the_same(
    gw: GatewayProcess, upstream: UpstreamProcess, tmp_path: Path
) -> None:
    # Without the compiled fast paths (no C compiler at install, or GATEWAY_NO_SPEEDUPS), the
    # same responses come out; /status tells which versions a worker runs.
    assert all(w["compiled"] is True for w in gw.admin("GET", "/status").json()["workers"])
    slow = GatewayProcess(proxy_config(upstream.url), tmp_path, extra_env={NO_SPEEDUPS_ENV: "1"})
    try:
        status = slow.admin("GET", "/status").json()
        assert [w["compiled"] for w in status["workers"]] == [False]
        test_hop_by_hop_response_headers_are_dropped(slow)
        test_upstream_response_headers_are_copied_once_in_order(slow)
        test_get_is_proxied_with_forwarding_headers(slow)
    finally:
        slow.stop()
