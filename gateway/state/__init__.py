"""State shared between the workers of a node (``memory``) or the nodes of a cluster (``redis``).

The interface is deliberately small, for the rate limiter now and LLM budgets and sessions later:

- **buckets**: ``backend.buckets(limits)`` binds a set of limits (compiled once, by a plugin at
  start); its ``take(key, cost)`` is an atomic check-and-consume on the token buckets
  ``key|limit.name`` (GCRA, see ``gcra``): all limits admit the request or none is charged.
  ``cost=0`` reads without consuming.
- **counters**: ``add(name, amount, ttl)`` adds to a counter that expires ``ttl`` seconds after
  it was created, and returns the new value.

Backends answer with a ``Verdict``. A synchronous backend's buckets (``memory``) also offer
``take_now`` so that a sync plugin hook allocates no coroutine.

Lifetime: one backend object per process and distinct ``StateConfig``, shared by every plugin
that uses it (``acquire``/``release``, reference counted; the last release closes it). The
config in force is the one of the config being compiled (``use_config``, called by the compiler
before it builds the plugins).
"""

from __future__ import annotations

from typing import Any, ClassVar

from gateway.config.model import StateConfig
from gateway.state.gcra import TICKS_PER_SECOND, Limit

#: Verdict modes: how the answer was reached.
OK = "ok"  # the configured backend answered
LOCAL = "local"  # Redis failed: a per-node bucket with the limit divided by the node count
OPEN = "open"  # Redis failed: admitted without a check
CLOSED = "closed"  # Redis failed: refused (the caller answers 503)


class Verdict:
    """The answer to a ``take``: admitted or not, and where each bucket stands.

    ``waits[i]`` is how far bucket ``i``'s TAT is ahead of now, in ticks (microseconds), after
    the take (see ``gcra.take``); ``limits`` are the limits actually applied (divided ones in
    ``local`` mode). In ``open`` and ``closed`` modes ``waits`` is empty.
    """

    __slots__ = ("allowed", "limits", "mode", "waits")

    def __init__(
        self, allowed: bool, waits: list[int], limits: tuple[Limit, ...], mode: str = OK
    ) -> None:
        self.allowed = allowed
        self.waits = waits
        self.limits = limits
        self.mode = mode

    def __repr__(self) -> str:
        return f"<Verdict {'allowed' if self.allowed else 'refused'} {self.mode} {self.waits}>"


class StateError(Exception):
    """The backend could not answer (connection refused, timeout, protocol error)."""


class Buckets:
    """A set of limits checked together, bound to a backend (``StateBackend.buckets``)."""

    __slots__ = ("limits",)

    def __init__(self, limits: tuple[Limit, ...]) -> None:
        self.limits = limits

    def take_now(self, key: str, cost: int) -> Verdict:
        """Synchronous take; only on a backend whose ``synchronous`` is true."""
        raise NotImplementedError("this backend has no synchronous take")

    async def take(self, key: str, cost: int) -> Verdict:
        raise NotImplementedError


class StateBackend:
    kind: ClassVar[str] = ""
    #: its buckets' ``take_now`` answers without I/O
    synchronous: ClassVar[bool] = False

    def buckets(self, limits: tuple[Limit, ...]) -> Buckets:
        raise NotImplementedError

    async def add(self, name: str, amount: int, ttl: float) -> int:
        raise NotImplementedError

    @property
    def mode(self) -> str:
        """``ok``, or the degraded mode in force (``local``, ``open``, ``closed``)."""
        return OK

    async def start(self) -> None:
        """Connect / open; bounded in time. Errors are not raised: a backend starts degraded."""

    async def close(self) -> None:
        """Release connections and shared memory."""

    def status(self) -> dict[str, Any]:
        return {"backend": self.kind, "mode": self.mode}


_config = StateConfig()
_open: dict[StateConfig, tuple[StateBackend, int]] = {}


def use_config(config: StateConfig) -> None:
    """The ``state:`` section of the config being compiled; plugins built next read it."""
    global _config
    _config = config


def current_config() -> StateConfig:
    return _config


def backend_for(config: StateConfig) -> StateBackend:
    """The process's backend for ``config`` (not started), created on first use."""
    found = _open.get(config)
    if found is not None:
        return found[0]
    backend: StateBackend
    if config.backend == "redis":
        from gateway.state.redis import RedisBackend

        backend = RedisBackend(config)
    else:
        from gateway.state.memory import MemoryBackend

        backend = MemoryBackend(config)
    _open[config] = (backend, 0)
    return backend


async def acquire(config: StateConfig) -> StateBackend:
    """``backend_for(config)``, started on its first acquisition."""
    backend = backend_for(config)
    _, users = _open[config]
    _open[config] = (backend, users + 1)
    if users == 0:
        await backend.start()
    return backend


async def release(config: StateConfig) -> None:
    found = _open.get(config)
    if found is None:
        return
    backend, users = found
    if users <= 1:
        del _open[config]
        await backend.close()
    else:
        _open[config] = (backend, users - 1)


__all__ = [
    "CLOSED",
    "LOCAL",
    "OK",
    "OPEN",
    "TICKS_PER_SECOND",
    "Buckets",
    "Limit",
    "StateBackend",
    "StateError",
    "Verdict",
    "acquire",
    "backend_for",
    "current_config",
    "release",
    "use_config",
]
