"""SIGTERM: stop accepting, close idle connections, finish in-flight exchanges, exit 0."""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Callable

from tests.conftest import proxy_config
from tests.support.client import Conn
from tests.support.procs import GatewayProcess, UpstreamProcess


def test_sigterm_finishes_in_flight_requests_and_exits_zero(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(proxy_config(upstream.url))
    idle = Conn(g.port)
    assert idle.request("GET", "/echo").status == 200  # now an idle keep-alive connection

    busy = Conn(g.port)
    # 20 pieces 0.1 s apart: the response is still streaming when SIGTERM arrives.
    busy.send(b"GET /stream?chunks=20&size=100&delay=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
    first = busy.sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200 ")

    result: dict[str, object] = {}

    def finish() -> None:
        rest = bytearray(first)
        busy.sock.settimeout(15)
        while chunk := busy.sock.recv(65536):
            rest += chunk
        result["data"] = bytes(rest)
        result["eof"] = True  # the gateway closed the connection after the response

    reader = threading.Thread(target=finish)
    reader.start()
    g.proc.send_signal(signal.SIGTERM)

    assert idle.closed_by_peer()  # idle keep-alive connections are closed at once
    reader.join(20)
    data = result["data"]
    assert isinstance(data, bytes)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-length: 2000" in head.lower()
    assert body == b"s" * 2000  # the in-flight response completed
    assert result.get("eof") is True  # ... and then its connection was closed
    assert g.proc.wait(20) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", g.port)) != 0  # no longer accepting
    idle.close()
    busy.close()
