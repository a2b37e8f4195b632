"""An ``Exchange`` without a connection, for unit tests of plugins' hooks."""

from __future__ import annotations

from types import SimpleNamespace

from gateway.http.headers import Headers
from gateway.proxy.exchange import Exchange


def make_exchange(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    client_ip: str = "192.0.2.1",
    route: str | None = "orders",
    method: bytes = b"GET",
    query: bytes = b"",
) -> Exchange:
    """An exchange as a plugin sees it: a client address, a route name, request headers."""
    conn = SimpleNamespace(client_ip=client_ip, tls_client=None)
    ex = Exchange(conn)  # type: ignore[arg-type]
    ex.method = method
    ex.query = query
    if route is not None:
        ex.route = SimpleNamespace(name=route)  # type: ignore[assignment]
    ex.headers = Headers([(n.lower(), n, v) for n, v in headers or []])
    return ex
