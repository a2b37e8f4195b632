"""The node's shared-memory table: exact across processes, bounded, idle keys expire."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from gateway.state.gcra import Limit
from gateway.state.shm import PROBE, SharedTable

LIMIT = Limit(100, 3600, 100, "x")  # 100 per hour: no refill during the test


def _hammer(path: str, nslots: int, key: bytes, n: int, out: multiprocessing.Queue[int]) -> None:
    table = SharedTable(Path(path), nslots)
    slot = table.slot(key)
    admitted = 0
    for _ in range(n):
        now = time.monotonic_ns() // 1000
        if table.take1(slot, now, 1, LIMIT)[0]:
            admitted += 1
    table.close()
    out.put(admitted)


def test_processes_sharing_the_table_admit_exactly_the_burst(tmp_path: Path) -> None:
    path = tmp_path / "t.shm"
    owner = SharedTable(path, 1024)
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue[int] = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(path), 1024, b"k", 400, out)) for _ in range(3)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(counts) == 100, counts
    assert owner.stats()["users"] == 1  # the children closed their handles
    owner.close()


def test_idle_buckets_expire_and_free_their_slot(tmp_path: Path) -> None:
    table = SharedTable(tmp_path / "t.shm", 64)
    fast = Limit(10, 1, 2, "f")  # full again 200 ms after the last take
    slot = table.slot(b"idle")
    now = time.monotonic_ns() // 1000
    assert table.take1(slot, now, 1, fast)[0]
    assert table.stats()["live"] == 1
    # Once expired the slot is free: another key that lands in the same window reuses it.
    later = now + 10_000_000
    other = table.slot(b"other")
    other.base = slot.base  # force the same probe window
    other.hint = other.base
    assert table.take1(other, later, 1, fast)[0]
    assert table.stats()["evictions"] == 0
    table.close()


def test_a_full_window_evicts_the_entry_expiring_first(tmp_path: Path) -> None:
    table = SharedTable(tmp_path / "t.shm", 64)
    now = time.monotonic_ns() // 1000
    long = Limit(1, 3600, 1, "l")
    slots = []
    for i in range(PROBE):
        s = table.slot(b"k%d" % i)
        s.base = s.hint = table.slot(b"k0").base
        slots.append(s)
        assert table.take1(s, now + i, 1, long)[0]  # k0 expires first
    newcomer = table.slot(b"new")
    newcomer.base = newcomer.hint = slots[0].base
    assert table.take1(newcomer, now + PROBE, 1, long)[0]
    assert table.stats()["evictions"] == 1
    # k0 was evicted: its bucket restarts full; the others still refuse.
    assert table.take1(slots[0], now + PROBE, 1, long)[0]
    assert not table.take1(slots[PROBE - 1], now + PROBE, 1, long)[0]
    table.close()


def test_counters_add_and_expire(tmp_path: Path) -> None:
    table = SharedTable(tmp_path / "t.shm", 64)
    slot = table.slot(b"tokens")
    now = time.monotonic_ns() // 1000
    assert table.add(slot, 5, 1_000_000, now) == 5
    assert table.add(slot, 7, 1_000_000, now + 10) == 12
    assert table.read(slot, now + 20) == (12, now + 1_000_000)
    assert table.add(slot, 1, 1_000_000, now + 1_000_001) == 1  # expired: starts again
    table.delete(slot)
    assert table.read(slot, now + 1_000_002) is None
    table.close()


def test_a_table_of_another_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.shm"
    table = SharedTable(path, 64)
    with pytest.raises(ValueError, match="another size"):
        SharedTable(path, 128)
    table.close()
