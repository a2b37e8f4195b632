"""Reading header fields on the data plane: the per-field work of every request and response.

Two pieces, each with a compiled version (``gateway/_speedups.c``, see ``gateway.speedups``)
and a pure-Python one that behaves the same (``tests/unit/test_speedups.py`` holds them to
it):

- ``RequestFields``: the client side's ``on_header`` callback for httptools. It counts the
  head's size against the limits, collects the ``(lower_name, name, value)`` triples, and
  keeps what framing, routing and forwarding need (Host, Content-Length, Transfer-Encoding,
  Connection, Expect, X-Forwarded-For, the request id).
- ``scan_fields``: an upstream response's raw field lines (the upstream side takes no
  callback per field) to its framing values and the lines copied to the client as they are.

In Python a field costs ~4-5k instructions however the work is arranged (a callback per
field, or a loop over the raw lines: the bytecodes dominate either way); compiled, a few
hundred (callgrind, ``python -m benchmarks.hotpath --callgrind``).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.speedups import compiled

# -- request fields ------------------------------------------------------------------------------


_HOST, _CONTENT_LENGTH_REQ, _TRANSFER_ENCODING_REQ, _CONNECTION_REQ, _EXPECT, _XFF = range(1, 7)
_REQUEST_KINDS = {
    b"host": _HOST,
    b"content-length": _CONTENT_LENGTH_REQ,
    b"transfer-encoding": _TRANSFER_ENCODING_REQ,
    b"connection": _CONNECTION_REQ,
    b"expect": _EXPECT,
    b"x-forwarded-for": _XFF,
}


class RequestFieldsPy:
    """One client connection's request fields, as httptools reports them (``on_header``).

    ``reset(items)`` starts a request: its triples go to ``items`` (the exchange's header
    list). Setting ``items`` to None at the end of the head keeps counting fields (chunked
    trailers count against the limits) without collecting them. ``size`` is the head's bytes
    so far (the URL adds to it too) and ``count`` its fields; past ``max_bytes`` or
    ``max_count``, ``on_header`` raises ``reject("header_fields_too_large"[, message])``.

    For the proxy's own use it keeps: how many Host, Content-Length and Transfer-Encoding
    fields came, and the last value of each; the Expect value; the request id (the field
    named ``rid_name``, lower case); every Connection and X-Forwarded-For value, in order."""

    __slots__ = (
        "connection",
        "count",
        "expect",
        "host",
        "host_count",
        "items",
        "length",
        "length_count",
        "max_bytes",
        "max_count",
        "reject",
        "rid",
        "rid_name",
        "size",
        "te",
        "te_count",
        "xff",
    )

    def __init__(
        self, max_bytes: int, max_count: int, rid_name: bytes, reject: Callable[..., Exception]
    ) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.rid_name = rid_name
        self.reject = reject
        self.items: list[tuple[bytes, bytes, bytes]] | None = None
        self.reset(None)

    def reset(self, items: list[tuple[bytes, bytes, bytes]] | None) -> None:
        self.items = items
        self.size = self.count = self.host_count = self.length_count = self.te_count = 0
        self.host = self.length = self.te = b""
        self.expect: bytes | None = None
        self.rid: bytes | None = None
        self.connection: list[bytes] | None = None
        self.xff: list[bytes] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self.size + len(name) + len(value) + 4
        self.size = size
        count = self.count + 1
        self.count = count
        if size > self.max_bytes:
            raise self.reject("header_fields_too_large")
        if count > self.max_count:
            raise self.reject("header_fields_too_large", "too many request header fields")
        items = self.items
        if items is None:
            return  # a trailer field of a chunked body: counted, not kept
        lname = name.lower()
        items.append((lname, name, value))
        kind = _REQUEST_KINDS.get(lname)
        if kind is None:
            if lname == self.rid_name:
                self.rid = value
        elif kind == _HOST:
            self.host_count += 1
            self.host = value
        elif kind == _CONTENT_LENGTH_REQ:
            self.length_count += 1
            self.length = value
        elif kind == _TRANSFER_ENCODING_REQ:
            self.te_count += 1
            self.te = value
        elif kind == _CONNECTION_REQ:
            if self.connection is None:
                self.connection = [value]
            else:
                self.connection.append(value)
        elif kind == _EXPECT:
            self.expect = value
        elif self.xff is None:
            self.xff = [value]
        else:
            self.xff.append(value)


# -- response fields -----------------------------------------------------------------------------
#: What a response header is to the proxy. Unlisted names are plain: copied to the client as
#: they are, so they stay in the head's raw lines (``plain``) and the client's head needs no
#: pass over the headers (``forward.response_head``).
_CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _DATE, _REQUEST_ID, _ODD = range(1, 7)
_RESPONSE_KINDS = {
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"date": _DATE,  # plain, but the gateway adds its own when there is none
    b"x-request-id": _REQUEST_ID,  # likewise (the default request id header)
    # not copied, or not as they are: the general path (response_head's loop) handles them
    b"keep-alive": _ODD,
    b"proxy-connection": _ODD,
    b"proxy-authenticate": _ODD,
    b"proxy-authorization": _ODD,
    b"te": _ODD,
    b"trailer": _ODD,
    b"upgrade": _ODD,
    b"via": _ODD,
    b"strict-transport-security": _ODD,
}


#: ``scan_fields`` flags
HAS_DATE, HAS_REQUEST_ID, ODD_FIELDS, CHUNKED = 1, 2, 4, 8


def scan_fields_py(fields: bytes) -> tuple[bytes, bytes | None, bytes | None, int]:
    """What the proxy needs of a response's raw field lines (one ``Name: value\\r\\n`` each,
    as llhttp accepted them; ``ValueError`` unless they end with CRLF):
    ``(plain, content_length, connection, flags)``.

    ``plain`` is the lines less Content-Length, Transfer-Encoding, Connection and the odd
    ones (they stand for the fields when nothing edits them); ``content_length`` and
    ``connection`` are those values (several Connection fields make one list); ``flags``
    has ``HAS_DATE``, ``HAS_REQUEST_ID``, ``ODD_FIELDS`` (a field the plain lines cannot
    stand for: hop-by-hop, Via, HSTS) and ``CHUNKED`` (the last transfer coding).

    The reference version: ``gateway._speedups.scan_fields``, compiled, does the same
    (``tests/unit/test_speedups.py``) in a small fraction of the time."""
    length = connection = None
    flags = 0
    cut = False
    plain = []
    if fields and not fields.endswith(b"\r\n"):
        raise ValueError("field lines must end with CRLF")
    kinds = _RESPONSE_KINDS
    for line in fields.split(b"\r\n"):
        colon = line.find(b":")
        kind = kinds.get(line[:colon].lower()) if colon >= 0 else None
        if kind is None:
            plain.append(line)
            continue
        if kind == _DATE:
            flags |= HAS_DATE
            plain.append(line)
            continue
        if kind == _REQUEST_ID:
            flags |= HAS_REQUEST_ID
            plain.append(line)
            continue
        cut = True
        if kind == _ODD:
            flags |= ODD_FIELDS
            continue
        value = line[colon + 1 :].lstrip(b" \t")
        if kind == _CONTENT_LENGTH:
            length = value
        elif kind == _CONNECTION:
            connection = value if connection is None else connection + b", " + value
        elif value.rstrip(b" \t").lower().endswith(b"chunked"):  # the last coding frames
            flags |= CHUNKED
        else:
            flags &= ~CHUNKED
    return (b"\r\n".join(plain) if cut else fields), length, connection, flags


RequestFields: type[RequestFieldsPy]
scan_fields: Callable[[bytes], tuple[bytes, bytes | None, bytes | None, int]]
if compiled is not None:
    RequestFields = compiled.RequestFields
    scan_fields = compiled.scan_fields
else:
    RequestFields = RequestFieldsPy
    scan_fields = scan_fields_py
