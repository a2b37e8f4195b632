# The compiled fast paths (gateway/_speedups.c); gateway/speedups.py says where their Python
# versions are (they document them). RequestFields has RequestFieldsPy's interface (it is not
# a subclass: only the type checker sees them as one).
from collections.abc import Callable
from typing import Any

from gateway.http.fields import RequestFieldsPy as RequestFields
from gateway.proxy.exchange import Exchange
from gateway.proxy.forward import Forwarding
from gateway.upstream.connection import UpstreamConnection
from gateway.upstream.target import Target

__all__ = ["Heads", "RequestFields", "SlotDefaults", "TraceChild", "gcra_take", "scan_fields"]

def scan_fields(fields: bytes, /) -> tuple[bytes, bytes | None, bytes | None, int]: ...
def gcra_take(
    words: memoryview, i: int, a: int, b: int, now: int, step: int, tolerance: int, /
) -> int | None: ...

class Heads:
    def __init__(
        self,
        *,
        status_lines_10: tuple[bytes, ...],
        status_lines_11: tuple[bytes, ...],
        status_line: Callable[[int, bool], bytes],
        plain_connection: frozenset[bytes],
        connection_tokens: Callable[[bytes], list[bytes]],
        response_skip: frozenset[bytes],
        response_skip_hsts: frozenset[bytes],
        trace_child: Callable[[bytes | None, float], tuple[bytes, bytes]],
        body_chunked: int,
        has_date: int,
        has_request_id: int,
    ) -> None: ...
    def request_head(
        self, ex: Exchange, target: Target, path: bytes, trusted_peer: bool, fwd: Forwarding, /
    ) -> bytes: ...
    def response_head(
        self,
        ex: Exchange,
        content_length: bytes | None,
        chunked: bool,
        fwd: Forwarding,
        date: bytes,
        connection: bytes | None = None,
        extra: bytes = b"",
        upstream: UpstreamConnection | None = None,
    ) -> bytes: ...

class TraceChild:
    def __init__(self, hex_block: Callable[[], bytes], random: Callable[[], float]) -> None: ...
    def __call__(self, incoming: bytes | None, sample_ratio: float) -> tuple[bytes, bytes]: ...

class SlotDefaults:
    def __init__(self, cls: type, defaults: dict[str, Any]) -> None: ...
    def __call__(self, obj: object, /) -> None: ...
