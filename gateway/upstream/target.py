"""Runtime upstreams and targets, compiled from config once.

A ``Target`` is one address (``host`` is what is connected to; ``hostname`` is the name in the
config, used for ``Host`` and, with TLS, for SNI) with its idle-connection pool and the
counters the balancers and the circuit breaker read: ``in_flight`` (requests bound to one of
its connections), ``connecting`` (connections being opened), ``connections`` (open ones).
They are plain ints bumped by ``gateway.upstream.connection`` and ``gateway.proxy.forward``.

An ``Upstream`` holds its targets and a balancer built over the *available* ones (healthy,
not ejected). Availability changes (``gateway.upstream.health``, the DNS refresh in
``gateway.upstream.discovery``) call ``rebuild()``; a request only calls ``pick()``. With one
target there is no balancer on the hot path at all (``single``).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.upstream.balancer import Balancer, KeyFunction, RoundRobin
from gateway.upstream.discovery import TargetFactory, TargetSpec, refresh, refresh_loop
from gateway.upstream.health import check_loop, passive_failure
from gateway.upstream.pool import Pool

if TYPE_CHECKING:
    import ssl

    from gateway.proxy.exchange import Exchange
    from gateway.upstream.health import HealthPolicy
    from gateway.upstream.retry import RetryPolicy

#: How often p2c_ewma's latency estimates decay (seconds).
EWMA_DECAY_TICK = 1.0

#: Upper bound of the per-target limits when none is configured.
UNLIMITED = 1 << 30
#: How fast an idle target's peak-EWMA latency forgets (seconds); p2c_ewma only.
EWMA_DECAY = 10.0
#: A target's latency estimate before it has answered anything, and the floor it decays to:
#: small, so new and recovered targets get tried.
EWMA_INITIAL = 0.001


class Target:
    """One address of an upstream, with its idle-connection pool and live counters."""

    __slots__ = (
        "builtin",
        "check_fails",
        "check_oks",
        "connecting",
        "connections",
        "counted",
        "eject_timer",
        "ejected",
        "ejected_at",
        "ejections",
        "ewma",
        "ewma_at",
        "fails",
        "healthy",
        "host",
        "host_header",
        "hostname",
        "in_flight",
        "label",
        "limit",
        "pool",
        "port",
        "server_hostname",
        "spec_index",
        "ssl",
        "track_latency",
        "up_since",
        "upstream",
        "watch_from",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        weight: int,
        pool: Pool,
        builtin: str = "",
        hostname: str | None = None,
        limit: int = UNLIMITED,
        spec_index: int = 0,
    ) -> None:
        self.spec_index = spec_index  # which targets[] entry it comes from
        self.host = host
        self.port = port
        self.weight = weight
        self.pool = pool
        self.builtin = builtin  # "echo" for the built-in demo upstream, bound at start
        self.hostname = hostname or host
        self.set_address(host, port)
        #: Most requests in flight (sent or waiting for a new connection); the circuit breaker.
        self.limit = limit
        #: Whether ``in_flight`` is kept (the balancer or the circuit breaker reads it): a
        #: plain round-robin target pays nothing per request for it.
        self.counted = limit < UNLIMITED
        self.in_flight = 0
        self.connecting = 0
        self.connections = 0
        self.track_latency = False
        #: Response statuses from which ``observe_response`` runs: 500 (passive health sees
        #: only failures), or 0 while failures are counted or latency is tracked.
        self.watch_from = 500
        self.ewma = EWMA_INITIAL
        self.ewma_at = 0.0
        # Health (gateway.upstream.health owns these transitions).
        self.healthy = True  # the active check's verdict
        self.ejected = False  # passive: out for a while after consecutive failures
        self.fails = 0  # consecutive failed exchanges (passive)
        self.check_oks = 0  # consecutive passed / failed active checks
        self.check_fails = 0
        self.ejections = 0  # ejections in a row, for base x n
        self.ejected_at = 0.0
        self.eject_timer: asyncio.TimerHandle | None = None
        self.up_since = 0.0  # when it last became available (slow start)
        self.upstream: Upstream | None = None
        # https targets (set by the compiler): the client context, and the name sent as SNI
        # and checked against the certificate. Both None for plain http.
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname: str | None = None

    def set_address(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        name = self.hostname
        name = f"[{name}]" if ":" in name else name
        self.host_header = (name if port == 80 else f"{name}:{port}").encode("ascii")
        addr = f"[{host}]" if ":" in host else host
        self.label = f"{addr}:{port}" if name.strip("[]") == host else f"{name}:{port}@{addr}"

    @property
    def available(self) -> bool:
        return self.healthy and not self.ejected

    def observe_response(self, status: int) -> None:
        """A 5xx, or any response while failures are being counted: passive health."""
        if status >= 500:
            passive_failure(self)
        elif self.fails:
            self.fails = 0
        self.watch_from = 0 if self.fails else 500

    def observe_latency(self, seconds: float, now: float) -> None:
        """Peak EWMA (Finagle's): a slower sample replaces the estimate at once, a faster one
        halves the distance to it; with no samples the estimate decays (``decayed_latency``)."""
        ewma = self.decayed_latency(now)
        self.ewma = seconds if seconds > ewma else ewma * 0.5 + seconds * 0.5

    def decayed_latency(self, now: float) -> float:
        """The estimate, decayed towards zero for the time nothing was observed: a target
        avoided for being slow is tried again after a few ``EWMA_DECAY`` seconds."""
        elapsed = now - self.ewma_at
        if elapsed > 0.0:
            # Towards a floor, not zero: with no latency left the in-flight count still counts.
            self.ewma = EWMA_INITIAL + (self.ewma - EWMA_INITIAL) * math.exp(-elapsed / EWMA_DECAY)
            self.ewma_at = now
        return self.ewma

    def status(self) -> dict[str, Any]:
        return {
            "target": self.label,
            "weight": self.weight,
            "healthy": self.healthy,
            "ejected": self.ejected,
            "available": self.available,
            "in_flight": self.connecting
            + (self.in_flight if self.counted else self.connections - self.pool.idle_count),
            "connections": self.connections,
            "idle": self.pool.idle_count,
            "consecutive_failures": self.fails,
        }

    def __repr__(self) -> str:
        return f"<Target {self.label}>"


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    connect: float
    read: float
    #: From the first attempt to the response head, retries and backoff included; 0: none.
    total: float = 0.0


class Upstream:
    """Targets, the balancer over the available ones, and the policies compiled for them.

    ``pick(ex)`` returns a target, or ``None`` with the reason in ``refusal``
    (``no_healthy_upstream`` when everything is down and ``all_down`` is ``fail_fast``;
    ``upstream_overloaded`` when every candidate is at its circuit-breaker limit).
    """

    __slots__ = (
        "_tasks",
        "balancer",
        "balancer_class",
        "hash_key",
        "health",
        "limited",
        "make_target",
        "name",
        "panic",
        "refusal",
        "requests",
        "resolve_interval",
        "retry",
        "single",
        "specs",
        "stats",
        "targets",
        "timeouts",
    )

    def __init__(
        self,
        name: str,
        targets: tuple[Target, ...],
        timeouts: UpstreamTimeouts,
        balancer_class: type[Balancer] = RoundRobin,
        hash_key: KeyFunction | None = None,
        health: HealthPolicy | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.name = name
        self.timeouts = timeouts
        self.balancer_class = balancer_class
        self.hash_key = hash_key
        self.health = health
        self.retry = retry
        self.requests = 0  # picks through the balancer (the retry budget's denominator)
        self.refusal = ""
        self.panic = False
        self.stats: Any = None  # gateway.upstream.stats.UpstreamStats, bound by the compiler
        self.targets: tuple[Target, ...] = ()
        self.single: Target | None = None
        self.limited = False  # some target has a circuit-breaker limit
        self.balancer: Balancer | None = None
        self.specs: tuple[TargetSpec, ...] = ()
        self.make_target: TargetFactory | None = None
        self.resolve_interval = 30.0
        self._tasks: list[asyncio.Task[None]] = []
        self.set_targets(targets)

    # -- a worker's lifetime ---------------------------------------------------------------
    async def start(self) -> None:
        """Resolve host names (bounded), then start DNS refreshes and active health checks."""
        loop = asyncio.get_running_loop()
        if self.make_target is not None and not all(s.literal for s in self.specs):
            await refresh(self, self.specs, self.make_target)
            self._tasks.append(
                loop.create_task(
                    refresh_loop(self, self.specs, self.make_target, self.resolve_interval)
                )
            )
        if self.stats is not None:
            for t in self.targets:
                self.stats.target_up(t)
        if self.balancer_class.needs_latency:
            self._tasks.append(loop.create_task(self._decay_latencies()))
        check = self.health.check if self.health is not None else None
        if check is not None:
            self._tasks.append(loop.create_task(check_loop(self, check, random.Random())))

    async def _decay_latencies(self) -> None:
        """p2c_ewma: every target's latency estimate decays once a second, so that one avoided
        for being slow (and so getting no samples) is tried again after a while."""
        while True:
            await asyncio.sleep(EWMA_DECAY_TICK)
            now = time.monotonic()
            for t in self.targets:
                t.decayed_latency(now)

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for t in self.targets:
            if t.eject_timer is not None:
                t.eject_timer.cancel()
                t.eject_timer = None

    # -- the hot path ----------------------------------------------------------------------
    def pick(self, ex: Exchange) -> Target | None:
        # One Python call per level (this, the balancer's pick): each costs ~400 instructions
        # under callgrind, the whole balancer budget is ~3% of a request (~4k).
        t = self.single  # one target, no circuit-breaker limit: nothing to decide
        if t is not None:
            return t
        balancer = self.balancer
        if balancer is None:
            self.refusal = "no_healthy_upstream"
            return None
        self.requests += 1
        t = balancer.pick(ex)
        if not self.limited or t.in_flight + t.connecting < t.limit:
            return t
        return self._overflow(balancer)

    def _overflow(self, balancer: Balancer) -> Target | None:
        """The picked target's circuit is open: the one with the most room, if any has."""
        best: Target | None = None
        best_room = 0
        for c in balancer.targets:
            room = c.limit - c.in_flight - c.connecting
            if room > best_room:
                best, best_room = c, room
        if best is None:
            self.refusal = "upstream_overloaded"
            if self.stats is not None:
                self.stats.overflow.inc()
        return best

    def pick_other(self, ex: Exchange, exclude: tuple[Target, ...]) -> Target | None:
        """A target for a retry: available (or any, in panic), not in ``exclude``, with room."""
        balancer = self.balancer
        if balancer is None:
            return None
        full = tuple(t for t in balancer.targets if t.in_flight + t.connecting >= t.limit)
        return balancer.pick_other(ex, exclude + full if full else exclude)

    # -- changes (rare) --------------------------------------------------------------------
    def set_targets(self, targets: tuple[Target, ...]) -> None:
        for t in targets:
            t.upstream = self
            t.track_latency = self.balancer_class.needs_latency
            t.counted = self.balancer_class.needs_load or t.limit < UNLIMITED
        self.targets = targets
        self.limited = any(t.limit < UNLIMITED for t in targets)
        self.rebuild()

    def rebuild(self, now: float | None = None) -> None:
        """Rebuild the balancer over the available targets (with slow-start weights)."""
        targets = self.targets
        available = [t for t in targets if t.available]
        policy = self.health
        self.panic = not available and bool(targets)
        if self.panic:
            if policy is not None and policy.fail_fast:
                self.balancer = None
                self.single = None
                return
            available = list(targets)  # panic: fail open across all of them
        if not available:
            self.balancer = None
            self.single = None
            return
        weights = [t.weight for t in available]
        if policy is not None and policy.slow_start:
            now = time.monotonic() if now is None else now
            weights = [policy.slow_start_weight(t, now) for t in available]
        self.balancer = self.balancer_class(available, weights, self.hash_key)
        self.single = (
            available[0] if len(targets) == 1 and available[0].limit == UNLIMITED else None
        )

    def available_targets(self) -> list[Target]:
        return [t for t in self.targets if t.available]

    def status(self) -> dict[str, Any]:
        """JSON-able state for the admin ``/status``: targets, health, ejections, in-flight."""
        return {
            "balancer": self.balancer_class.name,
            "targets": [t.status() for t in self.targets],
            "available": sum(1 for t in self.targets if t.available),
            "panic": self.panic,
            "requests": self.requests,
            "retry_budget": self.retry.budget.status() if self.retry is not None else None,
        }

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {list(self.targets)}>"
