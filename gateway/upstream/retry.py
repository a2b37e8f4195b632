"""Retries: when a failed attempt may be tried again, where, and after how long. Pure: no
asyncio; the client protocol schedules the attempt this module chooses.

A request is retried only when all of these hold (docs/load-balancing.md):

- the failure is one of the upstream's ``retries.retry_on`` conditions (``connect_failure``,
  ``reset``, ``timeout``, or a status such as 502, 503, 504);
- nothing of the response has reached the client (a 5xx is intercepted before its head is
  sent on);
- the method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE) or the request carries
  ``Idempotency-Key`` -- or the connect failed, so that nothing was sent (as nginx does);
- the body can be replayed: none, or every byte received so far kept in ``ex.replay`` (up to
  ``retries.max_body``; a larger body is streamed and never retried), or it never left the
  gateway (the connect failed);
- attempts remain (``retries.attempts`` counts the first one, one attempt per target), and
  a target that this request has not tried is available with room under its limit;
- the **retry budget** has a token: each request through the balancer deposits ``budget``
  tokens (20% by default) and ``min_per_second`` accrue per second (one second's worth at
  start), up to a cap of ``max(10, 10 x min_per_second)``; a retry takes one. In a full
  outage retries are therefore at most about ``budget`` x requests: an outage cannot
  multiply the load on the upstream.

The backoff before a retry is "full jitter": uniform in [0, min(max, base x 2^(n-1))].

Separately, an idempotent bodiless request whose *reused* keep-alive connection was closed
by the upstream before any response (the upstream's idle timer racing ours) is retried once
on a fresh connection at once: a stale connection says nothing about the target, so this
costs no budget, is not a passive failure, and may go to the same target.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from gateway.proxy.exchange import BODY_CHUNKED, BODY_NONE
from gateway.upstream.health import passive_failure

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.upstream.connection import UpstreamConnection
    from gateway.upstream.target import Target, Upstream

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
IDEMPOTENCY_KEY = b"idempotency-key"

#: Failure codes and the ``retries.retry_on`` condition each one is.
CONDITIONS = {
    "upstream_connect_failed": "connect_failure",
    "upstream_connect_timeout": "connect_failure",
    "upstream_reset": "reset",
    "upstream_timeout": "timeout",
}
#: Failures recorded against the target here (connect failures are recorded where they happen).
_PASSIVE = frozenset({"upstream_reset", "upstream_bad_response", "upstream_timeout"})


class RetryBudget:
    """Tokens for retries: ``ratio`` per request, ``min_per_second`` per second, capped."""

    __slots__ = ("_last", "_seen", "cap", "min_per_second", "ratio", "refused", "tokens")

    def __init__(self, ratio: float, min_per_second: float) -> None:
        self.ratio = ratio
        self.min_per_second = min_per_second
        # Enough for a burst after a quiet spell, never enough to amplify an outage.
        self.cap = max(10.0, 10 * min_per_second)
        self.tokens = min(self.cap, min_per_second)  # a second's worth of the floor to start
        self._seen = 0
        self._last = -1.0
        self.refused = 0

    def withdraw(self, requests: int, now: float) -> bool:
        """Take a token for one retry; ``requests`` is the upstream's running request count."""
        earned = (requests - self._seen) * self.ratio
        if self._last >= 0:
            earned += (now - self._last) * self.min_per_second
        self._seen = requests
        self._last = now
        self.tokens = min(self.cap, self.tokens + earned)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.refused += 1
        return False

    def status(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "tokens": round(self.tokens, 2), "refused": self.refused}


class RetryPolicy:
    __slots__ = (
        "attempts",
        "backoff_base",
        "backoff_max",
        "budget",
        "conditions",
        "max_body",
        "rng",
        "statuses",
    )

    def __init__(
        self,
        attempts: int,
        conditions: frozenset[str],
        statuses: frozenset[int],
        budget: RetryBudget,
        backoff_base: float = 0.025,
        backoff_max: float = 0.25,
        max_body: int = 64 * 1024,
        rng: random.Random | None = None,
    ) -> None:
        self.attempts = attempts
        self.conditions = conditions
        self.statuses = statuses
        self.budget = budget
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_body = max_body
        self.rng = rng or random.Random()

    def backoff(self, retry: int) -> float:
        """Full jitter before retry number ``retry`` (1-based)."""
        ceiling = min(self.backoff_max, self.backoff_base * (1 << min(retry - 1, 16)))
        return self.rng.random() * ceiling

    def wants_replay(self, ex: Exchange) -> bool:
        """Whether to keep the body of ``ex`` for a retry (decided when it is first sent)."""
        return (ex.body_kind == BODY_CHUNKED or ex.content_length <= self.max_body) and (
            ex.method in IDEMPOTENT or IDEMPOTENCY_KEY in ex.headers
        )


def failover(
    ex: Exchange,
    up: Upstream,
    code: str,
    status: int,
    conn: UpstreamConnection | None,
    now: float,
) -> tuple[Target, float] | None:
    """After attempt ``ex.retries`` failed (``code``, or a response ``status`` not yet sent on),
    the target and delay of the next attempt, or ``None`` to answer with the failure."""
    target = ex.upstream_target
    stale = (
        code == "upstream_reset"
        and conn is not None
        and conn.requests > 1
        and not conn.response_started
    )
    if target is not None and code in _PASSIVE and not stale:
        passive_failure(target)
    if ex.response_started or ex.conn.held is not None:
        return None
    if stale and not ex.retries and ex.body_kind == BODY_NONE and ex.method in IDEMPOTENT:
        fresh = up.pick(ex)
        return (fresh, 0.0) if fresh is not None else None
    policy = up.retry
    if policy is None:
        return None
    # The targets of the attempts that count (not stale-connection ones); unset until the
    # first retry, so that a request pays nothing for it (gateway.proxy.exchange).
    tried: tuple[Target, ...] = getattr(ex, "tried", ())
    if target is not None and target not in tried:
        tried = (*tried, target)
    if len(tried) >= policy.attempts:
        return None
    if status:
        if status not in policy.statuses:
            return None
    elif CONDITIONS.get(code) not in policy.conditions:
        return None
    # A failed connect sent nothing: any method may go elsewhere (as nginx does).
    if conn is not None and not (ex.method in IDEMPOTENT or IDEMPOTENCY_KEY in ex.headers):
        return None
    # The body: none; or never sent (a failed connect keeps it in body_buf); or kept whole.
    if ex.body_kind != BODY_NONE and conn is not None and ex.replay is None:
        return None
    ex.tried = tried
    nxt = up.pick_other(ex, tried)
    if nxt is None:
        return None
    if not policy.budget.withdraw(up.requests, now):
        if up.stats is not None:
            up.stats.budget_exhausted.inc()
        return None
    if up.stats is not None:
        up.stats.retries.inc()
    return nxt, policy.backoff(ex.retries + 1)
