"""Test clients over raw sockets. Responses are parsed with h11, the reference parser, so a
response the gateway frames wrongly fails the test instead of being read leniently."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str = "1.1"
    interim: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One client connection; requests are sent raw, responses parsed with h11."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.h11 = h11.Connection(h11.CLIENT)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        host: str = "test.local",
    ) -> Response:
        hdrs = [("host", host), *(headers or [])]
        if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in hdrs):
            hdrs.append(("content-length", str(len(body))))
        self.h11.send(h11.Request(method=method, target=target, headers=hdrs))
        head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in hdrs)
        self.sock.sendall(head.encode("latin-1") + b"\r\n" + body)
        if body:
            self.h11.send(h11.Data(data=body))
        self.h11.send(h11.EndOfMessage())
        return self.read_response(method)

    def read_response(self, method: str = "GET") -> Response:
        conn = self.h11
        resp = _next_response(
            conn, lambda: self.sock.recv(1024 * 1024), "connection closed before a response"
        )
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return resp

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _next_response(conn: h11.Connection, more: Callable[[], bytes], closed: str) -> Response:
    """Read one response from ``conn``, calling ``more()`` for bytes when h11 needs them."""
    status, headers, version = 0, [], "1.1"
    interim: list[int] = []
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(more())
            continue
        if isinstance(event, h11.InformationalResponse):
            interim.append(event.status_code)
        elif isinstance(event, h11.Response):
            status = event.status_code
            version = event.http_version.decode()
            headers = [(n.decode().lower(), v.decode("latin-1")) for n, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Response(status, headers, bytes(body), version, interim)
        elif isinstance(event, h11.ConnectionClosed):
            raise ConnectionError(closed)


def request(
    port: int,
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    host: str = "test.local",
    timeout: float = 10.0,
) -> Response:
    with Conn(port, timeout) as c:
        return c.request(method, target, headers, body, host)


def read_until_close(sock: socket.socket, timeout: float = 8.0) -> tuple[bytes, bool]:
    """Everything the peer sends, and whether it closed (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(out), True
            out += chunk
    except ConnectionResetError:
        return bytes(out), True
    except TimeoutError:
        pass
    return bytes(out), False


def send_and_read(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the peer closed within ``timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_until_close(s, timeout)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; return everything received until the peer closes (or ``timeout``)."""
    return send_and_read(port, data, timeout)[0]


def parse_responses(data: bytes, methods: list[str] | None = None) -> list[Response]:
    """Every response in ``data``, parsed with h11; fails on bad framing."""
    out: list[Response] = []
    rest = data
    methods = list(methods or [])
    while rest:
        conn = h11.Connection(h11.CLIENT)
        method = methods.pop(0) if methods else "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(rest)
        out.append(_next_response(conn, lambda: b"", "truncated response"))
        rest = conn.trailing_data[0]
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            break
    return out
