"""The control-plane client against real servers on loopback: the h11 test upstream, a
trustme-certified TLS server, a listener that never answers, a closed port."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import trustme

from gateway.control.client import ControlError, request
from tests.support.procs import UpstreamProcess, free_port


async def test_get_and_post(upstream: UpstreamProcess) -> None:
    base = f"http://127.0.0.1:{upstream.port}"
    r = await request("GET", f"{base}/status/201?x=1")
    assert r.status == 201
    assert r.body == b"status 201\n"
    assert r.header("Content-Length") == str(len(r.body))
    r = await request("POST", f"{base}/echo", headers=[("x-probe", "1")], body=b"hello")
    assert r.status == 200
    seen = json.loads((await request("GET", f"{base}/__received")).body)["requests"][-1]
    assert seen["method"] == "POST"
    assert seen["body"] == "hello"
    names = {n.lower(): v for n, v in seen["headers"]}
    assert names["x-probe"] == "1"
    assert names["host"] == f"127.0.0.1:{upstream.port}"
    assert names["connection"] == "close"


async def test_chunked_body_is_assembled(upstream: UpstreamProcess) -> None:
    r = await request("GET", f"http://127.0.0.1:{upstream.port}/chunked")
    assert r.status == 200
    assert r.header("transfer-encoding") == "chunked"
    assert len(r.body) > 0


async def test_body_limit(upstream: UpstreamProcess) -> None:
    with pytest.raises(ControlError, match="over 100 bytes"):
        await request("GET", f"http://127.0.0.1:{upstream.port}/download?size=100000", max_body=100)


async def test_connect_refused_and_bad_url() -> None:
    with pytest.raises(ControlError):
        await request("GET", f"http://127.0.0.1:{free_port()}/")
    with pytest.raises(ControlError, match="unsupported URL"):
        await request("GET", "ftp://example.com/")
    with pytest.raises(ControlError, match="bad port"):
        await request("GET", "http://127.0.0.1:99999/")


async def test_timeout_bounds_a_silent_server() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ControlError, match=r"no response within 0\.2s"):
            await request("GET", f"http://127.0.0.1:{port}/", timeout=0.2)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()


async def test_bad_http_is_an_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ControlError):
            await request("GET", f"http://127.0.0.1:{port}/")
    finally:
        server.close()


async def test_https_verifies_the_server() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(ok, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    try:
        r = await request("GET", f"https://localhost:{port}/keys", ssl_context=trusting)
        assert (r.status, r.body) == (200, b"ok")
        with pytest.raises(ControlError):  # the system store does not know the test CA
            await request("GET", f"https://localhost:{port}/keys")
        with pytest.raises(ControlError):  # the certificate is for localhost only
            await request("GET", f"https://127.0.0.1:{port}/keys", ssl_context=trusting)
    finally:
        server.close()
        await server.wait_closed()
