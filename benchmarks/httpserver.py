"""A small HTTP/1.1 server on httptools for the benchmark's stub upstreams.

A handler turns a ``Request`` into a ``Response``. A response either carries its body as
bytes (serialised once: the stub upstreams build their fixed responses at start, so serving
one is a single ``transport.write``) or streams chunks from an async iterator with chunked
transfer encoding (the fake LLM's SSE). Requests are answered in order; while a stream is
being written, reading pauses and pipelined requests wait in a queue.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import cast

import httptools

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, headers: dict[bytes, bytes], body: bytes, keep: bool
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # lower-case names
        self.body = body
        self.keep_alive = keep

    @property
    def path(self) -> bytes:
        return self.target.split(b"?", 1)[0]


class Response:
    """A response; with ``body`` the bytes for both connection modes are built here, once."""

    __slots__ = ("close_bytes", "head", "keep_bytes", "stream")

    def __init__(
        self,
        status: int = 200,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        body: bytes = b"",
        stream: Callable[[], AsyncIterator[bytes]] | None = None,
    ) -> None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))
        head = line + b"".join(b"%s: %s\r\n" % (k, v) for k, v in headers)
        self.stream = stream
        if stream is None:
            head += b"content-length: %d\r\n" % len(body)
            self.keep_bytes = head + b"\r\n" + body
            self.close_bytes = head + b"connection: close\r\n\r\n" + body
        else:
            head += b"transfer-encoding: chunked\r\n"
            self.keep_bytes = self.close_bytes = b""
        self.head = head


Handler = Callable[[Request], Response]

BAD_REQUEST = Response(400, ((b"content-type", b"text/plain"),), b"bad request\n")


class HttpServerProtocol(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.target = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.queue: deque[Request] = deque()
        self.streaming = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(BAD_REQUEST.close_bytes)
                self.transport.close()

    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = {}
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = Request(
            self.parser.get_method(),
            self.target,
            self.headers,
            b"".join(self.body),
            self.parser.should_keep_alive(),
        )
        if self.streaming:
            self.queue.append(request)
        else:
            self.respond(request)

    def respond(self, request: Request) -> None:
        transport = self.transport
        if transport is None:
            return
        response = self.handler(request)
        if response.stream is None:
            transport.write(response.keep_bytes if request.keep_alive else response.close_bytes)
            if not request.keep_alive:
                transport.close()
            return
        self.streaming = True
        transport.pause_reading()
        asyncio.get_running_loop().create_task(self.write_stream(request, response))

    async def write_stream(self, request: Request, response: Response) -> None:
        assert response.stream is not None
        transport = self.transport
        if transport is None:
            return
        transport.write(
            response.head + (b"\r\n" if request.keep_alive else b"connection: close\r\n\r\n")
        )
        async for chunk in response.stream():
            if self.transport is None:
                return
            if chunk:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if not self.can_write.is_set():
                await self.can_write.wait()
        if self.transport is None:
            return
        transport.write(b"0\r\n\r\n")
        if not request.keep_alive:
            transport.close()
            return
        self.streaming = False
        while self.queue and not self.streaming:
            self.respond(self.queue.popleft())
        if not self.streaming and self.transport is not None:
            transport.resume_reading()


def listen_socket(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several server processes can share a port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def serve(handler: Handler, host: str, port: int) -> None:
    """Serve ``handler`` on ``host:port`` until the process is signalled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HttpServerProtocol(handler), sock=listen_socket(host, port)
    )
    async with server:
        await server.serve_forever()


def run(handler: Handler, host: str, port: int, processes: int = 1) -> None:
    """Run ``processes`` server processes on one port (SO_REUSEPORT); blocks."""
    import signal

    import uvloop

    children: list[int] = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            children.clear()
            break
        children.append(pid)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvloop.run(serve(handler, host, port))
    except KeyboardInterrupt:
        pass
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
