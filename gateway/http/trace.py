"""W3C Trace Context (``traceparent``): parse what a client sent, make the one sent upstream.

The gateway is a hop of the trace: it keeps the client's trace id and sampled flag, puts its
own span id in the parent-id field, and starts a new trace (sampled with the configured
ratio) when the header is absent or invalid. ``tracestate`` passes through untouched.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable

from gateway.speedups import compiled

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_rand = random.Random()
#: hex digits per refill of the random ids: 1,024 requests' worth
HEX_BLOCK = 48 * 1024


def hex_block() -> bytes:
    """Random hex digits, from ``os.urandom``, for the next 1,024 requests' ids."""
    return os.urandom(HEX_BLOCK // 2).hex().encode()


class _RandomHex:
    """Random hex digits drawn in bulk: slicing 48 of them per request costs a fraction of
    formatting fresh random bits each time. From ``os.urandom``."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def take48(self) -> bytes:
        pos = self._pos
        if pos + 48 > len(self._buf):
            self._buf = hex_block()
            pos = 0
        self._pos = pos + 48
        return self._buf[pos : pos + 48]


_hex = _RandomHex()


def parse(value: bytes) -> tuple[bytes, bytes] | None:
    """``(trace_id, flags)`` from a ``traceparent`` value, or None when it is invalid."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if m is None:
        return None
    version, trace_id, parent, flags, rest = m.groups()
    if version == b"ff" or (rest is not None and version == b"00"):
        return None
    if trace_id == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace_id, flags


def child_py(incoming: bytes | None, sample_ratio: float) -> tuple[bytes, bytes]:
    """``(trace_id, traceparent value)`` for the request sent upstream.

    The reference version: ``TraceChild`` (``gateway/_speedups.c``), compiled, does the same
    (``tests/unit/test_speedups_heads.py``); ``child`` is the one that runs."""
    parsed = parse(incoming) if incoming is not None else None
    # 32 hex digits of trace id (used only for a new trace), then 16 of span id. All zeros,
    # which the spec forbids, has odds of 2**-64 for a span id: not worth a branch.
    ids = _hex.take48()
    if parsed is not None:
        trace_id, flags = parsed
        # Only the sampled bit is defined for version 00; others are not ours to set.
        flags = b"01" if flags[1] in b"13579bdf" else b"00"
    else:
        trace_id = ids[:32]
        flags = b"01" if sample_ratio >= 1.0 or _rand.random() < sample_ratio else b"00"
    return trace_id, b"00-%b-%b-%b" % (trace_id, ids[32:], flags)


child: Callable[[bytes | None, float], tuple[bytes, bytes]] = (
    compiled.TraceChild(hex_block, _rand.random) if compiled is not None else child_py
)
