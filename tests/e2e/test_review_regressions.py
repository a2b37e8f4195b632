"""Regressions found in review of the data plane, through real processes and sockets."""

from __future__ import annotations

from tests.conftest import proxy_config
from tests.support.client import request
from tests.support.procs import UpstreamProcess


def test_connection_header_cannot_strip_headers_a_plugin_set(
    upstream: UpstreamProcess, start_gateway
) -> None:
    # Names listed in the client's Connection header are hop-by-hop and removed (RFC 9110
    # 7.6.1), but only from what the client sent: a header the route's plugins set for the
    # upstream (an identity, a tenant) must not be removable by listing its name.
    gw = start_gateway(
        proxy_config(
            upstream.url, plugins=[{"headers": {"request": {"set": {"x-tenant": "acme"}}}}]
        )
    )
    resp = request(
        gw.port,
        "GET",
        "/echo",
        [("connection", "keep-alive, x-tenant, x-drop"), ("x-drop", "1"), ("x-keep", "2")],
    )
    assert resp.status == 200
    seen = [(n.lower(), v) for n, v in resp.json()["headers"]]
    assert ("x-tenant", "acme") in seen
    assert ("x-keep", "2") in seen
    assert not any(n == "x-drop" for n, _ in seen)
