"""A fixed-size hash table in shared memory, shared by every worker process of one node.

Theory of operation
-------------------
The table is a file mapped with ``mmap`` (in the gateway's run directory, which the supervisor
shares with its workers), so all workers of a node read and write the same bytes, as nginx's
shared dictionaries do. It is guarded by one named POSIX semaphore: taking and releasing an
uncontended one is a user-space atomic operation (futex), with no system call.

Measured with timeit on the 2-core development VM (Python 3.11), per acquire + release:

    flock(2) on the table file        1.80 µs   (two system calls)
    fcntl/lockf record lock           2.66 µs
    named POSIX semaphore (SemLock)   0.11 µs   (with a timeout; 0.08 µs without)

so the semaphore it is. Its weakness is that the kernel does not release it when its holder
dies (an flock would be): a worker killed inside the few-microsecond critical section would
leave it taken. Waiters therefore acquire with a timeout (``STUCK_LOCK_TIMEOUT``, far beyond
any critical section); on expiry they log, count, and carry on as if they held it.

Layout: a 64-byte header (magic, slot count, users, evictions) then ``nslots + PROBE`` slots
of four signed 64-bit words: the key's fingerprint (128 bits of BLAKE2b of the bucket name, as
two words), a value (a counter's; unused by buckets) and an expiry (a bucket's TAT), in
microseconds of ``time.monotonic_ns()``, a clock every process of the host shares. The table
is read and written through a ``memoryview`` cast to 64-bit words: a word costs ~300 CPU
instructions to read, a ``struct.unpack_from`` of a slot ~1,000 (callgrind). A key lives in
one of ``PROBE`` consecutive slots from ``hash % nslots`` (no wrap-around: the table has
``PROBE`` spare slots at its end). A ``Slot`` caches where its key was last found, so the
usual lookup is two word compares.

Bounded size and expiry: a slot whose expiry has passed is free. For a token bucket the expiry
is its TAT, the moment it is full again, so an idle bucket frees itself with no sweeping. When
all ``PROBE`` slots of a new key are live, the one expiring first is evicted (that bucket
restarts full; counted in ``evictions``). Memory is ``64 + 32 * (nslots + 8)`` bytes: 2 MiB for
the default 65,536 slots.
"""

from __future__ import annotations

import _multiprocessing  # type: ignore[import-not-found]
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway.speedups import compiled
from gateway.state.gcra import Limit

log = logging.getLogger("gateway.state")

MAGIC = b"GWSTATE2"
HEADER = struct.Struct("<8sIIiiQ")  # magic, nslots, slot size, users, reserved, evictions
HEADER_SIZE = 64
SLOT_SIZE = 32
PROBE = 8
_W0 = HEADER_SIZE // 8  # word index of slot 0
_USERS_AT = 16
_EVICTIONS_WORD = 3
STUCK_LOCK_TIMEOUT = 0.5

_SEMAPHORE = 1  # _multiprocessing.SemLock kind
_FP = struct.Struct("<qq")


def _semaphore_name(path: Path) -> str:
    digest = hashlib.blake2b(str(path).encode(), digest_size=10).hexdigest()
    return f"/gw-{digest}"


def gcra_take_py(
    q: memoryview, i: int, a: int, b: int, now: int, step: int, tolerance: int
) -> int | None:
    """A bucket's GCRA take at word ``i`` of the table's words (``q``: a memoryview cast to
    ``'q'``), the caller holding the lock: None
    when the slot there is not the key's (fingerprint ``a``, ``b``: look it up); otherwise
    the wait after an allowed take (>= 0; the new TAT is written), or ``-1 - wait`` for a
    denied one (the bucket untouched). ``step`` is cost times the limit's interval.

    The reference version: ``gateway._speedups.gcra_take`` does the same compiled, about
    half this hook's cost (and None, for the slow path, when a number leaves 64 bits)."""
    if q[i] != a or q[i + 1] != b:
        return None
    tat = q[i + 3]
    if tat < now:
        tat = now
    wait = tat + step - now
    if wait <= tolerance:
        q[i + 3] = now + wait
        return wait
    return now - tat - 1


gcra_take: Callable[[memoryview, int, int, int, int, int, int], int | None] = (
    compiled.gcra_take if compiled is not None else gcra_take_py
)


class Slot:
    """Where one key's entry lives: its fingerprint words, its probe window, and a hint."""

    __slots__ = ("a", "b", "base", "hint")

    def __init__(self, name: bytes, nslots: int) -> None:
        a, b = _FP.unpack(hashlib.blake2b(name, digest_size=16).digest())
        if a == 0 and b == 0:  # the empty slot's fingerprint; 2^-128, but never ambiguous
            b = 1
        self.a = a
        self.b = b
        self.base = _W0 + (a % nslots) * 4
        self.hint = self.base

    def __repr__(self) -> str:
        return f"<Slot {self.a:x}{self.b:x} @{self.hint}>"


class SharedTable:
    """Fixed-size table of 64-bit values with expiry, keyed by fingerprint, in shared memory."""

    __slots__ = (
        "_fd",
        "_mm",
        "_sem",
        "_sem_name",
        "acquire",
        "nslots",
        "path",
        "pid",
        "release",
        "stuck_locks",
        "words",
    )

    def __init__(self, path: Path, nslots: int) -> None:
        if nslots < PROBE:
            raise ValueError(f"a shared table needs at least {PROBE} slots")
        self.path = path
        self.pid = os.getpid()
        self.nslots = nslots
        self.stuck_locks = 0
        size = HEADER_SIZE + (nslots + PROBE) * SLOT_SIZE
        self._sem_name = _semaphore_name(path.resolve())
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Set-up is rare: an flock serialises the workers creating or opening the table.
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                fresh = os.fstat(fd).st_size == 0
                if fresh:
                    os.ftruncate(fd, size)
                elif os.fstat(fd).st_size != size:
                    raise ValueError(f"{path}: exists with another size")
                mm = mmap.mmap(fd, size)
                if fresh:
                    HEADER.pack_into(mm, 0, MAGIC, nslots, SLOT_SIZE, 0, 0, 0)
                    with contextlib.suppress(FileNotFoundError):
                        _multiprocessing.sem_unlink(self._sem_name)  # left by a crashed run
                    sem = _multiprocessing.SemLock(_SEMAPHORE, 1, 1, self._sem_name, False)
                else:
                    magic, n, slot_size, *_ = HEADER.unpack_from(mm, 0)
                    if magic != MAGIC or n != nslots or slot_size != SLOT_SIZE:
                        mm.close()
                        raise ValueError(f"{path}: not a state table of {nslots} slots")
                    try:
                        sem = _multiprocessing.SemLock._rebuild(0, _SEMAPHORE, 1, self._sem_name)
                    except FileNotFoundError:
                        sem = _multiprocessing.SemLock(_SEMAPHORE, 1, 1, self._sem_name, False)
                users = struct.unpack_from("<i", mm, _USERS_AT)[0]
                struct.pack_into("<i", mm, _USERS_AT, users + 1)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._mm = mm
        self.words = memoryview(mm).cast("q")
        self._sem = sem
        self.acquire = sem.acquire
        self.release = sem.release

    def slot(self, name: bytes) -> Slot:
        return Slot(name, self.nslots)

    # -- locking ------------------------------------------------------------------------------
    def _lock(self) -> None:
        if not self.acquire(True, STUCK_LOCK_TIMEOUT):
            self._stuck()

    def _stuck(self) -> None:
        # Critical sections last microseconds: the holder died inside one.
        self.stuck_locks += 1
        log.error("shared state table %s: lock held too long, taking it over", self.path)

    def _unlock(self) -> None:
        try:
            self.release()
        except ValueError:  # released too many times: after a take-over, the holder woke up
            pass

    # -- slots (call with the lock held) ----------------------------------------------------------
    def _find(self, slot: Slot) -> int:
        """Word index of the slot's live-or-expired entry, or -1; updates the hint."""
        q = self.words
        a, b = slot.a, slot.b
        for i in range(slot.base, slot.base + PROBE * 4, 4):
            if q[i] == a and q[i + 1] == b:
                slot.hint = i
                return i
        return -1

    def _claim(self, slot: Slot, now: int, taken: Sequence[int] = ()) -> int:
        """A free word index (empty or expired) in the window, else the one expiring first."""
        q = self.words
        victim = -1
        victim_exp = 0
        for i in range(slot.base, slot.base + PROBE * 4, 4):
            if i in taken:
                continue
            exp = q[i + 3]
            if exp <= now:
                break
            if victim < 0 or exp < victim_exp:
                victim, victim_exp = i, exp
        else:
            q[_EVICTIONS_WORD] += 1
            i = victim
        q[i] = slot.a
        q[i + 1] = slot.b
        slot.hint = i
        return i

    # -- operations ---------------------------------------------------------------------------
    def take1(self, slot: Slot, now: int, cost: int, limit: Limit) -> tuple[bool, int]:
        """GCRA take on one bucket: ``(allowed, wait)`` as ``gcra.take`` does. The hot path:
        with the hint right, two word compares, one read, one write under the lock."""
        q = self.words
        # Uncontended, a non-blocking try is enough, and it skips the deadline computation
        # that a timeout costs (~100 instructions, callgrind).
        if not self.acquire(False) and not self.acquire(True, STUCK_LOCK_TIMEOUT):
            self._stuck()
        try:
            i = slot.hint
            if q[i] != slot.a or q[i + 1] != slot.b:
                i = self._find(slot)
            tat = q[i + 3] if i >= 0 else 0
            if tat < now:
                tat = now
            new = tat + cost * limit.interval
            if new - now > limit.tolerance:
                return False, tat - now
            if i < 0:
                i = self._claim(slot, now)
            q[i + 3] = new
            return True, new - now
        finally:
            try:
                self.release()
            except ValueError:  # see _unlock
                pass

    def take(
        self, slots: Sequence[Slot], now: int, cost: int, limits: Sequence[Limit]
    ) -> tuple[bool, list[int]]:
        """GCRA take on several buckets, all or nothing: ``(allowed, waits)``."""
        q = self.words
        self._lock()
        try:
            idx = []
            for slot in slots:
                i = slot.hint
                if q[i] != slot.a or q[i + 1] != slot.b:
                    i = self._find(slot)
                idx.append(i)
            tats = [q[i + 3] if i >= 0 else 0 for i in idx]
            waits = []
            allowed = True
            for tat, limit in zip(tats, limits, strict=True):
                start = tat if tat > now else now
                new = start + cost * limit.interval
                if new - now > limit.tolerance:
                    allowed = False
                waits.append(new - now)
            if not allowed:
                return False, [t - now if t > now else 0 for t in tats]
            for n, slot in enumerate(slots):
                i = idx[n]
                if i < 0:
                    i = idx[n] = self._claim(slot, now, idx)
                q[i + 3] = now + waits[n]
            return True, waits
        finally:
            self._unlock()

    def add(self, slot: Slot, amount: int, ttl: int, now: int) -> int:
        """Add to a counter (created at 0, expiring ``ttl`` ticks later); returns the new value."""
        q = self.words
        self._lock()
        try:
            i = self._find(slot)
            if i < 0 or q[i + 3] <= now:
                if i < 0:
                    i = self._claim(slot, now)
                q[i + 2] = 0
                q[i + 3] = now + ttl
            value = q[i + 2] + amount
            q[i + 2] = value
            return value
        finally:
            self._unlock()

    def read(self, slot: Slot, now: int) -> tuple[int, int] | None:
        """``(value, expires)`` of a live entry, or None."""
        q = self.words
        self._lock()
        try:
            i = self._find(slot)
            if i < 0 or q[i + 3] <= now:
                return None
            return q[i + 2], q[i + 3]
        finally:
            self._unlock()

    def delete(self, slot: Slot) -> None:
        q = self.words
        self._lock()
        try:
            i = self._find(slot)
            if i >= 0:
                q[i] = q[i + 1] = q[i + 2] = q[i + 3] = 0
        finally:
            self._unlock()

    # -- introspection --------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        now = time.monotonic_ns() // 1000
        q = self.words
        live = sum(1 for s in range(self.nslots + PROBE) if q[_W0 + s * 4 + 3] > now)
        return {
            "slots": self.nslots,
            "live": live,
            "evictions": q[_EVICTIONS_WORD],
            "users": struct.unpack_from("<i", self._mm, _USERS_AT)[0],
            "stuck_locks": self.stuck_locks,
            "bytes": HEADER_SIZE + (self.nslots + PROBE) * SLOT_SIZE,
        }

    def close(self) -> None:
        """Unmap; the last user (by the count in the header) also removes the semaphore."""
        if self._mm.closed:
            return
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            users = struct.unpack_from("<i", self._mm, _USERS_AT)[0] - 1
            struct.pack_into("<i", self._mm, _USERS_AT, users)
            if users <= 0:
                with contextlib.suppress(FileNotFoundError):
                    _multiprocessing.sem_unlink(self._sem_name)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.words.release()
        self._mm.close()
        os.close(self._fd)

    def __repr__(self) -> str:
        return f"<SharedTable {self.path.name} {self.nslots} slots>"
