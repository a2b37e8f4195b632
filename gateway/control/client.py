"""The control plane's HTTP client: JWKS and discovery fetches, health checks.

Built on h11 (sans-IO) over asyncio streams, so it never blocks the event loop. One request
per connection (``Connection: close``): control-plane traffic is rare, and a fresh connection
cannot be in an unknown state. The whole exchange — connect, TLS handshake, request, response
— is bounded by ``timeout``; the body by ``max_body``.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11

DEFAULT_MAX_BODY = 4 * 1024 * 1024
USER_AGENT = "gateway-control/1"


class ControlError(OSError):
    """The request failed: bad URL, connect failure, timeout, TLS or HTTP protocol error."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower-case
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


_default_ssl: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store, hostname checking on (created once)."""
    global _default_ssl
    if _default_ssl is None:
        _default_ssl = ssl.create_default_context()
    return _default_ssl


async def request(
    method: str,
    url: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    timeout: float = 5.0,  # noqa: ASYNC109 (one deadline for connect, TLS and exchange)
    ssl_context: ssl.SSLContext | None = None,
    max_body: int = DEFAULT_MAX_BODY,
) -> Response:
    """Send one request and return the whole response, or raise ``ControlError``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ControlError(f"unsupported URL {url!r}: expected http:// or https://")
    https = parts.scheme == "https"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError as exc:
        raise ControlError(f"bad port in URL {url!r}") from exc
    host = parts.hostname
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(
                method,
                host,
                port,
                target,
                host_header,
                headers or [],
                body,
                (ssl_context or default_ssl_context()) if https else None,
                max_body,
            )
    except TimeoutError:
        raise ControlError(f"{method} {url}: no response within {timeout:g}s") from None
    except ControlError:
        raise
    except (OSError, h11.ProtocolError, ssl.SSLError) as exc:
        raise ControlError(f"{method} {url}: {exc or type(exc).__name__}") from exc


async def _exchange(
    method: str,
    host: str,
    port: int,
    target: str,
    host_header: str,
    headers: list[tuple[str, str]],
    body: bytes,
    ssl_context: ssl.SSLContext | None,
    max_body: int,
) -> Response:
    reader, writer = await asyncio.open_connection(
        host, port, ssl=ssl_context, server_hostname=host if ssl_context else None
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        names = {k.lower() for k, _ in headers}
        hdrs = [("host", host_header), *headers]
        if "user-agent" not in names:
            hdrs.append(("user-agent", USER_AGENT))
        hdrs.append(("connection", "close"))
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs.append(("content-length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        writer.write(out)
        await writer.drain()
        status = 0
        resp_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
                resp_headers = [
                    (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers
                ]
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > max_body:
                    raise ControlError(f"response body over {max_body} bytes")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, resp_headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise ControlError("connection closed before the response was complete")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass
