"""W3C Trace Context (``traceparent``): parse what a client sent, make the one sent upstream.

The gateway is a hop of the trace: it keeps the client's trace id and sampled flag, puts its
own span id in the parent-id field, and starts a new trace (sampled with the configured
ratio) when the header is absent or invalid. ``tracestate`` passes through untouched.
"""

from __future__ import annotations

import random

_HEX = frozenset(b"0123456789abcdef")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16

_rand = random.Random()


def parse(value: bytes) -> tuple[bytes, bytes] | None:
    """``(trace_id, flags)`` from a ``traceparent`` value, or None when it is invalid."""
    v = value.strip()
    if len(v) < 55 or v[2:3] != b"-" or v[35:36] != b"-" or v[52:53] != b"-":
        return None
    version, trace_id, parent, flags = v[:2], v[3:35], v[36:52], v[53:55]
    if not (_HEX.issuperset(version) and version != b"ff"):
        return None
    if version == b"00" and len(v) != 55:
        return None
    if len(v) > 55 and v[55:56] != b"-":  # a later version may append fields after a dash
        return None
    if not (_HEX.issuperset(trace_id) and _HEX.issuperset(parent) and _HEX.issuperset(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, flags


def child(incoming: bytes | None, sample_ratio: float) -> tuple[bytes, bytes]:
    """``(trace_id, traceparent value)`` for the request sent upstream."""
    parsed = parse(incoming) if incoming is not None else None
    span = b"%016x" % (_rand.getrandbits(64) | 1)
    if parsed is not None:
        trace_id, flags = parsed
        # Only the sampled bit is defined for version 00; others are not ours to set.
        flags = b"01" if int(flags, 16) & 1 else b"00"
    else:
        trace_id = b"%032x" % (_rand.getrandbits(128) | 1)
        flags = b"01" if sample_ratio >= 1.0 or _rand.random() < sample_ratio else b"00"
    return trace_id, b"00-%b-%b-%b" % (trace_id, span, flags)
