"""Metrics: cheap on the hot path, Prometheus text format aggregated across workers.

prometheus-client in multiprocess mode does the storage (one mmap'd file per process under
``$PROMETHEUS_MULTIPROC_DIR``, which the supervisor sets), the aggregation across workers and
the exposition format. Its increments take a lock and write the mmap: measured 2.1 µs for a
counter and 4.3 µs for a histogram observation, about 10 µs a request for the core metrics,
over 10% of a proxied request. So the hot path never calls it: a child here is a pair of plain
Python numbers (``inc`` is one addition, ``observe`` a ``bisect`` and two additions) and
``flush()`` — run by each worker's sweep, twice a second, and at exit — moves the deltas
into prometheus-client. Metrics are therefore at most ``FLUSH_INTERVAL`` behind.

Families are created once (module level or at compile time) and children bound once
(``family.labels(...)`` caches them); label values must come from a bounded set (route and
upstream names, status codes), never from raw request data.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any, Literal

PREFIX = "gateway_"
FLUSH_INTERVAL = 0.5
#: Proxy latency: sub-millisecond to a minute (long polls, slow uploads).
DEFAULT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

GaugeMode = Literal["sum", "max", "min"]
_GAUGE_MODES = {"sum": "livesum", "max": "livemax", "min": "livemin"}

_children: list[_Child] = []


class _Child:
    __slots__ = ()

    def flush(self) -> None:
        raise NotImplementedError


class CounterChild(_Child):
    __slots__ = ("_flushed", "_prom", "value")

    def __init__(self, prom: Any) -> None:
        self._prom = prom
        self.value: float = 0
        self._flushed: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def flush(self) -> None:
        value = self.value
        delta = value - self._flushed
        if delta:
            self._flushed = value
            self._prom.inc(delta)


class GaugeChild(_Child):
    __slots__ = ("_flushed", "_prom", "value")

    def __init__(self, prom: Any) -> None:
        self._prom = prom
        self.value: float = 0
        self._flushed: float | None = None

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def flush(self) -> None:
        value = self.value
        if value != self._flushed:
            self._flushed = value
            self._prom.set(value)


class HistogramChild(_Child):
    __slots__ = ("_bounds", "_flushed", "_flushed_sum", "_prom", "counts", "sum")

    def __init__(self, prom: Any, bounds: tuple[float, ...]) -> None:
        self._prom = prom
        self._bounds = bounds  # without +Inf: bisect past the end lands in the +Inf bucket
        self.counts = [0] * (len(bounds) + 1)
        self._flushed = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self._flushed_sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def flush(self) -> None:
        counts = self.counts
        flushed = self._flushed
        if counts == flushed:
            return
        # prometheus-client's histogram keeps one value per bucket (made cumulative when
        # exposed) and the sum: move our deltas into them, as its observe() would.
        buckets = self._prom._buckets
        for i, n in enumerate(counts):
            d = n - flushed[i]
            if d:
                buckets[i].inc(d)
                flushed[i] = n
        s = self.sum
        self._prom._sum.inc(s - self._flushed_sum)
        self._flushed_sum = s


class Family:
    """A metric with labels; ``labels(*values)`` returns the (cached) child to update.

    The prometheus-client object is made on first use, not at import: the supervisor sets
    ``PROMETHEUS_MULTIPROC_DIR`` after modules defining families are imported, and
    prometheus-client picks its storage when a value is created."""

    def __init__(
        self, kind: str, name: str, help: str, labels: Sequence[str], make: Any, kw: Any
    ) -> None:
        self.kind = kind
        self.name = name
        self._args = (help, tuple(labels), kw)
        self._make = make
        self._prom: Any = None
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            prom = self._prom
            if prom is None:
                prom = self._prom = _create(self.kind, self.name, *self._args)
            child = self._make(prom.labels(*key) if key else prom)
            self._children[key] = child
            _children.append(child)
        return child


_families: dict[str, Family] = {}


def _create(kind: str, name: str, help: str, labels: tuple[str, ...], kw: Any) -> Any:
    import prometheus_client
    from prometheus_client import values

    if multiprocess_dir() and values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    cls = {
        "counter": prometheus_client.Counter,
        "gauge": prometheus_client.Gauge,
        "histogram": prometheus_client.Histogram,
    }[kind]
    return cls(PREFIX + name, help, labels, registry=None, **kw)


def _family(kind: str, name: str, help: str, labels: Sequence[str], make: Any, **kw: Any) -> Family:
    existing = _families.get(name)
    if existing is not None:
        if existing.kind != kind:
            raise ValueError(f"metric {name} already defined as a {existing.kind}")
        return existing
    fam = Family(kind, name, help, labels, make, kw)
    _families[name] = fam
    return fam


def counter(name: str, help: str, labels: Sequence[str] = ()) -> Family:
    """A counter family; ``name`` without the ``gateway_`` prefix (``requests_total``)."""
    return _family("counter", name, help, labels, CounterChild)


def gauge(name: str, help: str, labels: Sequence[str] = (), mode: GaugeMode = "sum") -> Family:
    """A gauge family; ``mode`` says how workers' values combine (live workers only)."""
    return _family("gauge", name, help, labels, GaugeChild, multiprocess_mode=_GAUGE_MODES[mode])


def histogram(
    name: str, help: str, labels: Sequence[str] = (), buckets: Sequence[float] | None = None
) -> Family:
    bounds = tuple(float(b) for b in (buckets or DEFAULT_BUCKETS))
    return _family(
        "histogram",
        name,
        help,
        labels,
        lambda prom: HistogramChild(prom, bounds),
        buckets=bounds,
    )


def flush() -> None:
    """Move every child's pending changes into prometheus-client (the sweep calls this)."""
    for child in _children:
        child.flush()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def exposition(path: str | None = None) -> bytes:
    """All workers' metrics in the Prometheus text format (read by the supervisor)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path or multiprocess_dir())  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """A worker exited: drop its live gauges, and fold its counters and histograms into one
    ``<type>_archive.db`` per type, so they keep counting without a file per dead process
    (restarts and reloads would otherwise leave files that every scrape reads)."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    path = path or multiprocess_dir()
    if path is None:
        return
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    for typ in ("counter", "histogram"):
        dead = os.path.join(path, f"{typ}_{pid}.db")
        if not os.path.exists(dead):
            continue
        archive = MmapedDict(os.path.join(path, f"{typ}_archive.db"))  # type: ignore[no-untyped-call]
        try:
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):  # type: ignore[no-untyped-call]
                old, _ = archive.read_value(key)  # type: ignore[no-untyped-call]
                archive.write_value(key, old + value, timestamp)  # type: ignore[no-untyped-call]
        finally:
            archive.close()  # type: ignore[no-untyped-call]
        os.unlink(dead)
