"""Balancers pick a target for each request. Pure: no asyncio, no sockets.

A balancer is built over the targets that are available right now (healthy, not ejected,
resolved), with their effective weights; when that set or a weight changes, the upstream
builds a new one (rare: health transitions, DNS changes, slow-start steps). ``pick(ex)``
is the per-request call and must stay cheap: no allocation, no string-keyed lookups.
``pick_other(ex, exclude)`` serves retries (a different target), off the hot path.

Strategies are registered by name in ``BALANCERS`` (``upstreams.<name>.balancer``):

- ``round_robin``: smooth weighted round-robin, as nginx does it.
- ``least_conn``: fewest requests in flight relative to weight; ties by weighted round-robin.
- ``p2c_ewma``: power of two choices (two candidates drawn by weight) over a peak-EWMA
  latency x (in-flight + 1) score (Finagle's and Linkerd's balancer).
- ``consistent_hash``: a hash ring (160 points per unit of reduced weight) keyed on the client
  IP, a header, a cookie, a JWT claim or the path (CRC-32 + Murmur3 finaliser: stable across
  processes and nodes); adding or removing one of N targets moves
  about 1/N of the keys.
- ``random``: weighted random.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import zlib
from collections.abc import Callable, Container, Sequence
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange
    from gateway.upstream.target import Target

#: Computes the consistent-hash key of a request (compiled from ``hash_on``/``hash_key``).
KeyFunction = Callable[["Exchange"], bytes]


class Balancer:
    """Base: a fixed list of targets with weights. ``pick`` returns one of them."""

    name: ClassVar[str] = ""
    #: Whether targets must record their response latency (only p2c_ewma reads it).
    needs_latency: ClassVar[bool] = False
    #: Whether it reads the targets' requests in flight (kept only when someone reads them).
    needs_load: ClassVar[bool] = False
    __slots__ = ("_cum", "_random", "_rng", "_total", "targets", "weights")

    def __init__(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        key: KeyFunction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not targets:
            raise ValueError("a balancer needs at least one target")
        self.targets = tuple(targets)
        self.weights = tuple(weights) if weights is not None else tuple(t.weight for t in targets)
        if len(self.weights) != len(self.targets) or min(self.weights) < 1:
            raise ValueError("one weight of at least 1 per target")
        self._rng = rng or random.Random()
        self._random = self._rng.random  # bound once: picks call it directly
        self._cum = list(itertools.accumulate(self.weights))
        self._total = self._cum[-1]

    def pick(self, ex: Exchange) -> Target:
        raise NotImplementedError

    def _weighted_random(self) -> int:
        return bisect.bisect_right(self._cum, self._random() * self._total)

    def pick_other(self, ex: Exchange, exclude: Container[Target]) -> Target | None:
        """A target not in ``exclude`` (for a retry), chosen at random by weight; ``None`` when
        every target is excluded."""
        candidates = [(t, w) for t, w in zip(self.targets, self.weights, strict=True)]
        candidates = [(t, w) for t, w in candidates if t not in exclude]
        if not candidates:
            return None
        total = sum(w for _, w in candidates)
        x = self._rng.random() * total
        for t, w in candidates:
            x -= w
            if x < 0:
                return t
        return candidates[-1][0]


class RoundRobin(Balancer):
    """Smooth weighted round-robin, as nginx does it: with weights 5,1,1 the order is
    a a b a c a a, never a burst of five ``a`` in a row. With equal weights it is a plain cycle."""

    name = "round_robin"
    __slots__ = ("_current", "_equal", "_n", "_next")

    def __init__(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        key: KeyFunction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(targets, weights, key, rng)
        self._n = len(self.targets)
        self._current = [0] * self._n
        self._equal = len(set(self.weights)) == 1
        # Start at a random place: workers and gateways do not all begin on the first target.
        self._next = self._rng.randrange(self._n)

    def pick(self, ex: Exchange) -> Target:
        if self._equal:  # inlined: a call costs more than the counter
            i = self._next
            self._next = i + 1 if i + 1 < self._n else 0
            return self.targets[i]
        return self.targets[self.pick_index()]

    def pick_index(self) -> int:
        if self._equal:  # all weights equal: a counter is enough
            i = self._next
            self._next = (i + 1) % self._n
            return i
        current = self._current
        weights = self.weights
        best = 0
        for i in range(self._n):
            current[i] += weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return best


class LeastConn(Balancer):
    """Fewest requests in flight (sent, or waiting for a new connection) per unit of weight.
    Ties are broken by smooth weighted round-robin, as nginx does: under light load (all
    idle) the shares follow the weights exactly."""

    name = "least_conn"
    needs_load = True
    __slots__ = ("_equal", "_n", "_next", "_rr")

    def __init__(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        key: KeyFunction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(targets, weights, key, rng)
        self._n = len(self.targets)
        self._rr = RoundRobin(self.targets, self.weights, rng=self._rng)
        self._equal = len(set(self.weights)) == 1
        self._next = self._rng.randrange(self._n)

    def pick(self, ex: Exchange) -> Target:
        n = self._n
        if self._equal:  # the tie-break order: a counter, inlined
            start = self._next
            self._next = start + 1 if start + 1 < n else 0
        else:
            start = self._rr.pick_index()
        targets = self.targets
        weights = self.weights
        best = targets[start]
        # Compare load / weight without dividing: a/b < c/d  <=>  a*d < c*b.
        best_load = best.in_flight + best.connecting
        if not best_load:
            return best
        best_w = weights[start]
        for k in range(1, n):
            i = start + k
            if i >= n:
                i -= n
            t = targets[i]
            load = t.in_flight + t.connecting
            if load * best_w < best_load * weights[i]:
                best, best_load, best_w = t, load, weights[i]
        return best


class _Drawing(Balancer):
    """A balancer that draws targets at random: knows their count and whether the weights
    are all equal (a uniform draw, no cumulative weights)."""

    __slots__ = ("_n", "_uniform")

    def __init__(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        key: KeyFunction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(targets, weights, key, rng)
        self._n = len(self.targets)
        self._uniform = len(set(self.weights)) == 1


class P2CEwma(_Drawing):
    """Power of two choices: draw two distinct targets (with probability by weight: weights
    decide who is considered), keep the one with the lower score, peak-EWMA latency x
    (in flight + 1). A slow target's latency estimate
    jumps at once (peak) and decays over ``EWMA_DECAY`` seconds (gateway.upstream.target), so
    it is avoided while slow and tried again after."""

    name = "p2c_ewma"
    needs_latency = True
    needs_load = True

    def pick(self, ex: Exchange) -> Target:
        n = self._n
        if n == 1:
            return self.targets[0]
        rand = self._random
        if self._uniform:
            a = int(rand() * n)
            b = int(rand() * n)
        else:  # by weight, inlined (no method calls)
            cum, total = self._cum, self._total
            a = bisect.bisect_right(cum, rand() * total)
            b = bisect.bisect_right(cum, rand() * total)
        if a == b:  # a second draw among the others, uniformly: cheap and still fair enough
            b = (a + 1 + int(rand() * (n - 1))) % n
        ta, tb = self.targets[a], self.targets[b]
        # The estimates decay on the upstream's timer (Upstream.start), not here: a pick reads
        # two floats (a clock read and a decay check per pick measured ~+2% of a request).
        sa = ta.ewma * (ta.in_flight + ta.connecting + 1)
        return ta if sa <= tb.ewma * (tb.in_flight + tb.connecting + 1) else tb


class RandomBalancer(_Drawing):
    name = "random"

    def pick(self, ex: Exchange) -> Target:
        if self._uniform:
            return self.targets[int(self._random() * self._n)]
        return self.targets[bisect.bisect_right(self._cum, self._random() * self._total)]


#: Ring points per unit of weight (weights are first divided by their greatest common divisor,
#: so equal weights give every target this many points).
RING_POINTS_PER_WEIGHT = 160
#: Keys whose target a ring remembers (per ring: a rebuilt ring starts empty).
HASH_CACHE_SIZE = 10_000
#: Upper bound on the ring's size; weights are scaled down to fit.
RING_MAX_POINTS = 100_000


_crc32 = zlib.crc32


def stable_hash(data: bytes) -> int:
    """A 32-bit hash that is the same in every process and on every node (``hash()`` is
    randomised per process, so workers would disagree): CRC-32, then MurmurHash3's finaliser
    so that similar keys land far apart. Measured (timeit): ~3x cheaper than BLAKE2b."""
    h = _crc32(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


class ConsistentHash(Balancer):
    """A hash ring (ketama style): each target owns points placed by hashing its label, a
    request goes to the owner of the first point at or after the hash of its key. Points
    depend only on the target's own label and weight, so adding or removing a target moves
    only the keys on its arcs: about 1/N of them."""

    name = "consistent_hash"
    __slots__ = ("_cache", "_key", "_owners", "_points")

    def __init__(
        self,
        targets: Sequence[Target],
        weights: Sequence[int] | None = None,
        key: KeyFunction | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(targets, weights, key, rng)
        self._key = key or client_ip_key
        g = math.gcd(*self.weights)
        reduced = [w // g for w in self.weights]
        per_weight = RING_POINTS_PER_WEIGHT
        if sum(reduced) * per_weight > RING_MAX_POINTS:
            per_weight = max(1, RING_MAX_POINTS // sum(reduced))
        ring: list[tuple[int, int]] = []
        for i, (t, w) in enumerate(zip(self.targets, reduced, strict=True)):
            label = t.label.encode()
            ring.extend((stable_hash(b"%s#%d" % (label, p)), i) for p in range(w * per_weight))
        ring.sort()
        self._points = [p for p, _ in ring]
        self._cache: dict[bytes, Target] = {}
        self._owners = [self.targets[i] for _, i in ring]

    def lookup(self, key: bytes) -> Target:
        i = bisect.bisect_left(self._points, stable_hash(key))
        return self._owners[i if i < len(self._owners) else 0]

    def pick(self, ex: Exchange) -> Target:
        # Keys repeat (clients, users, sessions): a dict remembers where each went, for this
        # ring only (a change builds a new ring, and a new cache). Bounded: cleared when full.
        key = self._key(ex)
        t = self._cache.get(key)
        if t is None:
            t = self.lookup(key)
            cache = self._cache
            if len(cache) >= HASH_CACHE_SIZE:
                cache.clear()
            cache[key] = t
        return t

    def pick_other(self, ex: Exchange, exclude: Container[Target]) -> Target | None:
        """The next distinct owner along the ring: where the key would go without them."""
        owners = self._owners
        i = bisect.bisect_left(self._points, stable_hash(self._key(ex)))
        n = len(owners)
        for k in range(n):
            t = owners[(i + k) % n]
            if t not in exclude:
                return t
        return None


# -- consistent-hash keys ----------------------------------------------------------------------
def client_ip_key(ex: Exchange) -> bytes:
    return ex.client_ip.encode("latin-1")


def path_key(ex: Exchange) -> bytes:
    return ex.path


def header_key(name: bytes) -> KeyFunction:
    lname = name.lower()

    def key(ex: Exchange) -> bytes:
        for n, _, v in ex.headers.items:
            if n == lname:
                return v
        return client_ip_key(ex)

    return key


def cookie_key(name: bytes) -> KeyFunction:
    prefix = name + b"="

    def key(ex: Exchange) -> bytes:
        for n, _, v in ex.headers.items:
            if n == b"cookie":
                for part in v.split(b";"):
                    part = part.strip()
                    if part.startswith(prefix):
                        return part[len(prefix) :]
        return client_ip_key(ex)

    return key


def claim_key(name: str) -> KeyFunction:
    """A verified JWT claim: ``sub`` is ``ex.user``; others come from ``jwt.claims``."""

    def key(ex: Exchange) -> bytes:
        if name == "sub" and ex.user:
            return ex.user.encode()
        claims = ex.var("jwt.claims")
        if isinstance(claims, dict):
            value = claims.get(name)
            if value is not None:
                return str(value).encode()
        return client_ip_key(ex)

    return key


def make_key(on: str, name: str) -> KeyFunction:
    """The key function for ``hash_on`` (``client_ip``, ``header``, ``cookie``,
    ``jwt_claim``, ``path``) and ``hash_key`` (the header, cookie or claim name). A request
    without the header, cookie or claim is hashed on its client IP."""
    if on == "header":
        return header_key(name.encode("latin-1"))
    if on == "cookie":
        return cookie_key(name.encode("latin-1"))
    if on == "jwt_claim":
        return claim_key(name)
    if on == "path":
        return path_key
    return client_ip_key


BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls for cls in (RoundRobin, LeastConn, P2CEwma, ConsistentHash, RandomBalancer)
}
