"""Target health: active checks, passive outlier ejection, slow start. This file owns the
transitions of a target's availability (``Target.healthy``, ``Target.ejected``).

Theory of operation
-------------------
A target is *available* when its active check says healthy (or there is no active check)
and it is not ejected. Each worker keeps its own view (like Envoy's per-host state, unlike
nginx's shared zone): no cross-process traffic on the request path.

- **Active checks** (``health_check``): every ``interval`` (± ``jitter`` so that many gateways
  do not probe in lockstep) a GET to ``path`` with the control-plane client; a status in
  ``expected_statuses`` passes, anything else (or no answer within ``timeout``) fails.
  ``unhealthy`` failures in a row mark a target down, ``healthy`` passes in a row bring it
  back. A pass also returns an ejected target at once.
- **Passive ejection** (``outlier_detection``): ``consecutive_failures`` failed exchanges in a
  row (connect failure or timeout, reset before the response, read timeout, a 5xx status)
  eject the target for ``base_ejection x n`` (n = its ejections in a row, capped at
  ``max_ejection``). It returns on a timer, with or without an active check. At most
  ``max_ejected_percent`` of the targets are ejected at once (at least one may be).
- **All down**: the upstream fails open across all targets (``all_down: panic``, the default,
  as Envoy's panic threshold) or answers 503 ``no_healthy_upstream`` (``fail_fast``).
- **Slow start** (``slow_start``): a target that has just become available gets a share of
  its weight growing linearly from 10% to 100% over that time (the balancer is rebuilt once a
  second meanwhile; ``consistent_hash`` ignores it, as a weight change would move keys).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.control import client as control

if TYPE_CHECKING:
    from gateway.upstream.target import Target, Upstream

log = logging.getLogger("gateway.upstream")

#: Slow start begins at this share of the target's weight.
SLOW_START_FLOOR = 0.1
#: How often the balancer's weights are refreshed while a target is warming up.
SLOW_START_STEP = 1.0
#: Largest health-check response body read (the status is what counts).
CHECK_MAX_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ActiveCheck:
    path: str
    interval: float
    timeout: float
    healthy: int
    unhealthy: int
    statuses: frozenset[int]
    jitter: float  # a share of the interval, 0..1


@dataclass(frozen=True, slots=True)
class Outlier:
    consecutive: int  # 0: passive ejection off
    base: float
    cap: float
    max_share: float  # 0..1


class HealthPolicy:
    __slots__ = ("check", "fail_fast", "outlier", "slow_start")

    def __init__(
        self,
        check: ActiveCheck | None,
        outlier: Outlier,
        fail_fast: bool = False,
        slow_start: float = 0.0,
    ) -> None:
        self.check = check
        self.outlier = outlier
        self.fail_fast = fail_fast
        self.slow_start = slow_start

    def slow_start_weight(self, t: Target, now: float) -> int:
        """The target's weight while it warms up (``weight`` once ``slow_start`` has passed).
        Weights are scaled by 10 during the ramp so that 10% of weight 1 is still 1."""
        age = now - t.up_since
        if not t.up_since or age >= self.slow_start:
            return t.weight * 10
        share = max(SLOW_START_FLOOR, age / self.slow_start)
        return max(1, round(t.weight * 10 * share))


# -- transitions --------------------------------------------------------------------------
def _changed(t: Target, now: float) -> None:
    up = t.upstream
    if up is None:
        return
    up.rebuild(now)
    if up.stats is not None:
        up.stats.target_up(t)
    if t.available and up.health is not None and up.health.slow_start and t.up_since:
        _schedule_slow_start(up)


def _schedule_slow_start(up: Upstream) -> None:
    """Rebuild the balancer every second while some target is still warming up."""
    policy = up.health
    assert policy is not None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop (a unit test of the pure parts): weights stay as computed

    def step() -> None:
        now = time.monotonic()
        up.rebuild(now)
        if any(t.available and now - t.up_since < policy.slow_start for t in up.targets):
            loop.call_later(SLOW_START_STEP, step)

    loop.call_later(SLOW_START_STEP, step)


def passive_failure(t: Target) -> None:
    """A failed exchange (connect failure or timeout, reset, read timeout, 5xx)."""
    t.fails += 1
    t.watch_from = 0  # the next response resets the count
    up = t.upstream
    if up is None or up.health is None:
        return
    outlier = up.health.outlier
    if outlier.consecutive and t.fails >= outlier.consecutive and not t.ejected:
        eject(t, time.monotonic())


def eject(t: Target, now: float) -> bool:
    """Take ``t`` out for ``base x n`` (capped); refused beyond the ejected share."""
    up = t.upstream
    assert up is not None and up.health is not None
    outlier = up.health.outlier
    ejected = sum(1 for x in up.targets if x.ejected)
    allowed = max(1, int(outlier.max_share * len(up.targets)))
    if ejected >= allowed:
        return False
    if t.ejections and now - t.ejected_at > outlier.cap + outlier.base * t.ejections:
        t.ejections = 0  # well behaved since its last ejection: start over from base
    t.ejections += 1
    duration = min(outlier.base * t.ejections, outlier.cap)
    t.ejected = True
    t.ejected_at = now
    log.warning(
        "target ejected",
        extra={
            "upstream": up.name,
            "target": t.label,
            "seconds": duration,
            "consecutive_failures": t.fails,
        },
    )
    if up.stats is not None:
        up.stats.ejected(t)
    try:
        t.eject_timer = asyncio.get_running_loop().call_later(duration, unejected, t)
    except RuntimeError:
        t.eject_timer = None  # no loop: the caller returns it (unit tests of the pure parts)
    _changed(t, now)
    return True


def unejected(t: Target) -> None:
    """The ejection is over (its timer, or a passing active check)."""
    if t.eject_timer is not None:
        t.eject_timer.cancel()
        t.eject_timer = None
    if not t.ejected:
        return
    t.ejected = False
    t.fails = 0
    now = time.monotonic()
    t.up_since = now
    log.info("target returned", extra={"upstream": _name(t), "target": t.label})
    _changed(t, now)


def check_result(t: Target, ok: bool, check: ActiveCheck) -> None:
    """Apply one active check's outcome."""
    now = time.monotonic()
    if ok:
        t.check_oks += 1
        t.check_fails = 0
        if t.ejected:
            unejected(t)
        if not t.healthy and t.check_oks >= check.healthy:
            t.healthy = True
            t.fails = 0
            t.up_since = now
            log.info("target healthy", extra={"upstream": _name(t), "target": t.label})
            _changed(t, now)
    else:
        t.check_fails += 1
        t.check_oks = 0
        if t.healthy and t.check_fails >= check.unhealthy:
            t.healthy = False
            log.warning("target unhealthy", extra={"upstream": _name(t), "target": t.label})
            _changed(t, now)


def _name(t: Target) -> str:
    return t.upstream.name if t.upstream is not None else ""


# -- active checks -------------------------------------------------------------------------
async def probe(t: Target, check: ActiveCheck) -> bool:
    """One health check: True when the target answered an expected status in time."""
    if t.ssl is not None:
        # https: by the name the certificate is checked against (SNI), which resolves to the
        # service (maybe another of its addresses): the control client verifies by URL host.
        host = t.server_hostname or t.host
        url = f"https://{host}:{t.port}{check.path}"
    else:
        host = f"[{t.host}]" if ":" in t.host else t.host
        url = f"http://{host}:{t.port}{check.path}"
    try:
        resp = await control.request(
            "GET", url, timeout=check.timeout, ssl_context=t.ssl, max_body=CHECK_MAX_BODY
        )
    except OSError as exc:  # ControlError included
        log.debug("health check of %s failed: %s", t.label, exc)
        return False
    return resp.status in check.statuses


async def check_loop(up: Upstream, check: ActiveCheck, rng: random.Random) -> None:
    """Probe every target of ``up`` (they may change with DNS) forever, spreading the probes
    over the interval with jitter."""
    await asyncio.sleep(rng.random() * check.interval * max(check.jitter, 0.1))
    while True:
        targets = up.targets
        results = await asyncio.gather(*(probe(t, check) for t in targets))
        for t, ok in zip(targets, results, strict=True):
            if t.upstream is up:  # still one of the upstream's targets
                check_result(t, ok, check)
        spread = check.jitter * check.interval
        await asyncio.sleep(check.interval + (rng.random() * 2 - 1) * spread)
