"""Operations: supervisor and workers, reload under load, crash restart, admin API, metrics,
access log, tracing headers. Real gateway processes, real upstream, real sockets."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import proxy_config
from tests.support.client import Conn, Response, request
from tests.support.procs import GatewayProcess, UpstreamProcess, free_port, run_cli

TRACE = "0af7651916cd43dd8448eb211c80319c"


def _metrics(g: GatewayProcess, headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """{sample name: {labels tuple: value}} from the admin /metrics."""
    resp = g.admin("GET", "/metrics", headers=headers)
    assert resp.status == 200, resp.body
    assert (resp.header("content-type") or "").startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name, {})[key] = sample.value
    return out


def _wait(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _requests_by_code(g: GatewayProcess, route: str) -> dict[str, float]:
    samples = _metrics(g).get("gateway_requests_total", {})
    return {dict(k)["code"]: v for k, v in samples.items() if dict(k)["route"] == route}


class Load:
    """Clients in threads sending requests until stopped: half on keep-alive connections
    (reopened when the gateway says ``Connection: close``), half on a new connection each.
    ``connect`` opens a connection (e.g. a TLS one)."""

    def __init__(
        self,
        port: int,
        threads: int = 4,
        path: str = "/echo",
        connect: Callable[[int], Conn] = Conn,
    ) -> None:
        self.port = port
        self.path = path
        self.connect = connect
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
            for i in range(threads)
        ]

    def _record(self, resp: Response | None, error: str | None) -> None:
        with self._lock:
            if resp is not None and resp.status == 200:
                self.ok += 1
            else:
                self.failures.append(error or f"status {resp.status if resp else '?'}")

    def _run(self, keep_alive: bool) -> None:
        conn: Conn | None = None
        while not self._stop.is_set():
            try:
                if keep_alive:
                    if conn is None:
                        conn = self.connect(self.port)
                    resp = conn.request("GET", self.path)
                    if (resp.header("connection") or "").lower() == "close":
                        conn.close()
                        conn = None
                else:
                    with self.connect(self.port) as once:
                        resp = once.request("GET", self.path)
                self._record(resp, None)
            except Exception as exc:
                self._record(None, repr(exc))
                if conn is not None:
                    conn.close()
                    conn = None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)


def _write_config(g: GatewayProcess, config: dict[str, Any] | str) -> None:
    if isinstance(config, dict):
        config = yaml.safe_dump(config, sort_keys=False)
    g.config_path.write_text(config)


def _base(upstream: UpstreamProcess, workers: int = 2, **extra: Any) -> dict[str, Any]:
    config = proxy_config(upstream.url)
    config["workers"] = workers
    config.update(extra)
    return config


def test_requests_spread_across_workers(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=2))
    for _ in range(200):  # a new connection each: the kernel spreads connections
        assert request(g.port, "GET", "/echo").status == 200

    def per_worker() -> dict[str, float] | None:
        samples = _metrics(g).get("gateway_worker_requests_total", {})
        counts = {dict(k)["worker"]: v for k, v in samples.items()}
        return counts if sum(counts.values()) == 200 else None

    counts = _wait(per_worker, what="200 requests in the metrics")
    assert set(counts) == {"0", "1"}
    assert min(counts.values()) >= 40, counts  # both workers took a fair share
    status = g.admin("GET", "/status").json()
    assert len(status["workers"]) == 2
    assert len({w["pid"] for w in status["workers"]}) == 2
    assert all(w["ready"] for w in status["workers"])


def test_metrics_match_the_requests_sent(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=2))
    with Conn(g.port) as c:
        for _ in range(30):
            assert c.request("GET", "/echo").status == 200
        for _ in range(7):
            assert c.request("GET", "/status/503").status == 503
    assert request(g.port, "GET", "/x", host="nowhere.test").status == 200  # one route: all

    got = _wait(
        lambda: (r := _requests_by_code(g, "all")).get("200") == 31 and r.get("503") == 7 and r,
        what="request counters",
    )
    assert got == {"200": 31.0, "503": 7.0}
    m = _metrics(g)
    count = m["gateway_request_duration_seconds_count"][(("route", "all"),)]
    assert count == 38
    inf = m["gateway_request_duration_seconds_bucket"][(("le", "+Inf"), ("route", "all"))]
    assert inf == 38
    assert m["gateway_upstream_duration_seconds_count"][(("upstream", "backend"),)] == 38
    assert m["gateway_request_duration_seconds_sum"][(("route", "all"),)] > 0
    assert "gateway_connections_open" in m
    assert m["gateway_workers"][()] == 2


def test_unmatched_requests_are_counted_under_their_own_label(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    config = proxy_config(upstream.url)
    config["routes"][0]["match"] = {"path_prefix": "/api"}
    g = start_gateway(config)
    assert request(g.port, "GET", "/nothing-here").status == 404
    assert _wait(lambda: _requests_by_code(g, "unmatched").get("404") == 1, what="404 counted")


def test_admin_token_is_enforced(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    admin = {"bind": f"127.0.0.1:{free_port()}", "token": "s3cret-token"}
    g = start_gateway(_base(upstream, workers=1, admin=admin))
    for path in ("/metrics", "/status"):
        resp = g.admin("GET", path)
        assert resp.status == 401
        assert resp.header("www-authenticate") == 'Bearer realm="admin"'
        assert g.admin("GET", path, headers=[("authorization", "Bearer wrong")]).status == 401
        assert g.admin("GET", path, headers=[("authorization", "s3cret-token")]).status == 401
        ok = g.admin("GET", path, headers=[("authorization", "Bearer s3cret-token")])
        assert ok.status == 200
    assert g.admin("POST", "/reload").status == 401
    # Probes stay open: orchestrators poll them without credentials.
    assert g.admin("GET", "/healthz").status == 200
    assert g.admin("GET", "/readyz").status == 200
    assert g.admin("GET", "/nope", headers=[("authorization", "Bearer s3cret-token")]).status == 404
    assert (
        g.admin("GET", "/reload", headers=[("authorization", "Bearer s3cret-token")]).status == 405
    )


def test_reload_under_load_fails_no_request(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=2))
    full = yaml.safe_load(g.config_path.read_text())
    first = g.admin("GET", "/status").json()["config"]
    assert first["generation"] == 1
    versions = {first["version"]}
    with Load(g.port, threads=4) as load:
        _wait(lambda: load.ok > 50, what="load to start")
        for i in range(3):
            full["routes"][0]["name"] = f"all-{i}"  # a real change: a new version
            _write_config(g, full)
            if i == 1:
                g.proc.send_signal(signal.SIGHUP)  # the same reload, by signal
                _wait(
                    lambda i=i: g.admin("GET", "/status").json()["config"]["generation"] == i + 2,
                    what="SIGHUP reload",
                )
            else:
                resp = g.admin("POST", "/reload")
                assert resp.status == 200, resp.body
                assert resp.json()["result"] == "success"
            status = g.admin("GET", "/status").json()
            assert status["config"]["generation"] == i + 2
            versions.add(status["config"]["version"])
            assert status["routes"] == [f"all-{i}"]
            # An invalid config in the middle of it all: rejected, old one keeps serving.
            if i == 1:
                broken = dict(full, routes=[{"name": "x", "upstream": "missing"}])
                _write_config(g, broken)
                resp = g.admin("POST", "/reload")
                assert resp.status == 422
                body = resp.json()
                assert body["result"] == "failure"
                assert any("unknown upstream 'missing'" in e for e in body["errors"]), body
                assert g.admin("GET", "/status").json()["config"]["generation"] == i + 2
        before = load.ok
        _wait(lambda: load.ok > before + 50, what="load after the reloads")
    assert load.failures == [], load.failures[:5]
    assert len(versions) == 4
    m = _metrics(g)["gateway_config_reloads_total"]
    assert m[(("result", "success"),)] == 3
    assert m[(("result", "failure"),)] == 1
    errors = [
        r
        for r in g.log_records()
        if r["msg"] == "reload rejected: %s" or "reload rejected" in r["msg"]
    ]
    assert errors and "unknown upstream 'missing'" in json.dumps(errors)
    # The old generations drained and exited: only two workers remain.
    _wait(lambda: not g.admin("GET", "/status").json()["draining_workers"], what="old workers gone")
    assert len(g.admin("GET", "/status").json()["workers"]) == 2


def test_reload_finishes_a_long_stream_on_the_old_worker(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=1))
    full = yaml.safe_load(g.config_path.read_text())
    with Conn(g.port) as c:
        # 15 pieces 0.1 s apart: still streaming while the reload happens.
        c.send(b"GET /stream?chunks=15&size=10&delay=0.1 HTTP/1.1\r\nHost: t\r\n\r\n")
        full["routes"][0]["name"] = "renamed"
        _write_config(g, full)
        assert g.admin("POST", "/reload").status == 200
        resp = c.read_response()
        assert resp.status == 200
        assert resp.body == b"s" * 150
        assert c.closed_by_peer()  # then the draining worker closes the connection
    assert request(g.port, "GET", "/echo").status == 200


def test_killed_worker_is_restarted_and_others_keep_serving(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=2))
    victim = g.admin("GET", "/status").json()["workers"][0]["pid"]
    for _ in range(20):
        assert request(g.port, "GET", "/echo").status == 200
    _wait(lambda: _requests_by_code(g, "all").get("200") == 20, what="20 requests counted")
    with Load(g.port, threads=2) as load:
        _wait(lambda: load.ok > 30, what="load to start")
        os.kill(victim, signal.SIGKILL)

        def restarted() -> bool:
            workers = g.admin("GET", "/status").json()["workers"]
            pids = {w["pid"] for w in workers}
            return victim not in pids and len(pids) == 2 and all(w["ready"] for w in workers)

        _wait(restarted, what="the worker to be restarted")
        before = load.ok
        _wait(lambda: load.ok > before + 30, what="load after the restart")
    # Only what was in flight on the killed worker fails: at most one request per client
    # thread, and as a cut connection. New connections queue on the sockets the supervisor
    # holds until the replacement accepts them: none is refused.
    assert len(load.failures) <= 2, load.failures
    assert all("Refused" not in f for f in load.failures), load.failures
    assert g.alive()
    died = [r for r in g.log_records() if r["msg"].startswith("worker died")]
    assert died and "SIGKILL" in died[0]["msg"]
    assert _metrics(g)["gateway_worker_restarts_total"][()] == 1
    # The dead worker's counts (flushed before the kill) are kept, not lost with it.
    assert _requests_by_code(g, "all")["200"] >= 20


def test_readyz_and_healthz(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=1))
    assert g.admin("GET", "/healthz").json() == {"status": "ok"}
    assert g.admin("GET", "/readyz").json() == {"status": "ready"}


def test_access_log_lines_and_sigusr1_reopen(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    config = _base(upstream, workers=2, access_log={"path": str(log_path)})
    g = start_gateway(config)
    with Conn(g.port) as c:
        resp = c.request(
            "POST",
            "/echo?secret=1",
            headers=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-01")],
            body=b"hello",
        )
        assert resp.status == 200
        rid = resp.header("x-request-id")
    lines = _wait(lambda: log_path.read_text().splitlines(), what="an access log line")
    rec = json.loads(lines[0])
    assert set(rec) == {
        "ts",
        "request_id",
        "trace_id",
        "client",
        "method",
        "path",
        "route",
        "upstream",
        "status",
        "bytes_in",
        "bytes_out",
        "duration",
        "upstream_duration",
        "user",
        "code",
        "plugins",
    }
    assert rec["request_id"] == rid
    assert rec["trace_id"] == TRACE
    assert rec["client"] == "127.0.0.1"
    assert (rec["method"], rec["path"], rec["route"]) == ("POST", "/echo", "all")
    assert rec["upstream"] == f"127.0.0.1:{upstream.port}"
    assert (rec["status"], rec["bytes_in"]) == (200, 5)
    assert rec["bytes_out"] == len(resp.body)
    assert 0 < rec["upstream_duration"] <= rec["duration"]
    assert abs(rec["ts"] - time.time()) < 60
    assert "secret" not in lines[0]  # query strings may carry credentials: not logged

    rotated = tmp_path / "access.log.1"
    log_path.rename(rotated)
    g.proc.send_signal(signal.SIGUSR1)  # logrotate's postrotate

    def reopened() -> bool:
        assert request(g.port, "GET", "/after-rotate").status == 200
        return log_path.exists() and "/after-rotate" in log_path.read_text()

    _wait(reopened, what="the access log to be reopened")
    assert "/after-rotate" not in rotated.read_text().split("\n", 1)[0]


def test_access_log_off_per_route(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess], tmp_path: Path
) -> None:
    log_path = tmp_path / "access.log"
    config = _base(upstream, workers=1, access_log={"path": str(log_path)})
    config["routes"].insert(
        0,
        {
            "name": "quiet",
            "match": {"path_prefix": "/health"},
            "upstream": "backend",
            "access_log": False,
        },
    )
    g = start_gateway(config)
    assert request(g.port, "GET", "/health/x").status == 200
    assert request(g.port, "GET", "/loud").status == 200
    lines = _wait(lambda: log_path.read_text().splitlines(), what="an access log line")
    assert [json.loads(x)["path"] for x in lines] == ["/loud"]
    # Still counted in the metrics.
    assert _wait(lambda: _requests_by_code(g, "quiet").get("200") == 1, what="quiet counted")


def test_traceparent_propagated_and_generated(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=1))
    upstream.reset()
    incoming = f"00-{TRACE}-b7ad6b7169203331-01"
    request(g.port, "GET", "/echo", headers=[("traceparent", incoming), ("tracestate", "a=1")])
    request(g.port, "GET", "/echo", headers=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-00")])
    request(g.port, "GET", "/echo")
    request(g.port, "GET", "/echo", headers=[("traceparent", "00-zzzz-not-valid")])
    seen = [
        {n.lower(): v for n, v in r["headers"]}
        for r in upstream.received()
        if r["target"] == "/echo"
    ]
    assert len(seen) == 4
    kept = seen[0]["traceparent"].split("-")
    assert kept[0] == "00" and kept[1] == TRACE and kept[3] == "01"
    assert kept[2] != "b7ad6b7169203331" and len(kept[2]) == 16  # the gateway is a new hop
    assert seen[0]["tracestate"] == "a=1"
    assert seen[1]["traceparent"].split("-")[3] == "00"  # not sampled stays not sampled
    for headers in seen[2:]:  # absent or invalid: a new trace
        version, trace_id, parent, flags = headers["traceparent"].split("-")
        assert version == "00" and len(trace_id) == 32 and trace_id != TRACE
        assert int(trace_id, 16) and len(parent) == 16 and flags == "01"
    assert seen[2]["traceparent"] != seen[3]["traceparent"]


def test_sampling_ratio_zero_generates_unsampled_traces(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=1, tracing={"sample_ratio": 0.0}))
    upstream.reset()
    request(g.port, "GET", "/echo")
    request(g.port, "GET", "/echo", headers=[("traceparent", f"00-{TRACE}-b7ad6b7169203331-01")])
    seen = [
        {n.lower(): v for n, v in r["headers"]}["traceparent"]
        for r in upstream.received()
        if r["target"] == "/echo"
    ]
    assert seen[0].endswith("-00")
    assert seen[1].endswith("-01")  # the client's decision is honoured


def test_tracing_disabled_passes_the_header_through(
    upstream: UpstreamProcess, start_gateway: Callable[..., GatewayProcess]
) -> None:
    g = start_gateway(_base(upstream, workers=1, tracing={"enabled": False}))
    upstream.reset()
    incoming = f"00-{TRACE}-b7ad6b7169203331-01"
    request(g.port, "GET", "/echo", headers=[("traceparent", incoming)])
    request(g.port, "GET", "/echo")
    seen = [{n.lower(): v for n, v in r["headers"]} for r in upstream.received()]
    assert seen[0]["traceparent"] == incoming
    assert "traceparent" not in seen[1]


def test_unwritable_access_log_is_a_config_error(upstream: UpstreamProcess, tmp_path: Path) -> None:
    config = _base(upstream, workers=1, access_log={"path": "/proc/no/such/dir/access.log"})
    config["listeners"] = [{"name": "p", "bind": f"127.0.0.1:{free_port()}"}]
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config))
    for verb in ("check", "run"):
        result = run_cli(verb, "-c", str(path))
        assert result.returncode == 2, (verb, result.stderr)
        assert "access_log.path" in result.stderr and "No such file" in result.stderr
