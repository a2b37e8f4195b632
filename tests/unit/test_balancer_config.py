"""The ``upstreams:`` load-balancing keys: compiled into policies, or refused with a path."""

from __future__ import annotations

from tests.unit.test_config import errors, load

HEAD = """
listeners: [{name: p, bind: "127.0.0.1:8080"}]
routes: [{name: r, match: {path_prefix: /}, upstream: api}]
upstreams:
  api:
"""


def test_defaults() -> None:
    up = load(HEAD + '    targets: [{url: "http://10.0.0.1:80"}, {url: "http://10.0.0.2"}]\n')
    api = up.upstreams["api"]
    assert api.balancer_class.name == "round_robin"
    assert api.health is not None and api.health.check is None and not api.health.fail_fast
    assert api.health.outlier.consecutive == 5 and api.health.outlier.max_share == 0.5
    assert api.retry is not None and api.retry.attempts == 2
    assert api.retry.conditions == {"connect_failure", "reset"}
    assert api.retry.statuses == {502, 503, 504}
    assert api.timeouts.total == 0.0
    assert all(t.limit == 1 << 30 for t in api.targets)
    assert up.router.routes[0].timeouts is api.timeouts


def test_everything_set() -> None:
    rt = load(
        HEAD
        + """\
    balancer: consistent_hash
    hash_on: header
    hash_key: X-Tenant
    targets: [{url: "http://10.0.0.1:80", weight: 3}]
    timeouts: {connect: 1s, read: 5s, total: 9s}
    health_check: {path: /up, interval: 2s, timeout: 5s, healthy: 1, unhealthy: 4,
                   expected_statuses: [200, "300-302"], jitter: 0.5}
    outlier_detection: {consecutive_failures: 0, base_ejection: 1s, max_ejection: 10s,
                        max_ejected_percent: 30}
    all_down: fail_fast
    slow_start: 20s
    retries: {attempts: 3, retry_on: [connect_failure, 500], budget: 0.5, min_per_second: 1,
              backoff: {base: 10ms, max: 1s}, max_body: 1k}
    circuit_breaker: {max_connections: 50, max_pending: 20}
"""
    )
    api = rt.upstreams["api"]
    assert api.balancer_class.name == "consistent_hash" and api.hash_key is not None
    check = api.health.check if api.health is not None else None
    assert check is not None
    assert (check.path, check.interval, check.timeout) == ("/up", 2.0, 2.0)  # timeout ≤ interval
    assert check.statuses == {200, 300, 301, 302} and check.jitter == 0.5
    assert api.health is not None and api.health.fail_fast and api.health.slow_start == 20.0
    assert api.health.outlier.consecutive == 0 and api.health.outlier.max_share == 0.3
    assert api.retry is not None
    assert (api.retry.attempts, api.retry.max_body) == (3, 1024)
    assert api.retry.conditions == {"connect_failure"} and api.retry.statuses == {500}
    assert api.timeouts.total == 9.0
    (t,) = api.targets
    assert t.limit == 20 and t.pool.max_idle == 50 and t.weight == 3


def test_retries_off_and_route_timeouts() -> None:
    rt = load(
        """
listeners: [{name: p, bind: "127.0.0.1:8080"}]
upstreams:
  api:
    targets: [{url: "http://10.0.0.1"}]
    retries: {attempts: 1}
    timeouts: {connect: 3s, read: 30s}
routes:
  - {name: r, match: {path_prefix: /}, upstream: api, timeouts: {read: 2s, total: 4s}}
"""
    )
    assert rt.upstreams["api"].retry is None
    route = rt.router.routes[0]
    assert (route.timeouts.connect, route.timeouts.read, route.timeouts.total) == (3.0, 2.0, 4.0)


def test_host_names_become_targets_when_resolved() -> None:
    rt = load(HEAD + '    targets: [{url: "http://api.internal:9000"}, {url: "http://10.0.0.9"}]\n')
    api = rt.upstreams["api"]
    # the literal is a target at once; the name is resolved when a worker starts
    assert [t.label for t in api.targets] == ["10.0.0.9:80"]
    assert [(s.hostname, s.port, s.literal) for s in api.specs] == [
        ("api.internal", 9000, False),
        ("10.0.0.9", 80, True),
    ]


def test_bad_values_are_refused_with_their_path() -> None:
    def bad(body: str) -> list[str]:
        return errors(HEAD + '    targets: [{url: "http://10.0.0.1"}]\n' + body)

    assert any(
        "upstreams.api.hash_key" in e and "required" in e
        for e in bad("    balancer: consistent_hash\n    hash_on: cookie\n")
    )
    assert any(
        "upstreams.api.hash_key" in e
        for e in bad("    balancer: consistent_hash\n    hash_on: header\n    hash_key: 'a b'\n")
    )
    assert any("upstreams.api.balancer" in e for e in bad("    balancer: fastest\n"))
    assert any(
        "expected_statuses" in e
        for e in bad('    health_check: {expected_statuses: ["299-200"]}\n')
    )
    assert any("retries.retry_on" in e for e in bad("    retries: {retry_on: [teapot]}\n"))
    assert any("retries.retry_on" in e for e in bad("    retries: {retry_on: [404]}\n"))
    assert any("retries.budget" in e for e in bad("    retries: {budget: 2}\n"))
    assert any(
        "circuit_breaker.max_pending" in e for e in bad("    circuit_breaker: {max_pending: 0}\n")
    )
    assert any("all_down" in e for e in bad("    all_down: maybe\n"))
    assert any(
        "outlier_detection.max_ejected_percent" in e
        for e in bad("    outlier_detection: {max_ejected_percent: 101}\n")
    )
