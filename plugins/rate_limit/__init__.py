"""``rate_limit``: token buckets per caller, exact per node (``memory``) or per cluster (``redis``).

```yaml
- rate_limit: {key: ip, rate: 100/s, burst: 200}
- rate_limit:
    key: [jwt:sub, header:x-tenant]      # a composite key
    limits:                              # all must admit the request
      - {name: burst, rate: 10/s, burst: 20}
      - {name: hourly, rate: 1000/h}
    cost: 1
    missing_key: shared                  # shared | reject (403)
    headers: draft                       # draft | legacy | both | none
```
The backend is the top-level ``state:`` section (see docs/rate-limiting.md). A refused request
gets 429 ``rate_limited`` with ``Retry-After``; responses carry ``RateLimit-Policy`` and
``RateLimit`` (draft-ietf-httpapi-ratelimit-headers), made with the decision and put on
whatever response goes out (the upstream's, the plugin's own 429, another plugin's reply).
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway import metrics
from gateway import state as state_mod
from gateway.config.model import StateConfig
from gateway.http.headers import HeaderLines
from gateway.plugin import DEFERRED, Deferred, Plugin, PluginConfig, Reply
from gateway.proxy.exchange import Exchange
from gateway.state import CLOSED, LOCAL, OK, Buckets, StateBackend, Verdict
from gateway.state.gcra import TICKS_PER_SECOND, Limit, parse_rate, reset_after, retry_after
from gateway.state.memory import SLOT_CACHE_SIZE, LocalBuckets
from gateway.state.redis import RedisBackend, RedisBuckets
from gateway.state.shm import STUCK_LOCK_TIMEOUT, SharedTable, Slot, gcra_take
from plugins.rate_limit.keys import compile_key

_monotonic_ns = time.monotonic_ns
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/+-]{1,64}$")
#: Bound of the single-limit headers-by-wait cache (cleared when full).
HEADER_CACHE_SIZE = 256

_decisions = metrics.counter(
    "ratelimit_decisions_total",
    "Rate-limit decisions: allowed, limited, allowed_local, limited_local (Redis down, "
    "per-node fallback), open (Redis down, admitted unchecked), unavailable (Redis down, 503), "
    "missing_key (rejected)",
    ("route", "decision"),
)
DECISIONS = (
    "allowed",
    "limited",
    "allowed_local",
    "limited_local",
    "open",
    "unavailable",
    "missing_key",
)
_ALLOWED, _LIMITED, _ALLOWED_LOCAL, _LIMITED_LOCAL, _OPEN, _UNAVAILABLE, _MISSING = range(7)


class LimitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: str
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000)
    name: str | None = None


class RateLimitConfig(PluginConfig):
    key: str | list[str] = "ip"
    rate: str | None = None
    burst: int | None = Field(default=None, ge=1, le=1_000_000_000)
    limits: list[LimitConfig] = []
    cost: int = Field(default=1, ge=1, le=1_000_000)
    #: the policy name of the ``rate``/``burst`` shorthand, in the RateLimit headers
    name: str = "default"
    #: ``route``: each route has its own buckets (a global plugin too); ``global``: shared
    scope: Literal["route", "global"] = "route"
    missing_key: Literal["shared", "reject"] = "shared"
    headers: Literal["draft", "legacy", "both", "none"] = "draft"
    #: ``state``: the top-level ``state:`` backend; ``memory``: this node's shared-memory table
    #: even when the state backend is Redis (a per-node limit, no network round trip)
    backend: Literal["state", "memory"] = "state"

    @model_validator(mode="after")
    def _check(self) -> RateLimitConfig:
        if (self.rate is None) == (not self.limits):
            raise ValueError("give either rate (with optional burst) or limits, not both")
        if self.rate is None and self.burst is not None:
            raise ValueError("burst: goes with rate (or inside each of limits)")
        compile_key(self.key)  # raises ValueError with the spec at fault
        names = set()
        for item in self.items():
            count, period = parse_rate(item.rate)
            if count / period > TICKS_PER_SECOND:
                raise ValueError(f"rate {item.rate!r}: above one million per second")
            name = item.name or item.rate
            if not _NAME_RE.match(name):
                raise ValueError(f"limit name {name!r}: use letters, digits and _.:/+- only")
            if name in names:
                raise ValueError(f"limit name {name!r} is used twice")
            names.add(name)
            if self.cost > (item.burst or count):
                raise ValueError(
                    f"cost {self.cost} exceeds the burst of {name!r}: no request could pass"
                )
        return self

    def items(self) -> list[LimitConfig]:
        if self.rate is not None:
            return [LimitConfig(rate=self.rate, burst=self.burst, name=self.name)]
        return list(self.limits)


def build_limits(config: RateLimitConfig) -> tuple[Limit, ...]:
    out = []
    for item in config.items():
        count, period = parse_rate(item.rate)
        out.append(Limit(count, period, item.burst or count, item.name or item.rate))
    return tuple(out)


def _state_config(config: PluginConfig) -> StateConfig:
    current = state_mod.current_config()
    if getattr(config, "backend", "state") == "memory" and current.backend != "memory":
        return StateConfig(max_keys=current.max_keys)
    return current


_HEADER_NAMES = (
    b"RateLimit-Policy",
    b"RateLimit",
    b"X-RateLimit-Limit",
    b"X-RateLimit-Remaining",
    b"X-RateLimit-Reset",
)


def _lines(items: list[tuple[bytes, bytes, bytes]]) -> HeaderLines:
    """Headers of names from ``_HEADER_NAMES`` (checked at load) and values made of numbers
    and checked limit names: assembled without checking again (per request when the
    remaining count changes)."""
    parts: list[bytes] = []
    for _, raw, value in items:
        parts += (raw, b": ", value, b"\r\n")
    return HeaderLines(tuple(items), b"".join(parts))


def _ceil_seconds(ticks: int) -> int:
    return -(-ticks // TICKS_PER_SECOND)


class RateLimitPlugin(Plugin):
    """The rate limiter. Constructing it yields the ``memory`` or the ``redis`` variant (both
    hooks are sync: the Redis one answers later through ``ex.resume``).

    It has no response hook: the headers (RateLimit-Policy, RateLimit, or the legacy ones)
    follow from the decision alone, so they are made with it and handed to the exchange
    (``ex.add_response_headers``), which puts them on whatever response goes out, the
    upstream's or a Reply (this plugin's 429 included)."""

    name = "rate_limit"
    Config = RateLimitConfig

    def __new__(cls, config: PluginConfig) -> RateLimitPlugin:
        if cls is RateLimitPlugin:
            backend = _state_config(config).backend
            cls = MemoryRateLimitPlugin if backend == "memory" else RedisRateLimitPlugin
        return super().__new__(cls)

    def __init__(self, config: PluginConfig) -> None:
        assert isinstance(config, RateLimitConfig)
        super().__init__(config)
        self.state_config: StateConfig = _state_config(config)
        self.backend: StateBackend = state_mod.backend_for(self.state_config)
        self.buckets: Buckets | None = None
        self.limits = build_limits(config)
        self.cost = config.cost
        self.extract, self.key_what = compile_key(config.key)
        self.reject_missing = config.missing_key == "reject"
        self.global_scope = config.scope == "global"
        self._started = False
        mode = config.headers
        self.draft_headers = mode in ("draft", "both")
        self.legacy_headers = mode in ("legacy", "both")
        self._emit = mode != "none"
        # RateLimit-Policy is static: q is the quota per window, w the window in seconds.
        self.policy_header = b", ".join(
            b'"%s";q=%d;w=%d' % (lim.name.encode(), lim.count, max(1, round(lim.period)))
            for lim in self.limits
        )
        self._policy_item = (b"ratelimit-policy", b"RateLimit-Policy", self.policy_header)
        # Checked once (limit names are checked by the config too): the per-request headers
        # are these names with numbers, assembled unchecked (_lines).
        HeaderLines.of([(name, self.policy_header) for name in _HEADER_NAMES])
        self._item_prefix = tuple(b'"%s";r=' % lim.name.encode() for lim in self.limits)
        self._item_fmt = self._item_prefix[0] + b"%d;t=%d"
        self._draft_line = b"RateLimit-Policy: %s\r\nRateLimit: " % self.policy_header
        self._single = len(self.limits) == 1
        #: wait -> the single-limit headers for it: an idle bucket always gives the same
        #: wait (cost * interval), so do a caller's steady requests; the checks of one Redis
        #: batch cycle through a few
        self._headers_of: dict[int, HeaderLines] = {}
        self._children: dict[str, tuple[Any, ...]] = {}
        self._scopes: dict[str, str] = {}
        #: the bucket-key prefix when it does not depend on the request's route
        self._scope: str | None = "*|" if self.global_scope else None
        #: the "allowed" counter of a route's own plugin (bound on first use)
        self._allowed_child: Any = None
        self.missing_reply_message = f"the rate limit key ({self.key_what}) is missing"

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        self.backend = await state_mod.acquire(self.state_config)
        self._started = True
        self.buckets = self.backend.buckets(self.limits)
        if self.route_name is not None:  # a route's own plugin: bind per-route things now
            self._bind(self.route_name)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            self.buckets = None
            await state_mod.release(self.state_config)

    def status(self) -> dict[str, Any]:
        out = self.backend.status()
        out["limits"] = [
            {"name": lim.name, "count": lim.count, "period_s": lim.period, "burst": lim.burst}
            for lim in self.limits
        ]
        out["key"] = self.key_what
        out["ready"] = True
        return out

    # -- per request ------------------------------------------------------------------------------
    def _bind(self, route: str) -> tuple[Any, ...]:
        children = tuple(_decisions.labels(route, d) for d in DECISIONS)
        self._children[route] = children
        if route == self.route_name:
            self._allowed_child = children[_ALLOWED]
            if not self.global_scope:
                self._scope = route + "|"
        return children

    def _key(self, ex: Exchange) -> str | None:
        """The bucket key, or None when the key is missing and must be rejected."""
        return self._scoped(ex, self.extract(ex))

    def _scoped(self, ex: Exchange, value: str | None) -> str | None:
        if not value:  # missing (an extractor's None or "")
            if self.reject_missing:
                return None
            value = "\x00missing"
        scope = self._scope
        if scope is None:  # a global plugin with per-route buckets (or before the first count)
            route = ex.route.name if ex.route is not None else ""
            scope = self._scopes.get(route)
            if scope is None:
                scope = self._scopes[route] = route + "|"
        return scope + value

    def _missing(self, ex: Exchange) -> Reply:
        self._count(ex, _MISSING)
        ex.note("ratelimit", "missing_key")
        return Reply.error("forbidden", self.missing_reply_message)

    def _count(self, ex: Exchange, decision: int) -> None:
        route = ex.route.name if ex.route is not None else ""
        (self._children.get(route) or self._bind(route))[decision].inc()

    def _decide(self, ex: Exchange, verdict: Verdict) -> Reply | None:
        """Everything but the single-limit memory fast path."""
        if self._emit and verdict.waits:  # no waits: Redis down in open/closed mode
            ex.add_response_headers(self._verdict_headers(verdict))
        mode = verdict.mode
        if verdict.allowed:
            if mode == OK:
                self._count(ex, _ALLOWED)
            elif mode == LOCAL:
                self._count(ex, _ALLOWED_LOCAL)
                ex.note("ratelimit", "allowed_local")
            else:
                self._count(ex, _OPEN)
                ex.note("ratelimit", "open")
            return None
        if mode == CLOSED:
            self._count(ex, _UNAVAILABLE)
            ex.note("ratelimit", "unavailable")
            return Reply.error("rate_limit_unavailable")
        if mode == LOCAL:
            self._count(ex, _LIMITED_LOCAL)
            ex.note("ratelimit", "limited_local")
        else:
            self._count(ex, _LIMITED)
            ex.note("ratelimit", "limited")
        return self._limited(retry_after(verdict.waits, self.cost, verdict.limits))

    def _limited(self, wait: int) -> Reply:
        seconds = max(1, _ceil_seconds(wait))
        return Reply.error("rate_limited", headers=((b"retry-after", b"%d" % seconds),))

    # -- response headers -----------------------------------------------------------------------
    def _cache_headers(self, wait: int) -> HeaderLines:
        """``_single_headers(wait)``, kept in the bounded cache the hooks read first."""
        if len(self._headers_of) >= HEADER_CACHE_SIZE:
            self._headers_of.clear()
        lines = self._headers_of[wait] = self._single_headers(wait)
        return lines

    def _single_headers(self, wait: int) -> HeaderLines:
        """The headers for a single limit whose bucket is ``wait`` ticks ahead of now."""
        lim = self.limits[0]
        left = (lim.tolerance - wait) // lim.interval
        if left > 0:
            reset = wait
        else:
            left = 0
            reset = wait + lim.interval - lim.tolerance
        seconds = -(-reset // TICKS_PER_SECOND) if reset > 0 else 0
        if not self.draft_headers:
            return _lines(self._legacy(lim, left, seconds))
        value = self._item_fmt % (left, seconds)
        if not self.legacy_headers:  # the default, the bytes alone (~3k instructions less)
            return HeaderLines(None, self._draft_line + value + b"\r\n")
        out = [self._policy_item, (b"ratelimit", b"RateLimit", value)]
        return _lines(out + self._legacy(lim, left, seconds))

    def _verdict_headers(self, verdict: Verdict) -> HeaderLines:
        limits = verdict.limits
        waits = verdict.waits
        out = []
        if self.draft_headers:
            out.append(self._policy_item)
            parts = [
                b"%s%d;t=%d" % (prefix, lim.remaining(wait), _ceil_seconds(reset_after(wait, lim)))
                for prefix, lim, wait in zip(self._item_prefix, limits, waits, strict=True)
            ]
            out.append((b"ratelimit", b"RateLimit", b", ".join(parts)))
        if self.legacy_headers:
            # The most restrictive limit: fewest requests left.
            best = min(range(len(limits)), key=lambda i: limits[i].remaining(waits[i]))
            lim, wait = limits[best], waits[best]
            out += self._legacy(lim, lim.remaining(wait), _ceil_seconds(reset_after(wait, lim)))
        return _lines(out)

    @staticmethod
    def _legacy(lim: Limit, left: int, t: int) -> list[tuple[bytes, bytes, bytes]]:
        return [
            (b"x-ratelimit-limit", b"X-RateLimit-Limit", b"%d" % lim.count),
            (b"x-ratelimit-remaining", b"X-RateLimit-Remaining", b"%d" % left),
            (b"x-ratelimit-reset", b"X-RateLimit-Reset", b"%d" % t),
        ]


class MemoryRateLimitPlugin(RateLimitPlugin):
    """``memory`` backend: the check is a few microseconds of shared memory, no I/O.

    The single-limit path is the hot one. Measured with callgrind (``python -m
    benchmarks.hotpath --callgrind --scenario rate_limit``), a Python call costs ~500
    instructions and building a key string (concatenation, then hashing the new string)
    ~700, so: a plugin whose buckets do not depend on the route finds a key's slot by the
    extracted value alone (``_slot_of``: ``ex.client_ip`` is one string per connection,
    hashed once), calls the table directly, and bumps the counter's value inline."""

    def __init__(self, config: PluginConfig) -> None:
        super().__init__(config)
        self._local: LocalBuckets | None = None
        self._table: SharedTable | None = None
        self._limit = self.limits[0]
        #: the single limit's numbers, read by the hot path
        self._step = self.cost * self._limit.interval
        self._tolerance = self._limit.tolerance
        #: value -> slot, for a single limit with a fixed scope; bounded like LocalBuckets'
        self._slot_of: dict[str | None, Slot] = {}

    def _open(self) -> LocalBuckets:
        """The node's table, on first use (start() may not have run)."""
        if self.buckets is None:
            self.buckets = self.backend.buckets(self.limits)
        assert isinstance(self.buckets, LocalBuckets)
        self._local = self.buckets
        self._table = self.buckets.table
        return self.buckets

    async def stop(self) -> None:
        self._local = self._table = None
        self._slot_of.clear()
        await super().stop()

    def on_request(self, ex: Exchange) -> Reply | None:
        value = self.extract(ex)
        slot = self._slot_of.get(value)
        if slot is None:  # a new key, or: missing, several limits, a route-dependent scope
            key = self._scoped(ex, value)
            if key is None:
                return self._missing(ex)
            buckets = self._local or self._open()
            if not self._single:
                return self._decide(ex, buckets.take_now(key, self.cost))
            slot = buckets.slots(key)[0]
            if value and self._scope is not None:
                if len(self._slot_of) >= SLOT_CACHE_SIZE:
                    self._slot_of.clear()
                self._slot_of[value] = slot
        table = self._table
        assert table is not None
        # SharedTable.take1(), inlined (a call with its arguments is ~700 instructions, over
        # 10% of this hook): the lock, then the take at the slot's hint (gcra_take, compiled
        # where built), or the lookup when the key is not there.
        now = _monotonic_ns() // 1000
        q = table.words
        if not table.acquire(False) and not table.acquire(True, STUCK_LOCK_TIMEOUT):
            table._stuck()
        try:
            wait = gcra_take(q, slot.hint, slot.a, slot.b, now, self._step, self._tolerance)
            if wait is not None:
                allowed = wait >= 0
                if not allowed:
                    wait = -1 - wait
            else:  # the key moved, or is new here
                i = table._find(slot)
                tat = q[i + 3] if i >= 0 else 0
                if tat < now:
                    tat = now
                wait = tat + self._step - now
                allowed = wait <= self._tolerance
                if allowed:
                    if i < 0:
                        i = table._claim(slot, now)
                    q[i + 3] = now + wait
                else:
                    wait = tat - now
        finally:
            try:
                table.release()
            except ValueError:  # see SharedTable._unlock
                pass
        if self._emit:  # headers cached by wait (a call on a hit would cost ~500 instructions)
            lines = self._headers_of.get(wait) or self._cache_headers(wait)
            extra = ex.response_extra  # ex.add_response_headers(), inlined
            ex.response_extra = lines if extra is None else extra + lines
        if allowed:
            child = self._allowed_child
            if child is None:
                self._count(ex, _ALLOWED)
            else:
                child.value += 1  # CounterChild.inc(), inlined
            return None
        self._count(ex, _LIMITED)
        ex.note("ratelimit", "limited")
        return self._limited(wait + self._step - self._tolerance)


class RedisRateLimitPlugin(RateLimitPlugin):
    """``redis`` backend: the check joins the loop iteration's batch (one round trip, bounded
    by the timeout). The hook stays sync: it returns ``DEFERRED``, and the backend's callback
    (``_verdict``) decides and calls ``ex.resume``, so a request allocates no task, coroutine
    or future. With Redis down, the degraded answer needs no I/O and is returned at once."""

    def __init__(self, config: PluginConfig) -> None:
        super().__init__(config)
        self._redis: RedisBackend | None = None
        self._rbuckets: RedisBuckets | None = None
        #: value -> bucket key, when the scope does not depend on the request
        self._key_of: dict[str, str] = {}
        self._on_verdict = self._verdict  # bound once, not per request

    async def start(self) -> None:
        await super().start()
        assert isinstance(self.backend, RedisBackend) and isinstance(self.buckets, RedisBuckets)
        self._redis = self.backend
        self._rbuckets = self.buckets

    async def stop(self) -> None:
        self._redis = self._rbuckets = None
        self._key_of.clear()
        await super().stop()

    def on_request(self, ex: Exchange) -> Reply | Deferred | None:
        value = self.extract(ex)
        key = self._key_of.get(value) if value else None
        if key is None:
            key = self._scoped(ex, value)
            if key is None:
                return self._missing(ex)
            if value and self._scope is not None:
                if len(self._key_of) >= SLOT_CACHE_SIZE:
                    self._key_of.clear()
                self._key_of[value] = key
        backend = self._redis
        buckets = self._rbuckets
        if backend is None or buckets is None:
            raise RuntimeError("rate_limit used before start()")
        if not backend.healthy:
            return self._decide(ex, backend.degraded(buckets, key, self.cost))
        backend.enqueue(buckets, key, self.cost, self._on_verdict, ex)
        return DEFERRED

    def _verdict(
        self, ex: Exchange, allowed: bool, waits: list[int], limits: tuple[Limit, ...], mode: str
    ) -> None:
        """The batch's answer for this check (a ``Verdict``'s fields): the decision, then
        ``ex.resume``."""
        if ex.done:  # the client left while it waited
            return
        try:
            if allowed and mode is OK and self._single:
                # As the memory fast path: the single-limit headers (cached by wait), the
                # counter bumped inline.
                if self._emit:  # as in the memory hook
                    wait = waits[0]
                    lines = self._headers_of.get(wait) or self._cache_headers(wait)
                    extra = ex.response_extra  # ex.add_response_headers(), inlined
                    ex.response_extra = lines if extra is None else extra + lines
                child = self._allowed_child
                if child is None:
                    self._count(ex, _ALLOWED)
                else:
                    child.value += 1
                reply = None
            else:
                reply = self._decide(ex, Verdict(allowed, waits, limits, mode))
        except Exception as exc:  # the chain treats it as this hook's failure
            ex.resume_failed(self, exc)
            return
        ex.resume(self, reply)


__all__ = ["DECISIONS", "RateLimitConfig", "RateLimitPlugin"]
