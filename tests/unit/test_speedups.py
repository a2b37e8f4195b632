"""The compiled fast paths (``gateway/_speedups.c``) against their pure-Python versions, and
the response-head reading they serve (``UpstreamConnection`` takes the fields from the raw
head bytes, however the reads split it).

The test command builds the extension (``scripts/test`` installs a C compiler when needed):
here it must be importable, so a broken build fails these tests instead of silently running
the slower Python versions.
"""

from __future__ import annotations

import subprocess
import sys
from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _speedups, speedups
from gateway.http.fields import (
    CHUNKED,
    HAS_DATE,
    HAS_REQUEST_ID,
    ODD_FIELDS,
    RequestFieldsPy,
    scan_fields_py,
)
from gateway.proxy import protocol
from gateway.state.shm import gcra_take_py
from gateway.upstream import connection
from gateway.upstream.connection import MAX_RESPONSE_HEAD
from tests.unit.test_flow_control import GET, Harness

NOTABLE = [
    "Content-Length",
    "Transfer-Encoding",
    "Connection",
    "Date",
    "X-Request-Id",
    "Keep-Alive",
    "Proxy-Connection",
    "Proxy-Authenticate",
    "Proxy-Authorization",
    "TE",
    "Trailer",
    "Upgrade",
    "Via",
    "Strict-Transport-Security",
]
TOKEN = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
                min_size=1, max_size=20)  # fmt: skip


@st.composite
def field_name(draw: st.DrawFn) -> str:
    """A notable name in any letter case (or one letter off), or any other token."""
    if draw(st.booleans()):
        return draw(TOKEN)
    name = draw(st.sampled_from(NOTABLE))
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    name = "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True))
    if draw(st.integers(0, 9)) == 0:  # near misses: a letter more or fewer
        name = name[:-1] if draw(st.booleans()) else name + "s"
    return name


VALUE = st.one_of(
    st.text(" \t!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijk"
            "lmnopqrstuvwxyz{|}~", max_size=30),
    st.sampled_from(["chunked", "gzip, chunked", " CHUNKED \t", "chunked, gzip", "12", "close",
                     "keep-alive", "Upgrade, x-secret", "chunkedx"]),
)  # fmt: skip


@st.composite
def field_lines(draw: st.DrawFn) -> bytes:
    fields = draw(st.lists(st.tuples(field_name(), VALUE), max_size=12))
    blank = draw(st.sampled_from(["", " ", "\t", "  "]))
    return "".join(f"{n}:{blank}{v}\r\n" for n, v in fields).encode("latin-1")


@given(field_lines())
@settings(max_examples=600, deadline=None)
def test_the_compiled_scan_agrees_with_the_python_one(fields: bytes) -> None:
    assert _speedups.scan_fields(fields) == scan_fields_py(fields)


@given(st.binary(max_size=300))
@settings(max_examples=600, deadline=None)
def test_the_compiled_scan_takes_any_bytes(data: bytes) -> None:
    for tail in (b"", b"\r\n"):
        data += tail
        if data == b"" or data.endswith(b"\r\n"):  # as field lines always end
            assert _speedups.scan_fields(data) == scan_fields_py(data)
        else:  # a precondition both check
            for scan in (_speedups.scan_fields, scan_fields_py):
                with pytest.raises(ValueError):
                    scan(data)


def test_scan_results() -> None:
    nginx = (
        b"Server: nginx\r\nDate: Sat, 28 Nov 2026 15:00:00 GMT\r\nContent-Type: text/plain\r\n"
        b'Content-Length: 12\r\nConnection: keep-alive\r\nETag: "a"\r\n'
    )
    for scan in (_speedups.scan_fields, scan_fields_py):
        plain = b'Server: nginx\r\nDate: Sat, 28 Nov 2026 15:00:00 GMT\r\nContent-Type: text/plain\r\nETag: "a"\r\n'  # noqa: E501
        assert scan(nginx) == (plain, b"12", b"keep-alive", HAS_DATE)
        assert scan(b"") == (b"", None, None, 0)
        only = b"A: 1\r\nB:2\r\n"
        out = scan(only)
        assert out == (only, None, None, 0) and out[0] is only  # nothing cut: the same object
        assert scan(b"connection: a\r\nX-Request-Id: r\r\nCONNECTION:\tb\r\n") == (
            b"X-Request-Id: r\r\n",
            None,
            b"a, b",
            HAS_REQUEST_ID,
        )
        # the last coding frames the body, as llhttp reads it
        assert scan(b"Transfer-Encoding: gzip, Chunked \r\n")[3] == CHUNKED
        assert scan(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n")[3] == 0
        assert scan(b"Via: 1.1 x\r\nKeep-Alive: timeout=5\r\n") == (b"", None, None, ODD_FIELDS)
    with pytest.raises(TypeError):
        _speedups.scan_fields("Date: x\r\n")  # type: ignore[arg-type]


def test_the_environment_variable_selects_the_python_versions() -> None:
    code = "from gateway import speedups; print(speedups.COMPILED)"
    for env, expect in (({}, "True"), ({"GATEWAY_NO_SPEEDUPS": "1"}, "False")):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={"PATH": "/usr/bin:/bin", **env},
        )  # fmt: skip
        assert out.stdout.strip() == expect
    assert speedups.COMPILED


# -- RequestFields: the client side's on_header --------------------------------------------------
class Reject(Exception):
    pass


REQUEST_NAMES = ["Host", "Content-Length", "Transfer-Encoding", "Connection", "Expect",
                 "X-Forwarded-For", "X-Request-Id", "X-Trace"]  # fmt: skip
STATE = ["size", "count", "host_count", "length_count", "te_count", "host", "length", "te",
         "expect", "rid", "connection", "xff", "items"]  # fmt: skip


def _state(fields: object) -> dict[str, object]:
    return {name: getattr(fields, name) for name in STATE}


@st.composite
def request_name(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(TOKEN).encode()
    name = draw(st.sampled_from(REQUEST_NAMES))
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True)).encode()


# a request: its fields (name, value), where its head ends (the rest are trailers), the limits
REQUESTS = st.tuples(
    st.lists(st.tuples(request_name(), st.binary(max_size=20)), max_size=12),
    st.integers(0, 12),
    st.integers(0, 300),
    st.integers(0, 12),
)


@given(st.lists(REQUESTS, min_size=1, max_size=3), st.sampled_from([b"x-request-id", b"x-trace"]))
@settings(max_examples=400, deadline=None)
def test_the_compiled_request_fields_agree_with_the_python_ones(
    requests: list[tuple[list[tuple[bytes, bytes]], int, int, int]], rid_name: bytes
) -> None:
    for fields, head_ends, max_bytes, max_count in requests:
        outcomes = []
        for make in (_speedups.RequestFields, RequestFieldsPy):
            rf = make(max_bytes, max_count, rid_name, Reject)
            items: list[tuple[bytes, bytes, bytes]] = []
            rf.reset(items)
            rf.size += 7  # the URL's bytes
            seen: list[object] = []
            for i, (name, value) in enumerate(fields):
                if i == head_ends:
                    rf.items = None
                try:
                    rf.on_header(name, value)
                except Reject as exc:
                    seen.append(exc.args)
                    break
            outcomes.append((seen, _state(rf), list(items)))
        assert outcomes[0] == outcomes[1]


def test_request_fields_keep_what_the_proxy_needs() -> None:
    for make in (_speedups.RequestFields, RequestFieldsPy):
        rf = make(1000, 10, b"x-request-id", Reject)
        items: list[tuple[bytes, bytes, bytes]] = []
        rf.reset(items)
        sent = [(b"Host", b"a"), (b"X-Forwarded-For", b"1.2.3.4"), (b"connection", b"close"),
                (b"X-REQUEST-ID", b"r1"), (b"x-forwarded-for", b"5.6.7.8"),
                (b"Content-Length", b"5")]  # fmt: skip
        for name, value in sent:
            rf.on_header(name, value)
        assert (rf.host, rf.host_count, rf.length, rf.length_count, rf.rid) == (
            b"a", 1, b"5", 1, b"r1"
        )  # fmt: skip
        assert rf.xff == [b"1.2.3.4", b"5.6.7.8"] and rf.connection == [b"close"]
        assert items[0] == (b"host", b"Host", b"a") and len(items) == 6
        assert rf.count == 6 and rf.size == sum(len(n) + len(v) + 4 for _, n, v in items)
        rf.items = None  # trailers: counted against the limits, not kept
        rf.on_header(b"X-Trailer", b"t")
        assert rf.count == 7 and len(items) == 6
        for _ in range(3):  # up to the limit of 10 fields
            rf.on_header(b"X-More", b"m")
        with pytest.raises(Reject) as exc:
            rf.on_header(b"X-More", b"m")
        assert exc.value.args == ("header_fields_too_large", "too many request header fields")
        with pytest.raises(Reject) as exc:
            rf.on_header(b"X-Big", b"b" * 1000)
        assert exc.value.args == ("header_fields_too_large",)
        rf.reset([])
        assert (rf.size, rf.count, rf.host, rf.rid, rf.xff, rf.connection) == (
            0, 0, b"", None, None, None
        )  # fmt: skip
    for make in (_speedups.RequestFields, RequestFieldsPy):
        rf = make(1, 10, b"x-request-id", lambda *args: "not an exception")
        rf.reset([])
        with pytest.raises(TypeError):
            rf.on_header(b"X-Big", b"too big")
    bare = _speedups.RequestFields.__new__(_speedups.RequestFields)
    with pytest.raises(RuntimeError):
        bare.on_header(b"a", b"b")  # not initialised: an error, not a crash
    with pytest.raises(TypeError):
        _speedups.RequestFields(1, 1, b"x", Reject).on_header("a", b"b")  # type: ignore[arg-type]


# -- the response head from raw bytes, however the reads split it -----------------------------
@pytest.fixture(params=["compiled", "python"])
def h(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    if request.param == "python":
        monkeypatch.setattr(connection, "scan_fields", scan_fields_py)
        monkeypatch.setattr(protocol, "RequestFields", RequestFieldsPy)
    harness = Harness()
    yield harness
    harness.client.connection_lost(None)


RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
    b"X-Custom: a b  \r\n\r\nhello"
)


def _client_response(h: Harness) -> bytes:
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\nhello"), out
    head = out.split(b"\r\n\r\n")[0].lower()
    assert b"server: s\r\n" in head and b"x-custom: a b  \r\n" in head
    assert head.count(b"content-length: 5\r\n") == 1 and b"connection:" not in head
    return out


@pytest.mark.parametrize("step", [1, 2, 7, 30])
def test_a_response_head_split_over_many_reads(h: Harness, step: int) -> None:
    up, ut = h.pooled_upstream()
    h.feed(GET)
    for i in range(0, len(RESPONSE), step):
        up.data_received(RESPONSE[i : i + step])
    _client_response(h)
    assert not ut.closing  # back in the pool
    h.feed(GET)  # and the next response, on the same connection, reads the same
    up.data_received(RESPONSE)
    _client_response(h)


def test_interim_responses_in_the_same_read_as_the_final_one(h: Harness) -> None:
    up, _ = h.pooled_upstream()
    h.feed(GET)
    up.data_received(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + RESPONSE
    )
    out = _client_response(h)
    assert b"link" not in out.lower()


def test_an_interim_response_saying_content_length_0_is_passed_over(h: Harness) -> None:
    # Not allowed in a 1xx either, but unambiguous: no content, the final head follows.
    up, _ = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n" + RESPONSE)
    _client_response(h)


def test_interim_response_split_from_the_final_one_mid_line(h: Harness) -> None:
    up, _ = h.pooled_upstream()
    h.feed(GET)
    up.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2")
    up.data_received(RESPONSE[10:])
    _client_response(h)


@pytest.mark.parametrize("blank_lines", [b"", b"\r\n\r\n\r\n"])
def test_an_endless_response_head_fails_the_exchange(h: Harness, blank_lines: bytes) -> None:
    # The limit counts from the status line: blank lines before it do not hide the head.
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(blank_lines + b"HTTP/1.1 200 OK\r\n")
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"
    for _ in range(MAX_RESPONSE_HEAD // len(line) + 1):
        if ut.aborted:
            break
        up.data_received(line)
    assert ut.aborted
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 502 ") and b"upstream_bad_response" in out


def test_blank_lines_before_a_status_line_are_not_kept(h: Harness) -> None:
    # llhttp skips them; kept, an upstream sending CRLFs forever would grow the buffer without
    # end, past the head limit (which counts from the status line).
    up, ut = h.pooled_upstream()
    h.feed(GET)
    for _ in range(40):
        up.data_received(b"\r\n" * 4096)
    assert len(up._acc) == 0 and not ut.aborted
    up.data_received(RESPONSE)
    _client_response(h)


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize(
    "interim",
    [
        b"HTTP/1.1 199 Odd\r\nContent-Length: 30\r\n\r\na\r\nSet-Cookie: injected=1\r\n\r\n",
        # an empty chunked body: no content bytes, but its trailer section follows the head
        b"HTTP/1.1 199 Odd\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nSet-Cookie: injected=1\r\n"
        b"\r\n",
    ],
)
def test_an_interim_response_framing_content_fails_the_exchange(
    h: Harness, split: bool, interim: bytes
) -> None:
    # A 1xx has no content and may not frame one; llhttp reads one when a 1xx says
    # Content-Length or chunked. What follows must not be taken for the final head (its
    # bytes could pose as header fields).
    up, ut = h.pooled_upstream()
    h.feed(GET)
    if split:
        up.data_received(interim[:20])
        up.data_received(interim[20:] + RESPONSE)
    else:
        up.data_received(interim + RESPONSE)
    out = h.ct.take()
    assert out.startswith(b"HTTP/1.1 502 ") and b"injected" not in out
    assert ut.aborted


@pytest.mark.parametrize(
    "bad",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello",  # bare LF line ends
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 5\r\n\r\nhello",  # folded
        b"HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 5\r\n\r\nhello",  # space before :
    ],
)
def test_heads_the_field_scan_could_misread_are_refused(h: Harness, bad: bytes) -> None:
    # scan_fields splits on CRLF and takes a field's name up to its colon: that matches
    # llhttp's reading only because llhttp refuses these (a lenient parser would break it).
    up, ut = h.pooled_upstream()
    h.feed(GET)
    up.data_received(bad)
    assert h.ct.take().startswith(b"HTTP/1.1 502 ") and ut.aborted


GC_REPLACES_ITEMS = """
import gc
from gateway import _speedups
class Reject(Exception): pass
rf = _speedups.RequestFields(10**9, 10**9, b"x", Reject)
armed, fired = False, []
def replace(phase, info):
    if phase == "start" and armed:
        fired.append(1)
        rf.items = None  # the last reference to the list the callback is appending to
gc.callbacks.append(replace)
for attempt in range(20):
    rf.reset(list(range(200_000)))  # full: the append reallocates the (freed) list's array
    gc.collect()
    gc.set_threshold(1)
    armed = True
    rf.on_header(b"a", b"b")
    armed = False
    gc.set_threshold(700)
    if fired:
        break
print("collections inside on_header:", len(fired))
"""


def test_a_collection_inside_on_header_cannot_free_the_list_it_appends_to() -> None:
    # An allocation can run the GC, and a gc callback, __del__ or weakref callback can replace
    # the fields' list: on_header holds its own reference (a use after free otherwise: a
    # crash, so the check runs in a child process).
    out = subprocess.run(
        [sys.executable, "-c", GC_REPLACES_ITEMS], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "collections inside on_header: 1"


# -- gcra_take: a bucket's take in the shared-memory table ---------------------------------------
I64 = st.integers(-(2**40), 2**40)


@given(
    st.lists(st.integers(-(2**40), 2**40), min_size=12, max_size=12),
    st.integers(0, 8),
    st.booleans(),
    I64,
    st.integers(0, 2**36),
    st.integers(0, 2**38),
    st.integers(0, 3),
)
@settings(max_examples=500, deadline=None)
def test_the_compiled_gcra_take_agrees_with_the_python_one(
    words: list[int], i: int, match: bool, now: int, step: int, tolerance: int, near: int
) -> None:
    if near:  # at the boundary: the wait exactly the tolerance, or one off either way
        tolerance = max(words[i + 3], now) + step - now + near - 2
    a, b = (words[i], words[i + 1]) if match else (words[i] + 1, words[i + 1])
    results = []
    for take in (_speedups.gcra_take, gcra_take_py):
        q = memoryview(bytearray(8 * len(words))).cast("q")
        q[:] = memoryview(array("q", words))
        results.append((take(q, i, a, b, now, step, tolerance), q.tolist()))
    assert results[0] == results[1]
    if not match:
        assert results[0][0] is None and results[0][1] == words


def test_gcra_take_results() -> None:
    for take in (_speedups.gcra_take, gcra_take_py):
        q = memoryview(bytearray(8 * 8)).cast("q")
        q[0], q[1], q[3] = 7, 9, 0  # a fresh bucket (TAT in the past)
        assert take(q, 0, 7, 9, 1000, 100, 250) == 100 and q[3] == 1100
        assert take(q, 0, 7, 9, 1000, 100, 250) == 200 and q[3] == 1200
        assert take(q, 0, 7, 9, 1000, 100, 250) == -1 - 200 and q[3] == 1200  # denied: wait 200
        assert take(q, 0, 7, 9, 1000, 100, 300) == 300 and q[3] == 1300  # the last token (=)
        assert take(q, 0, 7, 9, 1000, 100, 399) == -1 - 300 and q[3] == 1300  # one short
        assert take(q, 0, 7, 8, 1000, 100, 250) is None  # another key's slot
    q = memoryview(bytearray(8 * 8)).cast("q")
    q[0], q[1], q[3] = 7, 9, 2**63 - 10
    # beyond 64 bits, or outside the table: the caller's Python path decides
    assert _speedups.gcra_take(q, 0, 7, 9, 0, 100, 2**62) is None and q[3] == 2**63 - 10
    assert _speedups.gcra_take(q, 0, 7, 9, 2**64, 1, 1) is None
    assert _speedups.gcra_take(q, 5, 0, 0, 0, 1, 1) is None
    assert _speedups.gcra_take(q, -1, 0, 0, 0, 1, 1) is None
    with pytest.raises(BufferError):
        _speedups.gcra_take(bytes(64), 0, 0, 0, 0, 1, 1)
    for wrong in (bytearray(64), memoryview(bytearray(64)).cast("Q")):
        with pytest.raises(TypeError):  # the table's words only: 64-bit signed
            _speedups.gcra_take(wrong, 0, 0, 0, 0, 1, 1)  # type: ignore[arg-type]  # read-only


def test_an_older_build_of_the_extension_runs_the_python_versions() -> None:
    # A build from before this code (a name missing) must not break the imports: warned,
    # and the Python versions run.
    code = (
        "import sys, types; sys.modules['gateway._speedups'] = types.ModuleType('old'); "
        "from gateway import speedups; from gateway.http import fields; "
        "print(speedups.COMPILED, fields.scan_fields is fields.scan_fields_py)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False True"
    assert "older build" in out.stderr and "pip install -e ." in out.stderr
