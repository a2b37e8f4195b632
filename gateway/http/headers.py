"""Header rules of a proxy: hop-by-hop names, token and value validity, request-id shape.

Header names on the hot path are lower-case ``bytes``; the raw spelling is kept beside them
so that forwarded messages preserve the sender's case and order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import MemberDescriptorType
from typing import cast

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


#: the slot, set and read around FieldLines.items
_ITEMS = cast(MemberDescriptorType, Headers.__dict__["items"])


class FieldLines(Headers):
    """Headers kept as the raw field lines they arrived as (``Name: value\\r\\n`` each, as
    llhttp accepted them) until something reads ``items``: a response that only passes
    through is never split into triples (a parser callback and a triple per field cost
    about 4k instructions each; callgrind)."""

    __slots__ = ("_lines",)

    def __init__(self, lines: bytes) -> None:  # items are made on first read
        self._lines: bytes | None = lines

    @property
    def items(self) -> list[tuple[bytes, bytes, bytes]]:
        lines = self._lines
        if lines is not None:
            self._lines = None
            _ITEMS.__set__(self, split_fields(lines))
        return cast("list[tuple[bytes, bytes, bytes]]", _ITEMS.__get__(self, FieldLines))

    @items.setter
    def items(self, value: list[tuple[bytes, bytes, bytes]]) -> None:
        self._lines = None
        _ITEMS.__set__(self, value)


def split_fields(lines: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """``(lower_name, name, value)`` triples from raw field lines, each value as llhttp
    gives it (leading blanks dropped, trailing ones kept)."""
    items = []
    for line in lines.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            items.append((name.lower(), name, value.lstrip(b" \t")))
    return items


#: Names a plugin cannot add as ``HeaderLines``: framing and hop-by-hop headers, and those the
#: gateway writes itself (added lines are not checked against them again when written).
_NOT_ADDABLE = HOP_BY_HOP | {b"content-length", b"date", b"via"}
_LINE_BREAK_OR_NUL = re.compile(rb"[\r\n\0]")


class HeaderLines:
    """Response headers a request hook adds (``Exchange.add_response_headers``), built once
    and reused: the triples, for ``on_response`` hooks that may edit them, and the same
    lines serialised, written as they are when no such hook runs (two headers through the
    general loop of ``response_head`` cost ~3,500 instructions; appended, ~100: callgrind).

    Build them with ``HeaderLines.of(pairs)``, which checks names and values. The plain
    constructor checks nothing: it is for a hot path that assembles both forms from parts
    it checked once (the rate limiter: constant names, formatted numbers)."""

    __slots__ = ("_items", "raw")

    def __init__(self, items: tuple[tuple[bytes, bytes, bytes], ...] | None, raw: bytes) -> None:
        """``items=None``: derived from ``raw`` when first asked for (only a route with
        ``on_response`` hooks asks), so a hot path need only build the bytes."""
        self._items = items
        self.raw = raw

    @property
    def items(self) -> tuple[tuple[bytes, bytes, bytes], ...]:
        items = self._items
        if items is None:
            pairs = [line.split(b": ", 1) for line in self.raw.split(b"\r\n") if line]
            items = self._items = tuple((n.lower(), n, v) for n, v in pairs)
        return items

    @classmethod
    def of(cls, pairs: Sequence[tuple[bytes, bytes]]) -> HeaderLines:
        """Raises ValueError for a name the gateway writes itself or that is not a token,
        and for a value with a line break or NUL."""
        for name, value in pairs:
            if name.lower() in _NOT_ADDABLE or not is_token(name):
                raise ValueError(f"{name!r} cannot be added to a response")
            if _LINE_BREAK_OR_NUL.search(value) is not None:
                raise ValueError(f"{name!r}: value contains a line break or NUL")
        return cls(
            tuple((name.lower(), name, value) for name, value in pairs),
            b"".join(b"%s: %s\r\n" % pair for pair in pairs),
        )

    def __add__(self, other: HeaderLines) -> HeaderLines:
        if self._items is None or other._items is None:
            return HeaderLines(None, self.raw + other.raw)
        return HeaderLines(self._items + other._items, self.raw + other.raw)

    def __repr__(self) -> str:
        return f"<HeaderLines {self.raw!r}>"
