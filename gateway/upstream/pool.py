"""Per-target pools of idle keep-alive connections.

One deque of idle connections per target (LIFO: the most recently used one is the least
likely to have been closed by the upstream's own idle timer). The server's periodic sweep
closes connections idle longer than ``idle_timeout`` — one timer for all pools, none per
connection. A connection is only ever put back when its last exchange ended cleanly.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.upstream.connection import UpstreamConnection


class Pool:
    __slots__ = ("_idle", "idle_timeout", "max_idle", "max_requests", "name")

    def __init__(self, name: str, max_idle: int, idle_timeout: float, max_requests: int) -> None:
        self.name = name
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_requests = max_requests
        self._idle: deque[UpstreamConnection] = deque()

    def acquire(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            # Open and not bound to an exchange (a method call costs here: runs per request).
            t = conn.transport
            if t is not None and not t.is_closing() and conn.exchange is None:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        if len(self._idle) >= self.max_idle or conn.requests >= self.max_requests:
            conn.close()
            return
        conn.idle_since = now
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        idle = self._idle
        deadline = now - self.idle_timeout
        while idle and idle[0].idle_since < deadline:
            idle.popleft().close()

    def close_all(self) -> None:
        while self._idle:
            self._idle.pop().close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def __repr__(self) -> str:
        return f"<Pool {self.name} [{len(self._idle)} idle]>"
