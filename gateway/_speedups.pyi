# The compiled fast paths (gateway/_speedups.c); gateway/speedups.py says where their Python
# versions are (they document them). RequestFields has RequestFieldsPy's interface (it is not
# a subclass: only the type checker sees them as one).
from gateway.http.fields import RequestFieldsPy as RequestFields

__all__ = ["RequestFields", "gcra_take", "scan_fields"]

def scan_fields(fields: bytes, /) -> tuple[bytes, bytes | None, bytes | None, int]: ...
def gcra_take(
    words: memoryview, i: int, a: int, b: int, now: int, step: int, tolerance: int, /
) -> int | None: ...
