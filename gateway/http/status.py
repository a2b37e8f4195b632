"""Status lines and reason phrases, precomputed once for every code 100..599."""

from __future__ import annotations

from http import HTTPStatus

_REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}


def reason(status: int) -> str:
    return _REASONS.get(status, "")


def _line(version: bytes, status: int) -> bytes:
    return b"HTTP/%s %d %s\r\n" % (version, status, reason(status).encode("ascii"))


#: ``STATUS_LINES_11[code]`` is the full ``HTTP/1.1 NNN Reason\r\n`` line.
STATUS_LINES_11: tuple[bytes, ...] = tuple(_line(b"1.1", code) for code in range(600))
STATUS_LINES_10: tuple[bytes, ...] = tuple(_line(b"1.0", code) for code in range(600))


def status_line(status: int, http10: bool = False) -> bytes:
    table = STATUS_LINES_10 if http10 else STATUS_LINES_11
    if 100 <= status < 600:
        return table[status]
    return _line(b"1.0" if http10 else b"1.1", status)


def has_no_body(status: int, method: bytes) -> bool:
    """Whether a response with this status to this method carries no body (RFC 9112 6.3)."""
    return method == b"HEAD" or status < 200 or status == 204 or status == 304
