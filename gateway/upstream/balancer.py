"""Balancers pick a target for each request. Pure: no asyncio, no sockets.

The seam: an upstream holds one ``Balancer``; ``pick()`` returns a target index. Further
strategies (least_conn, p2c_ewma, consistent_hash, random) plug in here by name.
"""

from __future__ import annotations

from collections.abc import Sequence


class Balancer:
    name = ""

    def pick(self) -> int:
        raise NotImplementedError


class RoundRobin(Balancer):
    """Smooth weighted round-robin, as nginx does it: with weights 5,1,1 the order is
    a a b a c a a, never a burst of five ``a`` in a row. With equal weights it is a plain cycle."""

    name = "round_robin"
    __slots__ = ("_current", "_n", "_next", "_total", "_weights")

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights:
            raise ValueError("a balancer needs at least one target")
        self._weights = tuple(weights)
        self._total = sum(weights)
        self._current = [0] * len(weights)
        self._n = len(weights)
        self._next = 0

    def pick(self) -> int:
        if self._n == 1:
            return 0
        if self._total == self._n:  # all weights equal: a counter is enough
            i = self._next
            self._next = (i + 1) % self._n
            return i
        current = self._current
        best = 0
        for i, w in enumerate(self._weights):
            current[i] += w
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return best


BALANCERS: dict[str, type[RoundRobin]] = {"round_robin": RoundRobin}
