"""The upstream layer's metrics (docs/metrics.md), bound once per upstream at compile time.

- ``gateway_upstream_target_up{upstream,target}``: 1 while the target is available (healthy
  and not ejected), 0 otherwise; across workers the minimum (0 if any worker has it down).
- ``gateway_retries_total{upstream}``: retries sent (the stale keep-alive retry not counted).
- ``gateway_retry_budget_exhausted_total{upstream}``: retries refused by the retry budget.
- ``gateway_upstream_ejections_total{upstream,target}``: passive (outlier) ejections.
- ``gateway_upstream_overflow_total{upstream}``: requests refused with 503
  ``upstream_overloaded`` because every candidate target was at its circuit-breaker limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway import metrics

if TYPE_CHECKING:
    from gateway.upstream.target import Target


def _family(name: str) -> Any:
    """The metric family (``gateway.metrics`` returns the same one for the same name)."""
    if name == "up":
        return metrics.gauge(
            "upstream_target_up",
            "1 while an upstream target is available (healthy, not ejected)",
            ("upstream", "target"),
            mode="min",
        )
    if name == "retries":
        return metrics.counter(
            "retries_total", "requests retried on another upstream target", ("upstream",)
        )
    if name == "budget":
        return metrics.counter(
            "retry_budget_exhausted_total",
            "retries not made because the upstream's retry budget was spent",
            ("upstream",),
        )
    if name == "ejections":
        return metrics.counter(
            "upstream_ejections_total",
            "upstream targets ejected after consecutive failures",
            ("upstream", "target"),
        )
    return metrics.counter(
        "upstream_overflow_total",
        "requests refused because every upstream target was at its limit",
        ("upstream",),
    )


class UpstreamStats:
    """Metric children of one upstream; per-target ones cached by label (DNS may add some)."""

    __slots__ = ("_ejections", "_up", "budget_exhausted", "name", "overflow", "retries")

    def __init__(self, name: str) -> None:
        self.name = name
        self.retries = _family("retries").labels(name)
        self.budget_exhausted = _family("budget").labels(name)
        self.overflow = _family("overflow").labels(name)
        self._up: dict[str, Any] = {}
        self._ejections: dict[str, Any] = {}

    def target_up(self, t: Target) -> None:
        child = self._up.get(t.label)
        if child is None:
            child = self._up[t.label] = _family("up").labels(self.name, t.label)
        child.set(1 if t.available else 0)

    def ejected(self, t: Target) -> None:
        child = self._ejections.get(t.label)
        if child is None:
            child = self._ejections[t.label] = _family("ejections").labels(self.name, t.label)
        child.inc()
