"""Forwarding: the request head sent upstream, the response head sent back, connecting.

Header rules (docs/proxying.md): hop-by-hop headers and the names listed in ``Connection``
are dropped both ways; ``Host`` is the target's unless the route preserves it;
``X-Forwarded-For/-Proto/-Host`` are trusted from the peer only when it is a trusted proxy,
otherwise replaced; ``Via`` is appended; the request id is sent upstream and back.
Everything else keeps the sender's order and spelling.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from gateway.http import trace
from gateway.http.fields import HAS_DATE, HAS_REQUEST_ID
from gateway.http.headers import HOP_BY_HOP, connection_tokens
from gateway.http.status import STATUS_LINES_10, STATUS_LINES_11, status_line
from gateway.proxy.exchange import BODY_CHUNKED
from gateway.speedups import compiled
from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.health import passive_failure

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.upstream.target import Target

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Request headers the gateway rewrites itself rather than copying.
#: Framing (Content-Length, and Transfer-Encoding as hop-by-hop) is always written from what
#: the gateway parsed, never copied from ``ex.headers``, which plugins may edit: a plugin
#: cannot make the upstream read the body differently from the gateway.
_REQUEST_OWN = frozenset(
    {
        b"host",
        b"content-length",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"via",
        b"expect",
    }
)
#: ``Connection`` values that name no header beyond the hop-by-hop ones always dropped.
_PLAIN_CONNECTION = frozenset(
    {b"keep-alive", b"Keep-Alive", b"close", b"Close", b"keep-alive, close", b"upgrade"}
)

#: Response headers not copied: hop-by-hop ones, and those the gateway writes itself.
_RESPONSE_SKIP = HOP_BY_HOP | {b"content-length", b"via"}
_RESPONSE_SKIP_HSTS = _RESPONSE_SKIP | {b"strict-transport-security"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Forwarding:
    """Compiled ``forwarding`` config: who is trusted, what to say in Via, the id header."""

    __slots__ = (
        "_trust_cache",
        "plain_responses",
        "request_id_header",
        "request_id_raw",
        "request_own",
        "request_skip",
        "sample_ratio",
        "trace",
        "trusted",
        "via",
    )

    def __init__(
        self,
        trusted: Sequence[IPNetwork],
        via: str | None,
        request_id_header: str,
        trace: bool = True,
        sample_ratio: float = 1.0,
        identity_headers: Sequence[str] = (),
    ) -> None:
        self.trusted = tuple(trusted)
        self.via = f"1.1 {via}".encode("latin-1") if via else b""
        self.request_id_raw = request_id_header.encode("latin-1")
        self.request_id_header = self.request_id_raw.lower()
        #: the upstream connection's plain header lines can stand for a response's headers
        #: (its parser knows the default request id header only)
        self.plain_responses = self.request_id_header == b"x-request-id"
        # The client-certificate identity headers (gateway.tls) are the gateway's to write,
        # on every listener: a client cannot send its own copy.
        self.request_own = (
            _REQUEST_OWN
            | {self.request_id_header}
            | {h.lower().encode("latin-1") for h in identity_headers}
        )
        if trace:
            self.request_own |= {b"traceparent"}
        #: request headers not copied as they are: hop-by-hop, or rewritten by the gateway
        self.request_skip = HOP_BY_HOP | self.request_own
        self.trace = trace
        self.sample_ratio = sample_ratio
        self._trust_cache: dict[str, bool] = {}

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted or not ip:
            return False
        found = self._trust_cache.get(ip)
        if found is None:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                found = False
            else:
                found = any(addr in net for net in self.trusted)
            if len(self._trust_cache) > 10_000:
                self._trust_cache.clear()
            self._trust_cache[ip] = found
        return found

    def client_ip(self, peer: str, xff_values: list[bytes]) -> str:
        """The client address: walking X-Forwarded-For from the right, the first hop that is
        not a trusted proxy (the peer itself being trusted)."""
        hops = [h.strip() for v in xff_values for h in v.decode("latin-1").split(",")]
        for hop in reversed(hops):
            if hop and not self.is_trusted(hop):
                return hop
        return hops[0] if hops and hops[0] else peer


def request_head_py(
    ex: Exchange,
    target: Target,
    path: bytes,
    trusted_peer: bool,
    fwd: Forwarding,
) -> bytes:
    """The request head for the upstream. Headers the client listed in ``Connection`` were
    already removed when the request was read (before plugins ran).

    The reference version: ``Heads.request_head`` (``gateway/_speedups.c``), compiled, does
    the same (``tests/unit/test_speedups_heads.py``); ``request_head`` is the one that
    runs."""
    parts = [ex.method, b" ", path]
    if ex.query:
        parts += (b"?", ex.query)
    elif 63 in ex.url:  # b"?" (an int needle is cheaper); "/a?" stays "/a?": the client's
        parts.append(b"?")
    parts.append(b" HTTP/1.1\r\n")
    xff: list[bytes] = []
    xfp = xfh = via = b""
    traceparent: bytes | None = None
    skip = fwd.request_skip
    for lname, raw, value in ex.headers.items:
        if lname in skip:
            if lname == b"x-forwarded-for":
                xff.append(value)
            elif lname == b"x-forwarded-proto":
                xfp = value
            elif lname == b"x-forwarded-host":
                xfh = value
            elif lname == b"via":
                via = value if not via else via + b", " + value
            elif lname == b"traceparent":
                traceparent = value
            continue
        parts += (raw, b": ", value, b"\r\n")
    route = ex.route
    host = (
        ex.host if (route is not None and route.preserve_host and ex.host) else target.host_header
    )
    conn = ex.conn
    peer = conn.peer_ip_bytes
    if trusted_peer and xff:
        parts += (b"x-forwarded-for: ", b", ".join(xff), b", ", peer, b"\r\n")
    else:
        parts += (b"x-forwarded-for: ", peer, b"\r\n")
    parts += (b"x-forwarded-proto: ", xfp if (trusted_peer and xfp) else conn.scheme, b"\r\n")
    fwd_host = xfh if (trusted_peer and xfh) else ex.host
    if fwd_host:  # an HTTP/1.0 request may carry no Host at all
        parts += (b"x-forwarded-host: ", fwd_host, b"\r\n")
    if fwd.via:
        parts += (b"via: ", via + b", " + fwd.via if via else fwd.via, b"\r\n")
    if ex.body_kind == BODY_CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif ex.length_header is not None:
        parts += (b"content-length: ", ex.length_header, b"\r\n")
    parts += (fwd.request_id_raw, b": ", ex.request_id.encode("latin-1"), b"\r\n")
    if fwd.trace:
        ours = ex.traceparent
        if ours is None:  # a retry keeps the first attempt's
            trace_id, ours = trace.child(traceparent, fwd.sample_ratio)
            ex.trace_id = trace_id.decode()
            ex.traceparent = ours
        parts += (b"traceparent: ", ours, b"\r\n")
    client_cert = conn.tls_client
    if client_cert is not None:
        parts.append(client_cert.header_block)
    parts += (b"host: ", host, b"\r\n\r\n")
    return b"".join(parts)


def response_head_py(
    ex: Exchange,
    content_length: bytes | None,
    chunked: bool,
    fwd: Forwarding,
    date: bytes,
    connection: bytes | None = None,
    extra: bytes = b"",
    upstream: UpstreamConnection | None = None,
) -> bytes:
    """Serialise ``ex.status`` and ``ex.response_headers`` for the client.

    ``content_length`` is the value to send (``None``: none); ``chunked`` adds
    ``Transfer-Encoding: chunked``; ``connection`` is the upstream's ``Connection`` value,
    whose listed names are dropped; ``extra`` is header lines written after the response's
    own (``HeaderLines.raw``, checked when built). Connection handling follows
    ``ex.keep_alive``.

    ``upstream``: the connection whose response ``ex.response_headers`` are, unedited (no
    response hook ran), with no odd header (``ODD_FIELDS``), under the default request id
    header (``Forwarding.plain_responses``): its plain lines, assembled while parsing, are
    the headers' lines, with no second pass over them (~4k instructions a response).

    The reference version: ``Heads.response_head``, compiled, does the same;
    ``response_head`` is the one that runs.
    """
    status = ex.status
    if 100 <= status < 600:
        line = STATUS_LINES_10[status] if ex.http10 else STATUS_LINES_11[status]
    else:
        line = status_line(status, ex.http10)
    parts = [line]
    conn_tokens = (
        None
        if connection is None or connection in _PLAIN_CONNECTION
        else connection_tokens(connection)
    )
    via = b""
    hsts = ex.conn.hsts  # a TLS listener's own Strict-Transport-Security replaces any other
    if upstream is not None and conn_tokens is None:
        parts.append(upstream.plain)
        flags = upstream.field_flags
        has_date = flags & HAS_DATE != 0
        has_rid = flags & HAS_REQUEST_ID != 0
    else:
        has_date = has_rid = False
        rid_name = fwd.request_id_header
        skip = _RESPONSE_SKIP_HSTS if hsts else _RESPONSE_SKIP
        for lname, raw, value in ex.response_headers.items:
            if lname in skip:
                if lname == b"via":
                    via = value if not via else via + b", " + value
                continue
            if conn_tokens is not None and lname in conn_tokens:
                continue
            if lname == b"date":
                has_date = True
            elif lname == rid_name:
                has_rid = True
            parts += (raw, b": ", value, b"\r\n")
    if extra:
        parts.append(extra)
    if content_length is not None:
        parts += (b"content-length: ", content_length, b"\r\n")
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if not has_date:
        parts.append(date)
    if not has_rid:
        parts += (fwd.request_id_raw, b": ", ex.request_id.encode("latin-1"), b"\r\n")
    if hsts:
        parts.append(hsts)
    if fwd.via:
        parts += (b"via: ", via + b", " + fwd.via if via else fwd.via, b"\r\n")
    if not ex.keep_alive:
        parts.append(b"connection: close\r\n\r\n")
    elif ex.http10:
        parts.append(b"connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts)


RequestHead = Callable[["Exchange", "Target", bytes, bool, Forwarding], bytes]
ResponseHead = Callable[..., bytes]
request_head: RequestHead
response_head: ResponseHead
if compiled is not None:
    # The two heads, compiled (gateway/_speedups.c); the constants they need are given once.
    _heads = compiled.Heads(
        status_lines_10=STATUS_LINES_10,
        status_lines_11=STATUS_LINES_11,
        status_line=status_line,
        plain_connection=_PLAIN_CONNECTION,
        connection_tokens=connection_tokens,
        response_skip=_RESPONSE_SKIP,
        response_skip_hsts=_RESPONSE_SKIP_HSTS,
        trace_child=trace.child,
        body_chunked=BODY_CHUNKED,
        has_date=HAS_DATE,
        has_request_id=HAS_REQUEST_ID,
    )
    request_head = _heads.request_head
    response_head = _heads.response_head
else:
    request_head = request_head_py
    response_head = response_head_py


async def connect(target: Target, timeout: float) -> UpstreamConnection:  # noqa: ASYNC109
    """Open a new connection to ``target``; raises ``OSError`` or ``TimeoutError``.

    The one place connections to targets are opened. While it runs the target counts it in
    ``connecting`` (the balancers and the circuit breaker see it as load); a failure is a
    passive-health failure of the target."""
    loop = asyncio.get_running_loop()
    target.connecting += 1
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await loop.create_connection(
                lambda: UpstreamConnection(target),
                target.host,
                target.port,
                ssl=target.ssl,
                server_hostname=target.server_hostname,
            )
    except OSError:  # TimeoutError included
        passive_failure(target)
        raise
    finally:
        target.connecting -= 1
    return protocol
