"""A real upstream for tests: an asyncio server speaking HTTP/1.1 through h11 (the reference
parser), with misbehaviours on demand. Run as ``python -m tests.support.upstream_server PORT``;
``--tls-port N --cert C --key K [--client-ca CA]`` also serves the same over TLS on port N
(requiring a client certificate signed by CA when given; its subject is recorded).

Every request it receives is recorded; ``GET /__received`` returns them as JSON and
``POST /__reset`` clears them (these two are meant to be called directly, not through the
gateway). ``/__health`` answers the status last set with ``/__health/set/NNN`` (200 at
first): a health-check endpoint a test can fail and restore; after ``/__fail/set/NNN``
every request is answered with status NNN (0: normally again). ``--delay SECONDS`` is
a delay in seconds before every other response (a slow target). Paths (query parameters in
brackets):

/echo (any other path too)  200 JSON: method, target, headers, body_len, body_sha256, body
/status/NNN                 that status
/chunked [chunks, size, delay]        chunked body
/stream [chunks, size, delay]         Content-Length body written slowly
/download [size]            size bytes (a repeating pattern), Content-Length
/close-delimited [size]     no Content-Length, no chunking: the body ends at close
/http10                     an HTTP/1.0 response
/trailers                   chunked body followed by trailer fields
/interim                    100 Continue and 103 Early Hints before the 200
/sse [events, delay]        text/event-stream, one chunk per event
/hop                        response carrying hop-by-hop headers that must be dropped
/reset                      connection reset, no response
/reset-mid [size]           head promising 2*size bytes, size bytes, then a reset
/stall                      never answers
/stall-mid                  head and part of the body, then nothing
/bad                        bytes that are not HTTP
/head-length                for HEAD: Content-Length 1234 and no body
/hsts                       200 with its own Strict-Transport-Security header
/own-headers                200 with its own Date, X-Request-Id, and a repeated header
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import ssl
import struct
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11

RECEIVED: list[dict[str, Any]] = []
CONNECTIONS = {"count": 0}
HEALTH = {"status": 200}
FAIL = {"status": 0}
DELAY = {"seconds": 0.0}
PATTERN = bytes(range(256)) * 256  # 64 KiB


def _q(query: dict[str, list[str]], name: str, default: float) -> float:
    return float(query.get(name, [default])[0])


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    CONNECTIONS["count"] += 1
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=256 * 1024)
    try:
        while True:
            request: h11.Request | None = None
            body_len = 0
            digest = hashlib.sha256()
            kept = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(256 * 1024)
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE and request is None:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body_len += len(event.data)
                    digest.update(event.data)
                    if len(kept) < 65536:
                        kept += event.data[: 65536 - len(kept)]
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if request is None:
                return
            target = request.target.decode("latin-1")
            record = {
                "method": request.method.decode(),
                "target": target,
                "http_version": request.http_version.decode(),
                "headers": [
                    [n.decode("latin-1"), v.decode("latin-1")]
                    for n, v in request.headers.raw_items()
                ],
                "body_len": body_len,
                "body_sha256": digest.hexdigest(),
                "body": kept.decode("latin-1"),
            }
            peercert = writer.get_extra_info("peercert")
            if peercert:
                record["tls_client_subject"] = peercert.get("subject")
            parts = urlsplit(target)
            if not parts.path.startswith("/__"):
                RECEIVED.append(record)
                if DELAY["seconds"]:
                    await asyncio.sleep(DELAY["seconds"])
            keep_going = await respond(
                writer, conn, request, parts.path, parse_qs(parts.query), record
            )
            if not keep_going or conn.our_state is h11.MUST_CLOSE:
                break
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                break
    except (ConnectionError, h11.RemoteProtocolError, asyncio.IncompleteReadError):
        pass
    finally:
        if not writer.transport.is_closing():
            writer.close()


async def respond(
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    request: h11.Request,
    path: str,
    query: dict[str, list[str]],
    record: dict[str, Any],
) -> bool:
    head = request.method == b"HEAD"
    if path == "/__received":
        body = json.dumps({"requests": RECEIVED, "connections": CONNECTIONS["count"]}).encode()
        await _simple(writer, conn, 200, body, head)
        return True
    if path == "/__reset":
        RECEIVED.clear()
        CONNECTIONS["count"] = 0
        await _simple(writer, conn, 200, b"{}", head)
        return True
    if path.startswith("/__health/set/"):
        HEALTH["status"] = int(path.rsplit("/", 1)[1])
        await _simple(writer, conn, 200, b"{}", head)
        return True
    if path.startswith("/__fail/set/"):
        FAIL["status"] = int(path.rsplit("/", 1)[1])
        await _simple(writer, conn, 200, b"{}", head)
        return True
    if FAIL["status"] and not path.startswith("/__"):
        await _simple(writer, conn, FAIL["status"], b"failing on purpose\n", head)
        return True
    if path == "/__health":
        await _simple(writer, conn, HEALTH["status"], b"health\n", head)
        return True
    if path.startswith("/status/"):
        status = int(path.split("/")[2])
        body = b"" if status in (204, 304) else f"status {status}\n".encode()
        await _simple(writer, conn, status, body, head)
        return True
    if path == "/chunked" or path == "/sse":
        events = path == "/sse"
        chunks = int(_q(query, "events" if events else "chunks", 5))
        size = int(_q(query, "size", 10))
        delay = _q(query, "delay", 0)
        ctype = b"text/event-stream" if events else b"application/octet-stream"
        await _send(
            writer,
            conn,
            h11.Response(
                status_code=200,
                headers=[(b"content-type", ctype), (b"transfer-encoding", b"chunked")],
            ),
        )
        for i in range(chunks):
            if delay:
                await asyncio.sleep(delay)
            piece = (
                f"data: event {i}\n\n".encode()
                if events
                else PATTERN[i % 256 : i % 256 + size]
                if size <= 65280
                else b"x" * size
            )
            if not head:
                await _send(writer, conn, h11.Data(data=piece))
        await _send(writer, conn, h11.EndOfMessage())
        return True
    if path == "/stream":
        chunks = int(_q(query, "chunks", 5))
        size = int(_q(query, "size", 10))
        delay = _q(query, "delay", 0.05)
        await _send(
            writer,
            conn,
            h11.Response(
                status_code=200, headers=[(b"content-length", str(chunks * size).encode())]
            ),
        )
        for _ in range(chunks):
            await asyncio.sleep(delay)
            if not head:
                await _send(writer, conn, h11.Data(data=b"s" * size))
        await _send(writer, conn, h11.EndOfMessage())
        return True
    if path == "/download":
        size = int(_q(query, "size", 1024 * 1024))
        await _send(
            writer,
            conn,
            h11.Response(
                status_code=200,
                headers=[
                    (b"content-type", b"application/octet-stream"),
                    (b"content-length", str(size).encode()),
                ],
            ),
        )
        if not head:
            sent = 0
            while sent < size:
                piece = PATTERN[: min(len(PATTERN), size - sent)]
                await _send(writer, conn, h11.Data(data=piece))
                sent += len(piece)
        await _send(writer, conn, h11.EndOfMessage())
        return True
    if path == "/close-delimited":
        size = int(_q(query, "size", 1000))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n")
        if not head:
            writer.write(b"c" * size)
        await writer.drain()
        writer.close()
        return False
    if path == "/http10":
        body = b"old-style response"
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()
        return False
    if path == "/trailers":
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\n\r\n"
        )
        await writer.drain()
        return False  # raw responses bypass h11's state: the connection ends after them
    if path == "/interim":
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\n"
            b"link: </style.css>; rel=preload\r\n\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        body = b"final answer"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return False
    if path == "/hop":
        body = b"hop test"
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: x-private\r\n"
            b"x-private: secret\r\nkeep-alive: timeout=5\r\nproxy-authenticate: Basic\r\n"
            b"x-kept: yes\r\nvia: 1.1 upstream-proxy\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        return False
    if path == "/own-headers":
        body = b"own headers"
        writer.write(
            b"HTTP/1.1 200 OK\r\nServer: upstream/1\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
            b"X-Request-Id: from-upstream\r\nX-Plain: a\r\ncontent-length: %d\r\n"
            b"Connection: keep-alive\r\nX-Plain: b\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        return False
    if path == "/reset":
        _reset(writer)
        return False
    if path == "/reset-mid":
        size = int(_q(query, "size", 100_000))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (2 * size))
        writer.write(b"r" * size)
        await writer.drain()
        await asyncio.sleep(0.05)
        _reset(writer)
        return False
    if path == "/stall":
        await asyncio.sleep(3600)
        return False
    if path == "/stall-mid":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"p" * 100)
        await writer.drain()
        await asyncio.sleep(3600)
        return False
    if path == "/bad":
        writer.write(b"HELLO THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()
        return False
    if path == "/hsts":
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n"
            b"strict-transport-security: max-age=1\r\n\r\nok"
        )
        await writer.drain()
        return True
    if path == "/head-length":
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\ncontent-type: text/plain\r\n\r\n")
        if not head:
            writer.write(b"h" * 1234)
        await writer.drain()
        return False
    body = json.dumps(record).encode()
    await _simple(writer, conn, 200, body, head, content_type=b"application/json")
    return True


async def _simple(
    writer: asyncio.StreamWriter,
    conn: h11.Connection,
    status: int,
    body: bytes,
    head: bool,
    content_type: bytes = b"text/plain",
) -> None:
    headers = [(b"content-type", content_type)]
    if status not in (204, 304) and status >= 200:
        headers.append((b"content-length", str(len(body)).encode()))
    # One write for the whole response, as servers do for small ones: a test that kills
    # this process under load then never catches it between the head and the body.
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if body and not head and status not in (204, 304):
        data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()


async def main(port: int, tls_port: int = 0, tls: ssl.SSLContext | None = None) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=1024 * 1024)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    if tls is not None:
        await asyncio.start_server(handle, "127.0.0.1", tls_port, limit=1024 * 1024, ssl=tls)
    async with server:
        await server.serve_forever()


def _tls_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


if __name__ == "__main__":
    args = argparse.ArgumentParser()
    args.add_argument("port", type=int, nargs="?", default=0)
    args.add_argument("--tls-port", type=int, default=0)
    args.add_argument("--cert")
    args.add_argument("--key")
    args.add_argument("--client-ca")
    args.add_argument("--delay", type=float, default=0.0)
    a = args.parse_args(sys.argv[1:])
    DELAY["seconds"] = a.delay
    context = _tls_context(a.cert, a.key, a.client_ca) if a.cert else None
    try:
        asyncio.run(main(a.port, a.tls_port, context))
    except KeyboardInterrupt:
        pass
