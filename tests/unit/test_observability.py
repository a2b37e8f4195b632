"""Pure parts of observability: traceparent parsing and making, the metric children's
accumulate-then-flush against prometheus-client's own arithmetic."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from gateway import metrics
from gateway.http import trace

_names = itertools.count()
VALID = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_parse_valid_and_future_versions() -> None:
    assert trace.parse(VALID) == (b"0af7651916cd43dd8448eb211c80319c", b"01")
    assert trace.parse(b"  " + VALID + b" ") is not None  # OWS around the value
    # A later version may append fields after a dash; version 00 may not.
    assert trace.parse(b"01" + VALID[2:] + b"-what-ever") is not None
    assert trace.parse(VALID + b"-x") is None


def test_parse_rejects_invalid() -> None:
    bad = [
        b"",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        b"ff" + VALID[2:],  # version ff is forbidden
        VALID.replace(b"0af7", b"0AF7"),  # upper-case hex
        b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01",  # all-zero trace id
        b"00-0af7651916cd43dd8448eb211c80319c-" + b"0" * 16 + b"-01",  # all-zero parent
        b"00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
    ]
    for value in bad:
        assert trace.parse(value) is None, value


def test_child_keeps_trace_and_sampling_and_makes_new_span() -> None:
    trace_id, header = trace.child(VALID, 0.0)
    assert trace_id == b"0af7651916cd43dd8448eb211c80319c"
    version, tid, span, flags = header.split(b"-")
    assert (version, tid, flags) == (b"00", trace_id, b"01")
    assert span != b"b7ad6b7169203331" and len(span) == 16 and int(span, 16)
    # Unknown flag bits from a client are not passed on; the sampled bit is.
    _, header = trace.child(VALID[:-2] + b"03", 0.0)
    assert header.endswith(b"-01")


def test_child_starts_traces_with_the_sampling_ratio() -> None:
    assert trace.child(None, 1.0)[1].endswith(b"-01")
    assert trace.child(None, 0.0)[1].endswith(b"-00")
    assert trace.child(b"garbage", 1.0)[0] != b"0af7651916cd43dd8448eb211c80319c"
    sampled = sum(trace.child(None, 0.25)[1].endswith(b"-01") for _ in range(4000))
    assert 700 < sampled < 1300  # about a quarter (binomial sd ~27)
    ids = {trace.child(None, 1.0)[0] for _ in range(1000)}
    assert len(ids) == 1000
    assert all(trace.parse(trace.child(None, 1.0)[1]) for _ in range(100))


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=50))
@settings(deadline=None)  # an example is ~0.2 ms; a busy machine pausing one is not a failure
def test_histogram_flush_matches_prometheus_observe(values: list[float]) -> None:
    buckets = (0.001, 0.01, 0.1, 1.0, 10.0)
    reference = Histogram("ref", "ref", buckets=buckets, registry=CollectorRegistry())
    fam = metrics.histogram(f"unit_hist_{next(_names)}", "test", (), buckets)
    child = fam.labels()
    half = len(values) // 2
    for v in values[:half]:
        child.observe(v)
        reference.observe(v)
    child.flush()  # flushing twice in between must not double count
    for v in values[half:]:
        child.observe(v)
        reference.observe(v)
    child.flush()
    child.flush()
    ours = child._prom
    assert [b.get() for b in ours._buckets] == [b.get() for b in reference._buckets]
    assert abs(ours._sum.get() - reference._sum.get()) < 1e-6
    assert child.count == len(values)


def test_counter_and_gauge_flush_deltas() -> None:
    c = metrics.counter("unit_counter_total", "test", ("k",)).labels("a")
    assert c is metrics.counter("unit_counter_total", "test", ("k",)).labels("a")  # cached
    c.inc()
    c.inc(4)
    c.flush()
    c.flush()
    c.inc()
    metrics.flush()
    assert c._prom._value.get() == 6
    g = metrics.gauge("unit_gauge", "test", ()).labels()
    g.set(5)
    g.dec(2)
    g.flush()
    assert g._prom._value.get() == 3


def test_a_name_is_one_kind() -> None:
    metrics.counter("unit_kind_total", "test")
    try:
        metrics.gauge("unit_kind_total", "test")
    except ValueError as exc:
        assert "already defined as a counter" in str(exc)
    else:
        raise AssertionError("a gauge with a counter's name was accepted")
