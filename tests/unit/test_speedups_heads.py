"""The compiled heads (``gateway._speedups.Heads``) and trace ids (``TraceChild``) against
their pure-Python versions (``gateway.proxy.forward.request_head_py``/``response_head_py``,
``gateway.http.trace.child_py``): the same bytes, the same exchange state after, the same
exceptions, over generated exchanges, header lists and configurations.

The compiled attribute reads cache a ``__slots__`` member's offset per type; the tests also
run them on objects whose class changes between calls, and on plain (dict) objects.
"""

from __future__ import annotations

import inspect
import ipaddress
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import _speedups
from gateway.http import trace
from gateway.http.fields import HAS_DATE, HAS_REQUEST_ID
from gateway.http.headers import FieldLines, HeaderLines, Headers, connection_tokens
from gateway.http.status import STATUS_LINES_10, STATUS_LINES_11, status_line
from gateway.proxy import forward
from gateway.proxy.exchange import BODY_CHUNKED, BODY_LENGTH, BODY_NONE, Exchange
from gateway.proxy.forward import Forwarding, request_head_py, response_head_py

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class Conn:
    """What the heads read of a client connection."""

    __slots__ = ("client_ip", "hsts", "peer_ip_bytes", "scheme", "tls_client")

    def __init__(self, peer: bytes, scheme: bytes, hsts: bytes, cert: object) -> None:
        self.client_ip = peer.decode()
        self.peer_ip_bytes = peer
        self.scheme = scheme
        self.hsts = hsts
        self.tls_client = cert


class Cert:
    __slots__ = ("header_block", "vars")

    def __init__(self, block: bytes) -> None:
        self.header_block = block
        self.vars: dict[str, Any] = {}


class Route:
    __slots__ = ("preserve_host",)

    def __init__(self, preserve: bool) -> None:
        self.preserve_host = preserve


class Target:
    __slots__ = ("host_header",)

    def __init__(self, host: bytes) -> None:
        self.host_header = host


class Upstream:
    """What ``response_head`` reads of an upstream connection."""

    __slots__ = ("field_flags", "plain")

    def __init__(self, plain: bytes, flags: int) -> None:
        self.plain = plain
        self.field_flags = flags


def _child(incoming: bytes | None, ratio: float) -> tuple[bytes, bytes]:
    """A deterministic trace.child: what it was given shows in the value."""
    tid = (b"%032x" % (len(incoming) if incoming is not None else 7))[:32]
    return tid, b"00-%b-%016x-%s" % (tid, int(ratio * 1000), b"01" if incoming else b"00")


def heads(child: Callable[[bytes | None, float], tuple[bytes, bytes]] = _child) -> Any:
    return _speedups.Heads(
        status_lines_10=STATUS_LINES_10,
        status_lines_11=STATUS_LINES_11,
        status_line=status_line,
        plain_connection=forward._PLAIN_CONNECTION,
        connection_tokens=connection_tokens,
        response_skip=forward._RESPONSE_SKIP,
        response_skip_hsts=forward._RESPONSE_SKIP_HSTS,
        trace_child=child,
        body_chunked=BODY_CHUNKED,
        has_date=HAS_DATE,
        has_request_id=HAS_REQUEST_ID,
    )


@pytest.fixture
def python_trace() -> Iterator[None]:
    """request_head_py calls trace.child: the deterministic one, as the compiled Heads."""
    with mock.patch.object(trace, "child", _child):
        yield


NAMES = [
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"via", b"traceparent",
    b"host", b"content-length", b"expect", b"x-request-id", b"connection", b"keep-alive",
    b"transfer-encoding", b"te", b"upgrade", b"date", b"x-secret", b"accept", b"server",
    b"strict-transport-security", b"x-client-cert-subject",
]  # fmt: skip
VALUE = st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
TRACEPARENTS = st.sampled_from(
    [
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b" 01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02-x ",
        b"garbage",
    ]
)


@st.composite
def header(draw: st.DrawFn) -> tuple[bytes, bytes, bytes]:
    lname = draw(st.sampled_from(NAMES) | st.binary(min_size=1, max_size=6))
    raw = lname.title() if draw(st.booleans()) else lname
    value = draw(TRACEPARENTS) if lname == b"traceparent" else draw(VALUE)
    return lname, raw, value


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[Exchange, Target, bytes, bool, Forwarding]:
    cert = Cert(b"x-client-cert-subject: CN=a\r\n") if draw(st.booleans()) else None
    conn = Conn(
        draw(st.sampled_from([b"127.0.0.1", b"::1", b""])),
        draw(st.sampled_from([b"http", b"https"])),
        draw(st.sampled_from([b"", b"strict-transport-security: max-age=60\r\n"])),
        cert,
    )
    ex = Exchange(conn)  # type: ignore[arg-type]
    ex.method = draw(st.sampled_from([b"GET", b"POST", b"OPTIONS"]))
    ex.query = draw(st.sampled_from([b"", b"a=1"]))
    ex.url = b"/p" + (b"?" if draw(st.booleans()) else b"") + ex.query
    ex.headers = Headers(draw(st.lists(header(), max_size=10)))
    ex.host = draw(st.sampled_from([b"", b"example.com", b"h:8080"]))
    ex.route = draw(st.sampled_from([None, Route(True), Route(False)]))  # type: ignore[arg-type]
    ex.body_kind = draw(st.sampled_from([BODY_NONE, BODY_LENGTH, BODY_CHUNKED]))
    ex.length_header = draw(st.sampled_from([None, b"0", b"12"]))
    ex.request_id = draw(st.sampled_from(["r-1", "abc.def:9"]))
    if draw(st.booleans()):
        ex.traceparent = b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"  # a retry's
    fwd = Forwarding(
        [ipaddress.ip_network("127.0.0.0/8")],
        draw(st.sampled_from([None, "gw"])),
        draw(st.sampled_from(["X-Request-Id", "X-Trace"])),
        trace=draw(st.booleans()),
        sample_ratio=draw(st.sampled_from([0.0, 0.5, 1.0])),
        identity_headers=["X-Client-Cert-Subject"] if cert else [],
    )
    target = Target(draw(st.sampled_from([b"up:80", b"10.0.0.1"])))
    path = draw(st.sampled_from([b"/p", b"/", b"/up/p"]))
    return ex, target, path, draw(st.booleans()), fwd


def _state(ex: Exchange) -> tuple[object, ...]:
    return ex.trace_id, ex.traceparent, ex.headers.items


def _twin(args: tuple[Exchange, Target, bytes, bool, Forwarding]) -> tuple[Any, ...]:
    """The same arguments with an exchange of its own (the head sets trace state on it)."""
    ex, *rest = args
    copy = Exchange(ex.conn)
    for name in Exchange.__slots__:
        if hasattr(ex, name):
            setattr(copy, name, getattr(ex, name))
    copy.headers = Headers(list(ex.headers.items))
    return (copy, *rest)


@given(exchanges())
@settings(max_examples=800, deadline=None)
def test_the_compiled_request_head_agrees_with_the_python_one(
    args: tuple[Exchange, Target, bytes, bool, Forwarding],
) -> None:
    other = _twin(args)
    with mock.patch.object(trace, "child", _child):
        assert heads().request_head(*args) == request_head_py(*other)
    assert _state(args[0]) == _state(other[0])


@st.composite
def responses(draw: st.DrawFn) -> tuple[tuple[Any, ...], dict[str, Any]]:
    conn = Conn(
        b"127.0.0.1",
        b"http",
        draw(st.sampled_from([b"", b"strict-transport-security: max-age=60\r\n"])),
        None,
    )
    ex = Exchange(conn)  # type: ignore[arg-type]
    ex.status = draw(st.sampled_from([200, 101, 204, 304, 404, 502, 599]) | st.integers(0, 1200))
    ex.http10 = draw(st.booleans())
    ex.keep_alive = draw(st.booleans())
    ex.request_id = "rid-1"
    items = draw(st.lists(header(), max_size=10))
    if draw(st.booleans()):
        ex.response_headers = Headers(items)
    else:  # the lazy kind, made from lines (read through its property)
        ex.response_headers = FieldLines(b"".join(b"%s: %s\r\n" % (r, v) for _, r, v in items))
    fwd = Forwarding(
        [], draw(st.sampled_from([None, "gw"])), draw(st.sampled_from(["X-Request-Id", "Date"]))
    )
    upstream = None
    if draw(st.booleans()):
        upstream = Upstream(b"Server: up\r\n", draw(st.sampled_from([0, HAS_DATE, 3, 6])))
    connection = draw(
        st.sampled_from([None, b"keep-alive", b"close", b"x-secret", b"Accept, X-Secret", b""])
    )
    args = (
        ex,
        draw(st.sampled_from([None, b"0", b"12"])),
        draw(st.booleans()),
        fwd,
        b"date: Sun, 29 Nov 2026 00:00:00 GMT\r\n",
    )
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["connection"] = connection
    if draw(st.booleans()):
        kwargs["extra"] = draw(st.sampled_from([b"", b"ratelimit: limit=1\r\n"]))
    if draw(st.booleans()):
        kwargs["upstream"] = upstream
    return args, kwargs


@given(responses())
@settings(max_examples=800, deadline=None)
def test_the_compiled_response_head_agrees_with_the_python_one(
    call: tuple[tuple[Any, ...], dict[str, Any]],
) -> None:
    args, kwargs = call
    assert heads().response_head(*args, **kwargs) == response_head_py(*args, **kwargs)


def _response() -> tuple[Exchange, bytes | None, bool, Forwarding, bytes]:
    ex = Exchange(Conn(b"127.0.0.1", b"http", b"", None))  # type: ignore[arg-type]
    ex.status, ex.request_id = 200, "rid-2"
    return ex, b"5", False, Forwarding([], "gw", "X-Request-Id"), b"date: x\r\n"


def test_response_head_arguments_positional_or_by_name() -> None:
    ex, length, chunked, fwd, date = _response()
    h = heads()
    up = Upstream(b"A: b\r\n", 0)
    positional = h.response_head(ex, length, chunked, fwd, date, None, b"x: y\r\n", up)
    assert positional == response_head_py(ex, length, chunked, fwd, date, None, b"x: y\r\n", up)
    assert positional == h.response_head(
        ex, length, chunked, fwd=fwd, date=date, upstream=up, extra=b"x: y\r\n"
    )
    with pytest.raises(TypeError, match="date"):
        h.response_head(ex, length, chunked, fwd)
    with pytest.raises(TypeError, match="nope"):
        h.response_head(ex, length, chunked, fwd, date, nope=1)
    with pytest.raises(TypeError, match="'ex'"):  # given twice
        h.response_head(ex, length, chunked, fwd, date, ex=ex)
    with pytest.raises(TypeError):
        h.response_head(ex, length, chunked, fwd, date, None, b"", None, 9)
    with pytest.raises(TypeError):
        h.request_head(ex, Target(b"h"), b"/")
    with pytest.raises(RuntimeError, match="__init__"):
        _speedups.Heads.__new__(_speedups.Heads).request_head(1, 2, 3, 4, 5)


def _bad_exchanges() -> Iterator[tuple[str, Callable[[Exchange], None], type[Exception]]]:
    yield "str value", lambda ex: ex.headers.add(b"Accept", "text"), TypeError  # type: ignore[arg-type]
    yield "int value", lambda ex: ex.headers.add(b"Accept", 5), TypeError  # type: ignore[arg-type]
    yield "short triple", lambda ex: ex.headers.items.append((b"a", b"A")), ValueError  # type: ignore[arg-type]
    yield "no triple", lambda ex: ex.headers.items.append(7), TypeError  # type: ignore[arg-type]
    yield "unhashable", lambda ex: ex.headers.items.append((bytearray(b"a"), b"A", b"1")), TypeError  # type: ignore[arg-type]
    yield "str host", lambda ex: setattr(ex, "host", "example.com"), TypeError
    yield "bytes id", lambda ex: setattr(ex, "request_id", b"r"), AttributeError


@pytest.mark.parametrize(
    "what,edit,error", list(_bad_exchanges()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_bad_exchange_fails_both_alike(
    python_trace: None, what: str, edit: Callable[[Exchange], None], error: type[Exception]
) -> None:
    for head in (heads().request_head, request_head_py):
        ex = Exchange(Conn(b"10.0.0.1", b"http", b"", None))  # type: ignore[arg-type]
        ex.method, ex.url, ex.host, ex.route = b"GET", b"/", b"h", Route(True)  # type: ignore[assignment]
        edit(ex)
        with pytest.raises(error):
            head(ex, Target(b"t"), b"/", False, Forwarding([], "gw", "X-Request-Id"))


def test_bytes_like_values_are_taken_as_b_join_takes_them(python_trace: None) -> None:
    outs = []
    for head in (heads().request_head, request_head_py):
        ex = Exchange(Conn(b"10.0.0.1", b"http", b"", None))  # type: ignore[arg-type]
        ex.method, ex.url, ex.host = b"GET", b"/", b"h"
        ex.headers.items.append((b"a", bytearray(b"A"), memoryview(b"v")))  # type: ignore[arg-type]
        outs.append(head(ex, Target(b"t"), b"/", False, Forwarding([], None, "X-Request-Id")))
    assert outs[0] == outs[1] and b"\r\nA: v\r\n" in outs[0]


class Slotted:
    __slots__ = ("host_header",)


def test_a_cached_attribute_read_follows_its_class_changing(python_trace: None) -> None:
    # The compiled reads cache a slot's offset per type; a class changed since must be read
    # afresh: here the attribute becomes a property, then goes back to the slot.
    h = heads()

    def both(target: object) -> bytes:
        ex = Exchange(Conn(b"10.0.0.1", b"http", b"", None))  # type: ignore[arg-type]
        ex.method, ex.url = b"GET", b"/"
        fwd = Forwarding([], None, "X-Request-Id", trace=False)
        out = h.request_head(ex, target, b"/", False, fwd)
        assert out == request_head_py(ex, target, b"/", False, fwd)  # type: ignore[arg-type]
        return out.rsplit(b"host: ", 1)[1]

    t = Slotted()
    t.host_header = b"slot"
    assert both(t) == b"slot\r\n\r\n"
    assert both(t) == b"slot\r\n\r\n"  # cached now
    slot = Slotted.__dict__["host_header"]
    Slotted.host_header = property(lambda self: b"prop")  # type: ignore[assignment,method-assign]
    try:
        assert both(t) == b"prop\r\n\r\n"
    finally:
        Slotted.host_header = slot  # type: ignore[method-assign]
    assert both(t) == b"slot\r\n\r\n"
    del t.host_header  # an unset slot: its AttributeError, from the cached path too
    with pytest.raises(AttributeError):
        h.request_head(Exchange(Conn(b"", b"http", b"", None)), t, b"/", False,  # type: ignore[arg-type]
                       Forwarding([], None, "X-Request-Id", trace=False))  # fmt: skip
    # objects without slots, and a class that reads attributes its own way
    assert both(SimpleNamespace(host_header=b"ns")) == b"ns\r\n\r\n"

    class Dynamic:
        def __getattr__(self, name: str) -> bytes:
            return b"dyn"

    assert both(Dynamic()) == b"dyn\r\n\r\n"


def test_header_lines_from_plugins_follow_the_response_own() -> None:
    ex, length, chunked, fwd, date = _response()
    ex.response_headers = Headers([(b"server", b"Server", b"up")])
    extra = HeaderLines.of([(b"RateLimit", b"limit=1, remaining=0")]).raw
    out = heads().response_head(ex, length, chunked, fwd, date, extra=extra)
    assert out == response_head_py(ex, length, chunked, fwd, date, extra=extra)
    assert out.index(b"Server: up") < out.index(b"RateLimit: limit=1")


# -- TraceChild: trace.child_py compiled ------------------------------------------------------


class Blocks:
    """hex_block for both versions: the same digits in the same order."""

    def __init__(self) -> None:
        self.rng = random.Random(7)

    def __call__(self) -> bytes:
        return bytes(self.rng.choice(b"0123456789abcdef") for _ in range(48 * 3))


INCOMING = st.one_of(
    st.none(),
    TRACEPARENTS,
    st.builds(
        lambda v, t, p, f, rest, pad: pad + b"-".join([v, t, p, f]) + rest + pad,
        st.sampled_from([b"00", b"01", b"ff", b"0g", b"0"]),
        st.sampled_from([b"0" * 32, b"a" * 32, b"A" * 32, b"0af7651916cd43dd8448eb211c80319c"]),
        st.sampled_from([b"0" * 16, b"b" * 16, b"b" * 15]),
        st.sampled_from([b"00", b"01", b"03", b"0b", b"0c", b"ff", b"1"]),
        st.sampled_from([b"", b"-", b"-x", b"-x\ny", b"x", b"-\r"]),
        st.sampled_from([b"", b" ", b"\t\r\n", b"\x0b\x0c"]),
    ),
    st.binary(max_size=70),
)


@given(st.lists(st.tuples(INCOMING, st.sampled_from([0.0, 0.3, 0.5, 1.0, 2.0])), max_size=8))
@settings(max_examples=400, deadline=None)
def test_the_compiled_trace_child_agrees_with_the_python_one(
    calls: list[tuple[bytes | None, float]],
) -> None:
    compiled = _speedups.TraceChild(Blocks(), random.Random(3).random)
    with (
        mock.patch.object(trace, "hex_block", Blocks()),
        mock.patch.object(trace, "_hex", trace._RandomHex()),
        mock.patch.object(trace, "_rand", random.Random(3)),
    ):
        for incoming, ratio in calls:
            assert compiled(incoming, ratio) == trace.child_py(incoming, ratio)


def test_trace_child_results() -> None:
    child = trace.child
    assert isinstance(child, _speedups.TraceChild)  # the compiled one runs
    tid, value = child(None, 1.0)
    assert trace.parse(value) == (tid, b"01") and len(value) == 55
    kept = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"
    tid, value = child(kept, 0.0)
    assert tid == kept[3:35] and value.startswith(kept[:36]) and value.endswith(b"-01")
    assert value[36:52] != kept[36:52]  # our own span id
    assert child(None, 0.0)[1].endswith(b"-00")
    assert len({child(None, 1.0)[0] for _ in range(3000)}) == 3000  # across refills
    with pytest.raises(TypeError):
        child("00-x", 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        child(None, "1")  # type: ignore[arg-type]
    for bad in (lambda: b"abc", lambda: "x" * 48):
        with pytest.raises(ValueError, match="48"):
            _speedups.TraceChild(bad, random.random)(None, 1.0)
    with pytest.raises(RuntimeError, match="__init__"):
        _speedups.TraceChild.__new__(_speedups.TraceChild)(None, 1.0)


def test_the_compiled_request_head_runs_the_compiled_trace_child() -> None:
    # Heads calls a TraceChild directly, not through Python: the state it leaves is the same
    ex = Exchange(Conn(b"10.0.0.1", b"http", b"", None))  # type: ignore[arg-type]
    ex.method, ex.url = b"GET", b"/"
    ex.headers.add(b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    out = heads(trace.child).request_head(
        ex, Target(b"t"), b"/", False, Forwarding([], None, "X-Request-Id")
    )
    assert ex.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert ex.traceparent is not None and b"traceparent: " + ex.traceparent + b"\r\n" in out
    assert trace.parse(ex.traceparent) == (ex.trace_id.encode(), b"01")


# -- review regressions: references, foreign descriptors, Python code run mid-head ------------


def _ex(cert: object = None) -> Exchange:
    ex = Exchange(Conn(b"10.0.0.1", b"http", b"", cert))  # type: ignore[arg-type]
    ex.method, ex.url, ex.host, ex.route = b"GET", b"/", b"h", Route(True)  # type: ignore[assignment]
    ex.request_id, ex.status, ex.http10, ex.keep_alive = "r-1", 200, False, True
    return ex


def test_request_head_keeps_no_reference_to_the_client_certificate_block() -> None:
    cert = Cert(b"x-client-cert-subject: CN=a\r\n")
    ex, fwd = _ex(cert), Forwarding([], None, "X-Request-Id", trace=False)
    before = sys.getrefcount(cert.header_block)
    for _ in range(100):
        heads().request_head(ex, Target(b"t"), b"/", False, fwd)  # type: ignore[arg-type]
    after = sys.getrefcount(cert.header_block)  # not inside assert: its rewriting holds one
    assert after == before


def test_response_head_keeps_no_reference_to_the_connection() -> None:
    ex = _ex()
    ex.response_headers = Headers([(b"via", b"Via", b"1.1 a"), (b"via", b"Via", b"1.1 b")])
    fwd = Forwarding([], "gw", "X-Request-Id")
    before = sys.getrefcount(ex.conn)
    for _ in range(100):
        out = heads().response_head(ex, b"0", False, fwd, b"date: x\r\n")
    after = sys.getrefcount(ex.conn)
    assert after == before
    assert out == response_head_py(ex, b"0", False, fwd, b"date: x\r\n")


def test_a_failing_request_head_leaves_the_trace_state_python_leaves() -> None:
    # b"".join is the last step of request_head_py: ex.traceparent is set before it fails
    states = []
    for head in (heads().request_head, request_head_py):
        ex = _ex()
        ex.headers.add(b"Accept", "text")  # type: ignore[arg-type]
        with mock.patch.object(trace, "child", _child), pytest.raises(TypeError):
            head(ex, Target(b"t"), b"/", False, Forwarding([], "gw", "X-Request-Id"))  # type: ignore[arg-type]
        states.append((ex.trace_id, ex.traceparent))
    assert states[0] == states[1] and states[0][1] is not None


def test_heads_and_trace_child_are_initialised_once() -> None:
    h = heads()
    with pytest.raises(TypeError):
        h.__init__(**{})  # type: ignore[misc]
    with pytest.raises(TypeError, match="once"):
        h.__init__(  # type: ignore[misc]
            status_lines_10=(b"",) * 600, status_lines_11=(b"",) * 600, status_line=None,
            plain_connection=frozenset(), connection_tokens=None, response_skip=frozenset(),
            response_skip_hsts=frozenset(), trace_child=None, body_chunked=0, has_date=1,
            has_request_id=2,
        )  # fmt: skip
    with pytest.raises(TypeError, match="once"):
        trace.child.__init__(trace.hex_block, lambda: 0.5)  # type: ignore[misc]


CRASHES = {
    "foreign member descriptor": """
        class Big:
            __slots__ = ("a0",)
        class Small(int):  # Big's a0 offset, read in an int: its digit count, not an object
            __slots__ = ()
        Small.host_header = Big.__dict__["a0"]  # what member_get refuses (a TypeError)
        for _ in range(3):
            ex = _ex(); ex.route = None
            try:
                fwd = Forwarding([], None, "X-Request-Id")
                heads().request_head(ex, Small(10**30), b"/", False, fwd)
            except TypeError:
                pass
        print("ok")
    """,
    "a header whose __iter__ drops it": """
        ex = _ex()
        class T:
            __slots__ = ()
            def __iter__(self):
                ex.headers.items.clear()
                return iter((b"accept", b"Accept", b"x"))
            def __length_hint__(self):
                return 3
        ex.headers.items.append(T())
        heads().request_head(ex, Target(b"t"), b"/", False, Forwarding([], None, "X-Request-Id"))
        print("ok")
    """,
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_no_crash(name: str) -> None:
    code = (
        "import inspect, sys; sys.path.insert(0, 'tests/unit')\n"
        "from test_speedups_heads import Cert, Conn, Route, Target, heads\n"
        "from gateway.proxy.exchange import Exchange\n"
        "from gateway.proxy.forward import Forwarding\n"
        + inspect.getsource(_ex)
        + textwrap.dedent(CRASHES[name])
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# -- SlotDefaults: an exchange's starting values in one call ----------------------------------


def _slots(ex: Exchange) -> dict[str, object]:
    return {n: getattr(ex, n) for n in Exchange.__slots__ if hasattr(ex, n)}


def test_an_exchange_starts_with_every_slot_set_but_tried() -> None:
    from gateway.proxy import exchange

    conn = Conn(b"10.0.0.1", b"http", b"", Cert(b""))
    conn.tls_client.vars["tls.client_subject"] = "CN=a"  # type: ignore[attr-defined]
    ex = Exchange(conn)  # type: ignore[arg-type]
    assert set(Exchange.__slots__) - set(_slots(ex)) == {"tried"}
    assert ex.vars == {"tls.client_subject": "CN=a"} and ex.conn is conn
    # the compiled filler and the Python one leave the same values
    py = Exchange.__new__(Exchange)
    exchange.fill_defaults_py(py)
    compiled = Exchange.__new__(Exchange)
    exchange._fill_defaults(compiled)
    assert isinstance(exchange._fill_defaults, _speedups.SlotDefaults)
    assert _slots(py) == _slots(compiled) == exchange.EXCHANGE_DEFAULTS
    # refilled: the values are replaced, and the old ones released
    compiled.url = b"/x"
    exchange._fill_defaults(compiled)
    assert compiled.url == b""


def test_slot_defaults_refuses_what_is_not_a_slot() -> None:
    class Plain:
        x = 1

    class Slotted:
        __slots__ = ("a", "b")

    with pytest.raises(ValueError, match="'x'"):
        _speedups.SlotDefaults(Plain, {"x": 1})
    with pytest.raises(ValueError, match="'c'"):
        _speedups.SlotDefaults(Slotted, {"a": 1, "c": 2})
    with pytest.raises(ValueError, match="__slots__"):
        _speedups.SlotDefaults(Slotted, {1: 2})
    with pytest.raises(ValueError, match="'start'"):  # a read-only member
        _speedups.SlotDefaults(slice, {"start": 2})
    fill = _speedups.SlotDefaults(Slotted, {"a": [1], "b": None})
    with pytest.raises(TypeError, match="Slotted"):
        fill(Plain())
    with pytest.raises(TypeError):
        fill()
    with pytest.raises(TypeError, match="once"):
        fill.__init__(Slotted, {})  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="__init__"):
        _speedups.SlotDefaults.__new__(_speedups.SlotDefaults)(Slotted())

    class Sub(Slotted):
        __slots__ = ("c",)

    obj = Sub()
    fill(obj)  # a subclass has the same slots where they were
    assert obj.a == [1] and obj.a is fill_value(fill, obj) and obj.b is None


def fill_value(fill: Any, obj: Any) -> object:
    """The value the filler wrote (the same object each time: defaults are shared)."""
    other = type(obj)()
    fill(other)
    return other.a
