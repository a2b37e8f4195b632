"""Token-bucket arithmetic as GCRA (the generic cell rate algorithm), sans-IO.

A bucket of ``burst`` tokens refilled at ``count`` tokens per ``period`` is stored as one number,
its *theoretical arrival time* (TAT): the instant at which the bucket would be full again. With
``interval`` = period / count (the time one token takes to refill) and ``tolerance`` =
burst * interval, taking ``cost`` tokens at ``now`` is allowed when

    max(tat, now) + cost * interval - now <= tolerance

and then sets ``tat = max(tat, now) + cost * interval``. An idle bucket needs no state at all:
``tat <= now`` means "full", so expired entries can be dropped at any time (this is what keeps
the shared-memory table and the Redis keys bounded).

Times are integer microseconds (``TICKS_PER_SECOND``), in the shared-memory table and in Redis
alike, so that ``burst`` requests arriving in one instant fit exactly, with no float rounding at
the edge.

Several limits on one request are checked together: the request is admitted only if every
limit admits it, and a refused request consumes from none of them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

TICKS_PER_SECOND = 1_000_000

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600}
_UNITS |= {"hour": 3600, "d": 86400, "day": 86400}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


def parse_rate(text: str) -> tuple[int, int]:
    """``"100/s"``, ``"6000/m"``, ``"10/5s"``, ``"1000/hour"`` -> (count, period in seconds)."""
    m = _RATE_RE.match(text.lower())
    if m is None or m.group(3) not in _UNITS:
        raise ValueError(
            f"invalid rate {text!r}: expected COUNT/UNIT such as 100/s, 6000/m, 10/5s, 1000/h"
        )
    count = int(m.group(1))
    period = int(m.group(2) or 1) * _UNITS[m.group(3)]
    if count < 1 or period < 1:
        raise ValueError(f"invalid rate {text!r}: count and period must be positive")
    return count, period


class Limit:
    """One token bucket's shape, in ticks. Immutable after construction."""

    __slots__ = ("burst", "count", "interval", "name", "period", "tolerance")

    def __init__(self, count: int, period: float, burst: int, name: str = "") -> None:
        if count < 1 or period <= 0 or burst < 1:
            raise ValueError("count, period and burst must be positive")
        self.count = count
        self.period = period
        self.burst = burst
        self.name = name
        #: ticks per token (at least 1: rates above a million per second are refused at load)
        self.interval = max(1, round(period * TICKS_PER_SECOND / count))
        self.tolerance = burst * self.interval

    def scaled(self, divisor: int) -> Limit:
        """This limit shared among ``divisor`` nodes: rate and burst divided (at least 1)."""
        if divisor <= 1:
            return self
        count = max(1, self.count // divisor)
        return Limit(count, self.period, max(1, self.burst // divisor), self.name)

    def remaining(self, wait: int) -> int:
        """Tokens left when the bucket's TAT is ``wait`` ticks ahead of now."""
        left = (self.tolerance - wait) // self.interval
        return left if left > 0 else 0

    def __repr__(self) -> str:
        return f"<Limit {self.count}/{self.period}s burst={self.burst}>"


def take(tats: list[int], now: int, cost: int, limits: Sequence[Limit]) -> tuple[bool, list[int]]:
    """Try to take ``cost`` tokens from every bucket; ``tats`` is updated in place if allowed.

    Returns ``(allowed, waits)``: ``waits[i]`` is how far bucket ``i``'s TAT is ahead of ``now``
    after the operation (after the take when allowed, unchanged when refused). A cost of 0
    only reads.
    """
    allowed = True
    waits = []
    for i, limit in enumerate(limits):
        tat = tats[i]
        if tat < now:
            tat = now
        new = tat + cost * limit.interval
        if new - now > limit.tolerance:
            allowed = False
        waits.append(new - now)
    if allowed:
        for i, w in enumerate(waits):
            tats[i] = now + w
        return True, waits
    return False, [max(t - now, 0) for t in tats]


def retry_after(waits: Sequence[int], cost: int, limits: Sequence[Limit]) -> int:
    """Ticks until a refused request of ``cost`` would be admitted by every limit (0 if now).

    A cost larger than a limit's burst can never be admitted; its wait is reported as the time
    to refill the whole bucket.
    """
    longest = 0
    for wait, limit in zip(waits, limits, strict=True):
        need = wait + min(cost, limit.burst) * limit.interval - limit.tolerance
        if need > longest:
            longest = need
    return longest


def reset_after(wait: int, limit: Limit) -> int:
    """Ticks for the ``t`` of the RateLimit header: until the next token when none is left
    (so that it agrees with Retry-After), else until the bucket is full again."""
    if limit.remaining(wait) == 0:
        need = wait + limit.interval - limit.tolerance
        return need if need > 0 else 0
    return wait
