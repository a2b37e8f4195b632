"""The built-in echo upstream (``url: builtin:echo``): answers every request with a JSON
description of what it received. It backs the bundled example config, so a new user sees
the gateway proxy something with no other server running."""

from __future__ import annotations

import asyncio
from typing import cast

import httptools
import orjson


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.body_len = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.body = bytearray()
        self.body_len = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)
        if len(self.body) < 4096:
            self.body += body[: 4096 - len(self.body)]

    def on_message_complete(self) -> None:
        assert self.transport is not None
        payload = (
            orjson.dumps(
                {
                    "method": self.parser.get_method().decode(),
                    "url": self.url.decode("latin-1"),
                    "headers": self.headers,
                    "body_bytes": self.body_len,
                    "body": self.body.decode("utf-8", "replace"),
                },
                option=orjson.OPT_INDENT_2,
            )
            + b"\n"
        )
        keep = self.parser.should_keep_alive()
        head = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n%s\r\n"
            % (len(payload), b"" if keep else b"connection: close\r\n")
        )
        self.transport.write(head + payload)
        if not keep:
            self.transport.close()


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(EchoProtocol, host, port)
