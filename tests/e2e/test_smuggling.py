"""Request smuggling and ambiguous framing, end to end over raw sockets.

Every vector here is a request that a second parser (the upstream, a cache, another proxy)
could frame differently from the gateway. Each must be answered ``400`` with the JSON error
body and the connection closed, and nothing of it may reach the upstream. Requests sent
before the bad one on the same connection are answered normally; nothing after it is
forwarded. The path tests check that dot-segments are resolved before routing, so a route
cannot be bypassed with ``/public/../admin``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.client import Response, parse_responses
from tests.support.client import send_and_read as exchange
from tests.support.procs import GatewayProcess, UpstreamProcess


@pytest.fixture(scope="module")
def gw(
    upstream: UpstreamProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    tag = "x-route"
    config = {
        "upstreams": {"backend": {"targets": [{"url": upstream.url}]}},
        "routes": [
            {
                "name": "all",
                "match": {"path_prefix": "/"},
                "upstream": "backend",
                "plugins": [{"headers": {"request": {"set": {tag: "all"}}}}],
            },
            {
                "name": "public",
                "match": {"path_prefix": "/public"},
                "upstream": "backend",
                "plugins": [{"headers": {"request": {"set": {tag: "public"}}}}],
            },
            {
                "name": "admin",
                "match": {"path_prefix": "/admin"},
                "upstream": "backend",
                "plugins": [{"headers": {"request": {"set": {tag: "admin"}}}}],
            },
        ],
        "limits": {"header_timeout": "1s", "body_timeout": "1s", "idle_timeout": "2s"},
    }
    g = GatewayProcess(config, tmp_path_factory.mktemp("gw"))
    yield g
    g.stop()


def assert_error(resp: Response, status: int, code: str | None = None) -> None:
    assert resp.status == status, resp
    assert resp.header("content-type") == "application/json"
    err = resp.json()["error"]
    assert err["status"] == status
    if code is not None:
        assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    rid = resp.header("x-request-id")
    assert rid and err["request_id"] == rid


def assert_rejected(
    gw: GatewayProcess, upstream: UpstreamProcess, raw: bytes, forwarded_before: int = 0
) -> list[Response]:
    """``raw`` ends in a request that must get 400 + close; ``forwarded_before`` valid
    requests ahead of it are answered normally. Nothing else reaches the upstream."""
    upstream.reset()
    data, closed = exchange(gw.port, raw)
    responses = parse_responses(data)
    assert len(responses) == forwarded_before + 1, data
    for ok in responses[:-1]:
        assert ok.status == 200
    assert_error(responses[-1], 400)
    assert responses[-1].header("connection") == "close"
    assert closed, "the connection must be closed after a framing error"
    received = upstream.received()
    assert len(received) == forwarded_before, received
    assert gw.alive()
    return responses


def req(head: bytes, body: bytes = b"") -> bytes:
    """A request from a head written with ``\\n`` line ends (turned into CRLF)."""
    return head.replace(b"\n", b"\r\n") + b"\r\n" + body


# -- framing: Content-Length and Transfer-Encoding ------------------------------------------

CL_TE_VECTORS = {
    "cl_and_te": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: 6\nTransfer-Encoding: chunked\n", b"0\r\n\r\nG"
    ),
    "te_and_cl": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\nContent-Length: 3\n",
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
    ),
    "cl_and_te_identity": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: 5\nTransfer-Encoding: identity\n", b"hello"
    ),
    "duplicate_cl_same": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: 5\nContent-Length: 5\n", b"hello"
    ),
    "duplicate_cl_different": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: 0\nContent-Length: 44\n",
        b"GET /smuggled HTTP/1.1\r\nHost: t\r\nX: yyyyyy\r\n\r\n",
    ),
    "cl_list": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: 5, 5\n", b"hello"),
    "cl_negative": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: -1\n", b"hello"),
    "cl_plus": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: +5\n", b"hello"),
    "cl_hex": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: 0x5\n", b"hello"),
    "cl_space_inside": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: 1 0\n", b"helloworld"),
    "cl_empty": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: \n", b"hello"),
    "cl_exponent": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: 1e1\n", b"helloworld"),
    "cl_unicode_digit": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: \xd9\xa5\n", b"hello"),
    "cl_overflow_2_64": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: 18446744073709551616\n", b"hello"
    ),
    "cl_overflow_huge": req(
        b"POST /x HTTP/1.1\nHost: t\nContent-Length: " + b"9" * 40 + b"\n", b"hello"
    ),
    "cl_vertical_tab": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length: \x0b5\n", b"hello"),
    "te_gzip": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: gzip\n", b"0\r\n\r\n"),
    "te_chunked_gzip": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked, gzip\n", b"0\r\n\r\n"
    ),
    "te_gzip_chunked": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: gzip, chunked\n", b"0\r\n\r\n"
    ),
    "te_chunked_twice_one_header": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked, chunked\n", b"0\r\n\r\n"
    ),
    "te_chunked_two_headers": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\nTransfer-Encoding: chunked\n",
        b"0\r\n\r\n",
    ),
    "te_gzip_then_chunked_headers": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: gzip\nTransfer-Encoding: chunked\n",
        b"0\r\n\r\n",
    ),
    "te_xchunked": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: xchunked\n", b"0\r\n\r\n"),
    "te_chunkedx": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunkedx\n", b"0\r\n\r\n"),
    "te_chunked_param": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked;q=1\n", b"0\r\n\r\n"
    ),
    "te_quoted": req(b'POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: "chunked"\n', b"0\r\n\r\n"),
    "te_empty": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: \n", b"0\r\n\r\n"),
    "te_obs_fold": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding:\n chunked\n", b"0\r\n\r\n"),
    "te_obs_fold_after": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\n , gzip\n", b"0\r\n\r\n"
    ),
    "te_space_before_colon": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding : chunked\n", b"0\r\n\r\n"
    ),
    "te_leading_space_line": req(
        b"POST /x HTTP/1.1\nHost: t\n Transfer-Encoding: chunked\n", b"0\r\n\r\n"
    ),
    "te_vertical_tab": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding:\x0bchunked\n", b"0\r\n\r\n"
    ),
    "te_form_feed": req(
        b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: \x0cchunked\n", b"0\r\n\r\n"
    ),
    "te_nul": req(b"POST /x HTTP/1.1\nHost: t\nTransfer-Encoding: chunked\x00\n", b"0\r\n\r\n"),
    "te_http10": b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_http10_with_host": b"POST /x HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", CL_TE_VECTORS.values(), ids=CL_TE_VECTORS.keys())
def test_ambiguous_body_framing_is_rejected(
    gw: GatewayProcess, upstream: UpstreamProcess, raw: bytes
) -> None:
    assert_rejected(gw, upstream, raw)


# -- malformed header sections --------------------------------------------------------------

HEADER_VECTORS = {
    "obs_fold": req(b"GET /x HTTP/1.1\nHost: t\nX-Folded: a\n b\n"),
    "obs_fold_tab": req(b"GET /x HTTP/1.1\nHost: t\nX-Folded: a\n\tb\n"),
    "obs_fold_host": req(b"GET /x HTTP/1.1\nHost: t\n evil.example\n"),
    "bare_lf_everywhere": b"GET /x HTTP/1.1\nHost: t\n\n",
    "bare_lf_request_line": b"GET /x HTTP/1.1\nHost: t\r\n\r\n",
    "bare_lf_in_header": b"GET /x HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    "bare_lf_end_of_head": b"GET /x HTTP/1.1\r\nHost: t\r\n\n",
    "bare_cr_line_end": b"GET /x HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n",
    "cr_in_value": req(b"GET /x HTTP/1.1\nHost: t\nX-A: a\rb\n"),
    "nul_in_value": req(b"GET /x HTTP/1.1\nHost: t\nX-A: a\x00b\n"),
    "nul_in_name": req(b"GET /x HTTP/1.1\nHost: t\nX-\x00A: b\n"),
    "ctl_in_value": req(b"GET /x HTTP/1.1\nHost: t\nX-A: a\x01b\n"),
    "esc_in_value": req(b"GET /x HTTP/1.1\nHost: t\nX-A: a\x1bb\n"),
    "del_in_value": req(b"GET /x HTTP/1.1\nHost: t\nX-A: a\x7fb\n"),
    "del_in_name": req(b"GET /x HTTP/1.1\nHost: t\nX-\x7fA: b\n"),
    "space_in_name": req(b"GET /x HTTP/1.1\nHost: t\nX A: b\n"),
    "separator_in_name": req(b"GET /x HTTP/1.1\nHost: t\nX(A): b\n"),
    "empty_name": req(b"GET /x HTTP/1.1\nHost: t\n: b\n"),
    "no_colon": req(b"GET /x HTTP/1.1\nHost: t\nX-A b\n"),
    "space_before_colon": req(b"GET /x HTTP/1.1\nHost: t\nX-A : b\n"),
    "tab_before_colon": req(b"GET /x HTTP/1.1\nHost: t\nX-A\t: b\n"),
    "space_before_colon_host": req(b"GET /x HTTP/1.1\nHost : t\n"),
    "space_before_colon_cl": req(b"POST /x HTTP/1.1\nHost: t\nContent-Length : 5\n", b"hello"),
    "missing_host_http11": req(b"GET /x HTTP/1.1\n"),
    "duplicate_host_same": req(b"GET /x HTTP/1.1\nHost: t\nHost: t\n"),
    "duplicate_host_different": req(b"GET /x HTTP/1.1\nHost: t\nHost: evil.example\n"),
    "duplicate_host_case": req(b"GET /x HTTP/1.1\nHost: t\nhOsT: evil.example\n"),
    "absolute_form_conflicting_host": req(b"GET http://evil.example/x HTTP/1.1\nHost: t\n"),
    "fragment_in_target": req(b"GET /x#frag HTTP/1.1\nHost: t\n"),
    "nul_in_target": req(b"GET /x\x00y HTTP/1.1\nHost: t\n"),
    "space_in_target": req(b"GET /x y HTTP/1.1\nHost: t\n"),
    "bad_version": req(b"GET /x HTTP/1.1x\nHost: t\n"),
    "lowercase_version": req(b"GET /x http/1.1\nHost: t\n"),
    "asterisk_form_get": req(b"GET * HTTP/1.1\nHost: t\n"),
    "http09_request_line": b"GET /x\r\n\r\n",
    "http09_with_headers": b"GET /x\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    "http09_explicit": req(b"GET /x HTTP/0.9\nHost: t\n"),
    "http20_request_line": req(b"GET /x HTTP/2.0\nHost: t\n"),
    "http12_request_line": req(b"GET /x HTTP/1.2\nHost: t\n"),
    "h2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "userinfo_in_authority": req(b"GET http://user@t/x HTTP/1.1\nHost: t\n"),
}


@pytest.mark.parametrize("raw", HEADER_VECTORS.values(), ids=HEADER_VECTORS.keys())
def test_malformed_head_is_rejected(
    gw: GatewayProcess, upstream: UpstreamProcess, raw: bytes
) -> None:
    assert_rejected(gw, upstream, raw)


# -- chunked bodies -------------------------------------------------------------------------

_CHUNKED = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

CHUNK_VECTORS = {
    "size_not_hex": b"zz\r\nhello\r\n0\r\n\r\n",
    "size_negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "size_0x_prefix": b"0x5\r\nhello\r\n0\r\n\r\n",
    "size_plus": b"+5\r\nhello\r\n0\r\n\r\n",
    "size_empty": b"\r\nhello\r\n0\r\n\r\n",
    "size_overflow": b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n",
    "size_space_inside": b"5 5\r\nhello\r\n0\r\n\r\n",
    "size_leading_space": b" 5\r\nhello\r\n0\r\n\r\n",
    "size_bare_lf": b"5\nhello\r\n0\r\n\r\n",
    "data_longer_than_size": b"5\r\nhelloSMUGGLED\r\n0\r\n\r\n",
    "data_missing_crlf": b"5\r\nhello0\r\n\r\n",
    "data_bare_lf": b"5\r\nhello\n0\r\n\r\n",
    "ext_bare_lf": b"5;a=b\nhello\r\n0\r\n\r\n",
    "ext_bare_cr": b"5;a=b\rhello\r\n0\r\n\r\n",
    "ext_nul": b"5;a\x00=b\r\nhello\r\n0\r\n\r\n",
    "ext_ctl_in_quoted": b'5;a="\x01"\r\nhello\r\n0\r\n\r\n',
    "ext_separator_in_name": b"5;a(b)=c\r\nhello\r\n0\r\n\r\n",
    "last_chunk_ext_bare_lf": b"5\r\nhello\r\n0;a\n\r\n",
    "trailer_obs_fold": b"5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    "trailer_space_before_colon": b"5\r\nhello\r\n0\r\nX-T : a\r\n\r\n",
    "trailer_nul": b"5\r\nhello\r\n0\r\nX-T: a\x00\r\n\r\n",
}


@pytest.mark.parametrize("body", CHUNK_VECTORS.values(), ids=CHUNK_VECTORS.keys())
def test_invalid_chunked_body_is_rejected(
    gw: GatewayProcess, upstream: UpstreamProcess, body: bytes
) -> None:
    assert_rejected(gw, upstream, _CHUNKED + body)


def test_chunk_extensions_are_not_forwarded(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    """Valid extensions are parsed away: the gateway re-frames the body, so an extension
    cannot carry framing tricks to the upstream."""
    upstream.reset()
    raw = _CHUNKED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n") + (
        b'5;name=value;q="a;b\\"c"\r\nhello\r\n6;x\r\n world\r\n0;last=1\r\n\r\n'
    )
    data, closed = exchange(gw.port, raw)
    (resp,) = parse_responses(data)
    assert resp.status == 200
    assert resp.json()["body"] == "hello world"
    assert closed
    assert len(upstream.received()) == 1


# -- a bad request behind a good one --------------------------------------------------------

_GOOD = b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(
    "bad",
    [
        CL_TE_VECTORS["cl_and_te"],
        CL_TE_VECTORS["duplicate_cl_different"],
        CL_TE_VECTORS["te_gzip_chunked"],
        HEADER_VECTORS["obs_fold"],
        HEADER_VECTORS["duplicate_host_different"],
        _CHUNKED + CHUNK_VECTORS["size_not_hex"],
    ],
    ids=["cl_te", "dup_cl", "te_gzip_chunked", "obs_fold", "dup_host", "bad_chunk"],
)
def test_bad_request_pipelined_behind_a_good_one(
    gw: GatewayProcess, upstream: UpstreamProcess, bad: bytes
) -> None:
    responses = assert_rejected(gw, upstream, _GOOD + bad, forwarded_before=1)
    assert responses[0].json()["target"] == "/first"
    assert [r["target"] for r in upstream.received()] == ["/first"]


def test_requests_behind_a_rejected_one_are_not_forwarded(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    raw = (
        _GOOD
        + CL_TE_VECTORS["cl_and_te"]
        + b"GET /after HTTP/1.1\r\nHost: t\r\n\r\nGET /after2 HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    assert_rejected(gw, upstream, raw, forwarded_before=1)
    assert [r["target"] for r in upstream.received()] == ["/first"]


def test_cl_te_smuggled_prefix_never_reaches_upstream(
    gw: GatewayProcess, upstream: UpstreamProcess
) -> None:
    """The classic CL.TE attack: a front end honouring Content-Length would forward the
    whole body; a back end honouring chunked would see ``GET /admin`` as a second request."""
    smuggled = b"GET /admin HTTP/1.1\r\nHost: t\r\n\r\n"
    body = b"0\r\n\r\n" + smuggled
    raw = (
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s" % (len(body), body)
    )
    assert_rejected(gw, upstream, raw)


def test_valid_framing_still_works(gw: GatewayProcess, upstream: UpstreamProcess) -> None:
    """The strictness above must not refuse the legitimate forms next to each vector."""
    upstream.reset()
    raw = (
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length:  5 \r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: t\r\ntransfer-encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 005\r\n\r\nhello"
        b"GET http://t/d HTTP/1.1\r\nHost: t\r\n\r\n"
        b"GET http://T:80/e HTTP/1.1\r\nHost: t:80\r\n\r\n"
        b"GET /f HTTP/1.1\r\nHost: t\r\nX-Tab:\tv\t\r\nConnection: close\r\n\r\n"
    )
    data, closed = exchange(gw.port, raw)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200] * 6
    assert [r.json()["body_len"] for r in responses[:3]] == [5, 5, 5]
    assert closed
    assert [r["target"] for r in upstream.received()] == ["/a", "/b", "/c", "/d", "/e", "/f"]


# -- path normalisation before routing ------------------------------------------------------


def _route_seen(gw: GatewayProcess, target: bytes) -> tuple[str, str]:
    data, _ = exchange(gw.port, b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % target)
    (resp,) = parse_responses(data)
    assert resp.status == 200, resp
    seen = resp.json()
    route = [v for n, v in seen["headers"] if n.lower() == "x-route"]
    return route[0], seen["target"]


@pytest.mark.parametrize(
    ("target", "route", "forwarded"),
    [
        (b"/public/../admin", "admin", "/admin"),
        (b"/public/../admin/x?q=1", "admin", "/admin/x?q=1"),
        (b"/public/%2e%2e/admin", "admin", "/admin"),
        (b"/public/%2E%2e/admin", "admin", "/admin"),
        (b"/public/./../admin/", "admin", "/admin/"),
        (b"/admin/../public/x", "public", "/public/x"),
        (b"/public/./x", "public", "/public/x"),
        (b"/public/a/..", "public", "/public/"),
        (b"/x/../..%2fadmin", "all", "/..%2fadmin"),
    ],
)
def test_dot_segments_are_resolved_before_routing(
    gw: GatewayProcess, target: bytes, route: str, forwarded: str
) -> None:
    assert _route_seen(gw, target) == (route, forwarded)


@pytest.mark.parametrize(
    "target",
    [
        b"/../x",
        b"/..",
        b"/public/../../admin",
        b"/%2e%2e/admin",
        b"/a/./../../b",
    ],
)
def test_paths_climbing_above_the_root_are_rejected(
    gw: GatewayProcess, upstream: UpstreamProcess, target: bytes
) -> None:
    assert_rejected(gw, upstream, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
