"""The pure parts of the data plane: ``gateway.http`` and the balancer. No sockets."""

from __future__ import annotations

import json

import pytest

from gateway.http.errors import ERRORS, error_body
from gateway.http.headers import (
    HOP_BY_HOP,
    HeaderLines,
    Headers,
    connection_tokens,
    is_chunked_only,
    is_token,
    valid_request_id,
)
from gateway.http.status import STATUS_LINES_10, STATUS_LINES_11, has_no_body, reason, status_line
from gateway.http.target import needs_normalising, normalise_path, split_target


# -- request targets --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"/", (b"/", b"", None)),
        (b"/a/b", (b"/a/b", b"", None)),
        (b"/a?x=1&y=2", (b"/a", b"x=1&y=2", None)),
        (b"/a?", (b"/a", b"", None)),
        (b"/a?x=?/b", (b"/a", b"x=?/b", None)),
        (b"/a?q=#frag", (b"/a", b"q=#frag", None)),
        (b"http://api.example.com/x?y", (b"/x", b"y", b"api.example.com")),
        (b"HTTP://Api.Example.com:8080/x", (b"/x", b"", b"Api.Example.com:8080")),
        (b"https://h/", (b"/", b"", b"h")),
        (b"http://h", (b"/", b"", b"h")),
        (b"http://h?q=1", (b"/", b"q=1", b"h")),
        (b"http://[::1]:80/p", (b"/p", b"", b"[::1]:80")),
    ],
)
def test_split_target(url: bytes, expected: tuple[bytes, bytes, bytes | None]) -> None:
    assert split_target(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        b"*",
        b"api.example.com:443",  # authority-form (CONNECT)
        b"a/b",
        b"ftp://h/x",
        b"http:///x",  # empty authority
        b"http://user@h/x",  # userinfo: a classic confusion vector
        b"/a#frag",
        b"",
    ],
)
def test_split_target_refuses(url: bytes) -> None:
    assert split_target(url) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/a/b", b"/a/b"),
        (b"/a/./b", b"/a/b"),
        (b"/a/../b", b"/b"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/.", b"/a/b/"),
        (b"/a/%2e%2e/b", b"/b"),
        (b"/a/%2E%2e/b", b"/b"),
        (b"/a/%2e/b", b"/a/b"),
        (b"/a/..%2fb", b"/a/..%2fb"),  # encoded slashes are not segment separators
        (b"/a/.hidden/../b", b"/a/b"),
        (b"/a/...", b"/a/..."),
        (b"/a//b/../c", b"/a//c"),
        (b"/", b"/"),
        (b"/.", b"/"),
        (b"/a/..", b"/"),
    ],
)
def test_normalise_path(path: bytes, expected: bytes) -> None:
    assert normalise_path(path) == expected


@pytest.mark.parametrize("path", [b"/..", b"/../a", b"/a/../..", b"/%2e%2e/x", b"/a/./../../b"])
def test_normalise_path_refuses_to_climb_above_the_root(path: bytes) -> None:
    assert normalise_path(path) is None


@pytest.mark.parametrize(
    ("path", "needed"),
    [
        (b"/plain/path", False),
        (b"/a.b/c.d", False),
        (b"/a%20b", False),
        (b"/a/./b", True),
        (b"/a/../b", True),
        (b"/.well-known/x", True),  # harmless to normalise, and cheap to detect
        (b"/a/%2E%2E/b", True),
        (b"/a/%2e", True),
    ],
)
def test_needs_normalising(path: bytes, needed: bool) -> None:
    assert needs_normalising(path) is needed
    if not needed:
        assert normalise_path(path) == path


# -- header rules -----------------------------------------------------------------------------
def test_hop_by_hop_names_are_lower_case_bytes() -> None:
    assert {b"connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"} <= HOP_BY_HOP
    assert all(name == name.lower() for name in HOP_BY_HOP)
    assert b"content-length" not in HOP_BY_HOP


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        (b"x-request-id", True),
        (b"Content-Type", True),
        (b"!#$%&'*+-.^_`|~09aZ", True),
        (b"", False),
        (b"bad name", False),
        (b"colon:", False),
        (b"tab\t", False),
        (b"nul\x00", False),
        (b'quote"', False),
        (b"caf\xc3\xa9", False),
        (b"x\r\ny", False),
    ],
)
def test_is_token(name: bytes, ok: bool) -> None:
    assert is_token(name) is ok


def test_connection_tokens() -> None:
    assert connection_tokens(b"keep-alive, X-Secret ,, Upgrade") == [
        b"keep-alive",
        b"x-secret",
        b"upgrade",
    ]
    assert connection_tokens(b"") == []
    assert connection_tokens(b"close") == [b"close"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"abc-123", True),
        (b"a.b_c:d", True),
        (b"0" * 128, True),
        (b"0" * 129, False),
        (b"", False),
        (b"has space", False),
        (b"<script>", False),
        (b"x\r\ny", False),
        (b"caf\xc3\xa9", False),
    ],
)
def test_valid_request_id(value: bytes, ok: bool) -> None:
    assert valid_request_id(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"chunked", True),
        (b"Chunked", True),
        (b" chunked ", True),
        (b"gzip, chunked", False),
        (b"chunked, chunked", False),
        (b"chunked;q=1", False),
        (b"identity", False),
        (b"", False),
    ],
)
def test_is_chunked_only(value: bytes, ok: bool) -> None:
    assert is_chunked_only(value) is ok


def test_headers_multimap() -> None:
    h = Headers()
    h.add(b"X-A", b"1")
    h.add(b"x-b", b"2")
    h.add(b"X-a", b"3")
    assert len(h) == 3
    assert h.get(b"x-a") == b"1"
    assert h.get(b"x-missing") is None
    assert h.get(b"x-missing", b"d") == b"d"
    assert h.get_all(b"x-a") == [b"1", b"3"]
    assert b"x-b" in h and b"x-c" not in h
    # raw spelling kept beside the lower-case name
    assert h.items[0] == (b"x-a", b"X-A", b"1")

    h.set(b"X-A", b"only")  # replaces every value, appended at the end
    assert h.get_all(b"x-a") == [b"only"]
    assert [raw for _, raw, _ in h.items] == [b"x-b", b"X-A"]

    h.remove(b"X-B")
    assert b"x-b" not in h and len(h) == 1
    h.remove(b"absent")
    assert len(h) == 1
    assert "X-A" in repr(h)


def test_headers_wraps_the_given_list() -> None:
    items = [(b"host", b"Host", b"h")]
    h = Headers(items)
    assert h.items is items
    assert h.get(b"host") == b"h"
    assert len(Headers()) == 0


# -- status lines -----------------------------------------------------------------------------
def test_status_lines() -> None:
    assert status_line(200) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(404, http10=True) == b"HTTP/1.0 404 Not Found\r\n"
    assert status_line(429) == b"HTTP/1.1 429 Too Many Requests\r\n"
    assert status_line(599) == b"HTTP/1.1 599 \r\n"  # unknown code: empty reason, still valid
    assert status_line(600) == b"HTTP/1.1 600 \r\n"
    assert STATUS_LINES_11[503] == b"HTTP/1.1 503 Service Unavailable\r\n"
    assert STATUS_LINES_10[204] == b"HTTP/1.0 204 No Content\r\n"
    assert len(STATUS_LINES_11) == len(STATUS_LINES_10) == 600
    assert status_line(201) is STATUS_LINES_11[201]  # precomputed, not rebuilt


def test_reason() -> None:
    assert reason(200) == "OK"
    assert reason(431) == "Request Header Fields Too Large"
    assert reason(799) == ""


@pytest.mark.parametrize(
    ("status", "method", "no_body"),
    [
        (200, b"GET", False),
        (200, b"HEAD", True),
        (404, b"HEAD", True),
        (100, b"GET", True),
        (103, b"GET", True),
        (204, b"GET", True),
        (304, b"GET", True),
        (205, b"GET", False),
        (500, b"POST", False),
    ],
)
def test_has_no_body(status: int, method: bytes, no_body: bool) -> None:
    assert has_no_body(status, method) is no_body


# -- error bodies -----------------------------------------------------------------------------
def test_error_body_shape() -> None:
    body = error_body(429, "rate_limited", 'too "many" requests', "rid-1")
    assert json.loads(body) == {
        "error": {
            "status": 429,
            "code": "rate_limited",
            "message": 'too "many" requests',
            "request_id": "rid-1",
        }
    }


def test_error_table() -> None:
    expected = {
        "bad_request": 400,
        "unauthorized": 401,
        "forbidden": 403,
        "no_route": 404,
        "request_timeout": 408,
        "payload_too_large": 413,
        "uri_too_long": 414,
        "rate_limited": 429,
        "header_fields_too_large": 431,
        "plugin_error": 500,
        "upstream_connect_failed": 502,
        "no_healthy_upstream": 503,
        "upstream_timeout": 504,
    }
    for code, status in expected.items():
        assert ERRORS[code][0] == status
    for code, (status, message) in ERRORS.items():
        assert 400 <= status < 600 and message, code
        assert code.isidentifier() and code == code.lower()


def test_header_lines_are_checked_and_serialised() -> None:
    lines = HeaderLines.of([(b"RateLimit", b'"a";r=1;t=2'), (b"X-Tag", b"b")])
    assert lines.items == (
        (b"ratelimit", b"RateLimit", b'"a";r=1;t=2'),
        (b"x-tag", b"X-Tag", b"b"),
    )
    assert lines.raw == b'RateLimit: "a";r=1;t=2\r\nX-Tag: b\r\n'
    both = lines + HeaderLines.of([(b"X-More", b"c")])
    assert both.raw == lines.raw + b"X-More: c\r\n" and len(both.items) == 3
    for name in (b"Content-Length", b"Connection", b"Date", b"Via", b"bad name", b""):
        with pytest.raises(ValueError, match="cannot be added"):
            HeaderLines.of([(name, b"1")])
    for value in (b"a\r\nX-Injected: 1", b"a\nb", b"a\0"):
        with pytest.raises(ValueError, match="line break or NUL"):
            HeaderLines.of([(b"X-Tag", value)])


def test_header_lines_built_from_bytes_alone_give_their_items_on_demand() -> None:
    lazy = HeaderLines(None, b"RateLimit-Policy: q=1\r\nX-Odd: a: b\r\n")
    assert lazy.items == (
        (b"ratelimit-policy", b"RateLimit-Policy", b"q=1"),
        (b"x-odd", b"X-Odd", b"a: b"),
    )
    both = HeaderLines.of([(b"X-A", b"1")]) + HeaderLines(None, b"X-B: 2\r\n")
    assert both.raw == b"X-A: 1\r\nX-B: 2\r\n"
    assert both.items == ((b"x-a", b"X-A", b"1"), (b"x-b", b"X-B", b"2"))
