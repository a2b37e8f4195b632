"""Header rules of a proxy: hop-by-hop names, token and value validity, request-id shape.

Header names on the hot path are lower-case ``bytes``; the raw spelling is kept beside them
so that forwarded messages preserve the sender's case and order.
"""

from __future__ import annotations

import re

#: Hop-by-hop headers (RFC 9110 7.6.1) plus the legacy ones proxies also drop.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def is_token(name: bytes) -> bool:
    return _TOKEN_RE.match(name) is not None


def connection_tokens(value: bytes) -> list[bytes]:
    """The lower-case header names listed in a ``Connection`` header value."""
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def valid_request_id(value: bytes) -> bool:
    """A propagated request id must be short and plain, so it is safe in logs and headers."""
    return _REQUEST_ID_RE.match(value) is not None


def is_chunked_only(value: bytes) -> bool:
    """The only transfer coding accepted on requests is a single ``chunked``."""
    return value.strip().lower() == b"chunked"


class Headers:
    """An ordered multi-map of headers: ``(lower_name, raw_name, value)`` triples.

    Plugins use the methods; the data plane reads ``items`` directly.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[bytes, bytes, bytes]] | None = None) -> None:
        self.items = items if items is not None else []

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for lname, _, value in self.items:
            if lname == name:
                return value
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        return [value for lname, _, value in self.items if lname == name]

    def __contains__(self, name: object) -> bool:
        return any(lname == name for lname, _, _ in self.items)

    def add(self, name: bytes, value: bytes) -> None:
        self.items.append((name.lower(), name, value))

    def set(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        self.items = [h for h in self.items if h[0] != lname]
        self.items.append((lname, name, value))

    def remove(self, name: bytes) -> None:
        lname = name.lower()
        self.items = [h for h in self.items if h[0] != lname]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"<Headers {[(raw, value) for _, raw, value in self.items]!r}>"
