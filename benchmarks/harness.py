"""The peak harness: ``python -m benchmarks``.

Theory of operation
-------------------
1. CPUs are split: the proxy under test gets CPU 0 (CPUs 0..n-1 in a scaling step with n
   workers); the load generator, the stub upstreams and this harness get the rest. With a
   single CPU nothing is pinned and the results say so.
2. The stub upstreams start once (``benchmarks.upstreams``: nginx, or the asyncio fallback).
3. For each scenario (``benchmarks.scenarios``) a fresh gateway and a fresh nginx reverse proxy
   are started, both with a route for it, warmed up, then measured in turn, A B A B, for the
   configured repetitions. A pair during which other processes took the proxy's CPU (a shared
   machine) is run again, up to ``--retry-noisy`` times, and the quietest attempt kept.
4. One measurement: read the proxy's CPU time (utime and stime of all its processes), run wrk
   (or Locust) for the window, read it again. CPU µs per request = CPU time / completed
   requests. Requests/s and p50/p99 come from the load generator. /proc/stat gives how busy
   the CPUs were with anything else (the noise indicator).
5. Idle scenarios open N keep-alive connections (one request each, then idle) and read the
   RSS of the proxy's worker processes before and while they are held.
6. Medians of the repetitions and the ratio gateway/nginx go to stdout, ``results.json``,
   ``results.md``, ``machine.json`` and PNG charts in the output directory.

Everything started is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen, machine, nginx, profile, report, tlscert
from benchmarks.procs import (
    Proc,
    Processes,
    available_cpus,
    cpu_busy_seconds,
    cpu_seconds,
    descendants,
    free_port,
    rss_kb,
    wait_listening,
)
from benchmarks.scenarios import BY_NAME, PLANNED, Scenario, select
from benchmarks.upstreams import Upstream, start_llm, start_static

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SCALING_SCENARIO = "plain_get"
#: Share of the CPUs used by other processes above which a run is flagged as noisy.
NOISE_LIMIT = 0.05
#: Medians reported per proxy, and those also given as a ratio gateway/nginx.
MEDIAN_KEYS = (
    "rps", "p50_ms", "p99_ms", "cpu_us_per_req", "user_us_per_req", "sys_us_per_req",
    "cpu_util", "foreign_util", "load_foreign_util",
)  # fmt: skip
RATIO_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "user_us_per_req", "sys_us_per_req")


@dataclass(frozen=True, slots=True)
class Settings:
    duration: int
    repetitions: int
    warmup: int
    connections: int
    retry_noisy: int  # times a noisy A B pair is run again
    loadgen: str  # "wrk" or "locust"
    wrk: str | None
    py_spy: str | None  # --profile: py-spy's path
    listener_sharing: str = "reuseport"  # the gateway's listener_sharing (--listener-sharing)


@dataclass(frozen=True, slots=True)
class CpuSplit:
    proxy: list[int]
    load: list[int]
    pinned: bool

    @classmethod
    def for_workers(cls, cpus: list[int], workers: int) -> CpuSplit:
        if len(cpus) < 2:
            return cls(cpus, cpus, pinned=False)
        workers = min(workers, len(cpus))
        rest = cpus[workers:] or cpus  # more workers than spare CPUs: load shares them all
        return cls(cpus[:workers], rest, pinned=True)

    @property
    def shared(self) -> bool:
        return bool(set(self.proxy) & set(self.load))


@dataclass(slots=True)
class Bench:
    """What every step of a run needs."""

    settings: Settings
    split: CpuSplit
    procs: Processes
    work: Path  # temporary: configs, logs, wrk scripts
    out: Path  # results
    nginx_binary: str | None
    git_commit: str | None = None
    upstreams: dict[str, Upstream] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def upstream_pids(self) -> list[int]:
        return [pid for up in self.upstreams.values() for proc in up.procs for pid in proc.pids()]


class ProxyUnderTest:
    """A running gateway (N processes on one port) or nginx (master + N workers)."""

    def __init__(
        self,
        name: str,
        port: int,
        procs: list[Proc],
        scheme: str = "http",
        admin_port: int | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.procs = procs
        self.scheme = scheme
        self.admin_port = admin_port  # the gateway's admin listener

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [pid for proc in self.procs for pid in proc.pids()]

    def worker_pids(self) -> list[int]:
        """Processes that serve connections: the gateway's and nginx's workers."""
        return [pid for proc in self.procs for pid in descendants(proc.pid)]

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}; its log "
                    f"({proc.log_path}):\n{proc.log_tail()}"
                )


# -- starting the proxies ------------------------------------------------------------------


def tls_files(bench: Bench, scenarios: list[Scenario]) -> tuple[Path, Path] | None:
    """The certificate and key when the scenarios are HTTPS ones (all or none of them)."""
    if not any(s.tls for s in scenarios):
        return None
    if not all(s.tls for s in scenarios):
        raise ValueError("HTTPS and plain scenarios cannot share one proxy")
    return tlscert.write_certificate(bench.work / "tls")


def gateway_config(
    port: int,
    upstreams: dict[str, Upstream],
    scenarios: list[Scenario],
    workers: int = 1,
    access_log: str = "-",
    listener_sharing: str = "reuseport",
    admin_port: int | None = None,
    tls: tuple[Path, Path] | None = None,
    redis_url: str | None = None,
) -> dict[str, Any]:
    keepalive = {"max_idle": 1024, "max_requests": 10000}
    config_upstreams: dict[str, Any] = {
        name: {"targets": [{"url": up.url}], "keepalive": keepalive}
        for name, up in upstreams.items()
    }
    for s in scenarios:
        if s.targets > 1:
            config_upstreams[s.upstream_name] = {
                "balancer": s.balancer,
                "targets": [{"url": upstreams[s.upstream].url}] * s.targets,
                "keepalive": keepalive,
            }
    listener: dict[str, Any] = {"name": "public", "bind": f"127.0.0.1:{port}"}
    if tls is not None:
        listener["tls"] = {"certificates": [{"cert": str(tls[0]), "key": str(tls[1])}]}
    config: dict[str, Any] = {
        "workers": workers,
        "admin": {"bind": f"127.0.0.1:{admin_port or free_port()}"},
        "listener_sharing": listener_sharing,
        "listeners": [listener],
        # Scenarios log only where their route says so (``observed_get``).
        "access_log": {"path": access_log},
        "upstreams": config_upstreams,
        "routes": [s.gateway_route() for s in scenarios],
        "limits": {"max_connections": nginx.PROXY_WORKER_CONNECTIONS},
        "log": {"level": "warning"},
    }
    if redis_url is not None:  # scenarios with ``redis=True`` (rate_limit_redis)
        config["state"] = {"backend": "redis", "url": redis_url}
    return config


def start_redis(bench: Bench, directory: Path) -> str:
    """A redis-server for the scenarios that need one, on the load CPUs; returns its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the Redis scenarios need redis-server (apt-get install redis-server)")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir"]
    proc = bench.procs.start(
        "redis", [*argv, str(directory)], directory / "redis.log", cpus=bench.split.load
    )
    wait_listening([proc], port)
    return f"redis://127.0.0.1:{port}/0"


def start_gateway(
    bench: Bench, directory: Path, workers: int, scenarios: list[Scenario]
) -> ProxyUnderTest:
    """One gateway (supervisor + ``workers`` worker processes, ``workers: N`` in its config),
    pinned with its children to the proxy CPUs."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin_port = free_port()
    conf = directory / "gateway.yaml"
    tls = tls_files(bench, scenarios)
    redis_url = start_redis(bench, directory / "redis") if any(s.redis for s in scenarios) else None
    config = gateway_config(
        port,
        bench.upstreams,
        scenarios,
        workers,
        str(directory / "access.log"),
        bench.settings.listener_sharing,
        admin_port,
        tls,
        redis_url,
    )
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = [
        bench.procs.start(
            "gateway",
            [sys.executable, "-m", "gateway", "run", "-c", str(conf), "--log-format", "text"],
            directory / "gateway.log",
            cpus=bench.split.proxy,
            env=env,
            cwd=ROOT,
        )
    ]
    proxy = ProxyUnderTest("gateway", port, started, "https" if tls else "http", admin_port)
    try:
        wait_listening(started, port)
        _wait_ready(started[0], admin_port)
    except Exception:
        for proc in started:
            bench.procs.stop(proc)
        raise
    return proxy


def _wait_ready(proc: Proc, admin_port: int, timeout: float = 30.0) -> None:
    """Until the admin /readyz says every worker is ready (the socket listens earlier)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.alive():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the gateway did not become ready; its log:\n{proc.log_tail()}")


def start_nginx_proxy(
    bench: Bench, directory: Path, binary: str, workers: int, scenarios: list[Scenario]
) -> ProxyUnderTest:
    port = free_port()
    upstream_ports = {name: up.port for name, up in bench.upstreams.items()}
    tls = tls_files(bench, scenarios)
    nginx.write_proxy_config(directory, port, workers, upstream_ports, scenarios, tls)
    proc = bench.procs.start(
        "nginx proxy",
        nginx.argv(binary, directory, "proxy"),
        directory / "proxy.out",
        cpus=bench.split.proxy,
    )
    try:
        wait_listening([proc], port)
        deadline = time.monotonic() + 10  # and all workers forked
        while len(descendants(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        bench.procs.stop(proc)
        raise
    return ProxyUnderTest("nginx", port, [proc], "https" if tls else "http")


def start_proxies(
    bench: Bench, directory: Path, workers: int, scenarios: list[Scenario]
) -> list[ProxyUnderTest]:
    started = [start_gateway(bench, directory / "gateway", workers, scenarios)]
    if bench.nginx_binary is not None:
        try:
            started.append(
                start_nginx_proxy(
                    bench, directory / "nginx-proxy", bench.nginx_binary, workers, scenarios
                )
            )
        except Exception:
            stop_proxies(bench, started)
            raise
    return started


def stop_proxies(bench: Bench, proxies: list[ProxyUnderTest]) -> None:
    for proxy in proxies:
        for proc in proxy.procs:
            bench.procs.stop(proc)


# -- measuring -------------------------------------------------------------------------------


def measure_load(
    bench: Bench,
    proxy: ProxyUnderTest,
    scenario: Scenario,
    duration: int,
    connections: int,
    label: str,
) -> dict[str, Any]:
    """One load window against ``proxy``; the sample's numbers (see README: Method)."""
    settings, split = bench.settings, bench.split
    proxy.check_alive()
    pids = proxy.pids()
    background = bench.upstream_pids()
    user0, sys0 = cpu_seconds(pids)
    busy0, steal0 = cpu_busy_seconds(split.proxy)
    load_busy0, _ = cpu_busy_seconds(split.load)
    ours0 = _own_and_children_cpu() + sum(cpu_seconds(background))
    wall0 = time.monotonic()
    if settings.loadgen == "wrk":
        assert settings.wrk is not None
        result = loadgen.run_wrk(
            settings.wrk,
            proxy.url + scenario.path,
            loadgen.write_wrk_script(scenario, bench.work),
            connections,
            threads=len(split.load),
            duration=duration,
            cpus=split.load,
        )
    else:
        result = loadgen.run_locust(
            scenario,
            proxy.url,
            connections,
            processes=len(split.load),
            duration=duration,
            cpus=split.load,
            report_prefix=bench.out / "locust" / label,
        )
    wall = time.monotonic() - wall0
    user1, sys1 = cpu_seconds(pids)
    busy1, steal1 = cpu_busy_seconds(split.proxy)
    load_busy1, _ = cpu_busy_seconds(split.load)
    ours1 = _own_and_children_cpu() + sum(cpu_seconds(background))
    proxy.check_alive()
    user, system = user1 - user0, sys1 - sys0
    cpu = user + system
    n = result.requests
    capacity = wall * len(split.proxy)
    load_capacity = wall * len(split.load)
    ours = ours1 - ours0  # load generator, upstreams and harness: expected on the load CPUs
    return {
        "requests": n,
        "duration_s": round(result.duration_s, 3),
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_req": round(cpu * 1e6 / n, 2) if n else None,
        # The split: kernel time (syscalls, TCP) is roughly what any proxy pays; user time is
        # the proxy's own code.
        "user_us_per_req": round(user * 1e6 / n, 2) if n else None,
        "sys_us_per_req": round(system * 1e6 / n, 2) if n else None,
        # Share of the proxy's CPUs it used: near 1.0 it was the bottleneck; well below,
        # the load generator or upstream was.
        "cpu_util": round(cpu / capacity, 3),
        # Share of the proxy's CPUs used by other processes (the noise indicator; near 0 on a
        # quiet machine with pinning), and the same for the load generator's CPUs.
        "foreign_util": round(max(0.0, busy1 - busy0 - cpu) / capacity, 3),
        "load_foreign_util": (
            None
            if split.shared
            else round(max(0.0, load_busy1 - load_busy0 - ours) / load_capacity, 3)
        ),
        "steal_util": round((steal1 - steal0) / capacity, 3),
        "errors": result.errors,
        "tool": result.tool,
    }


def _own_and_children_cpu() -> float:
    """CPU seconds of this harness and its waited-for children (wrk, Locust)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def summarise(
    runs: dict[str, list[dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, float], dict[str, list[float]]]:
    """Medians per proxy; ratios gateway/nginx, each the median of the per-pair ratios (a
    gateway run against the nginx run right after it, so drift between pairs cancels); and
    the range of those pair ratios."""
    median: dict[str, dict[str, float]] = {}
    for proxy, samples in runs.items():
        median[proxy] = {}
        for key in MEDIAN_KEYS:
            values = [s[key] for s in samples if s.get(key) is not None]
            if values:
                median[proxy][key] = round(statistics.median(values), 3)
    ratio: dict[str, float] = {}
    ratio_range: dict[str, list[float]] = {}
    if "gateway" in runs and "nginx" in runs:
        for key in RATIO_KEYS:
            pairs = [
                g[key] / n[key]
                for g, n in zip(runs["gateway"], runs["nginx"], strict=True)
                if g.get(key) is not None and n.get(key)
            ]
            if pairs:
                ratio[key] = round(statistics.median(pairs), 3)
                ratio_range[key] = [round(min(pairs), 3), round(max(pairs), 3)]
    return median, ratio, ratio_range


def redis_batches(gateway: ProxyUnderTest) -> dict[str, Any] | None:
    """The Redis limiter's batching so far (its ``/status``, summed over workers)."""
    if gateway.admin_port is None:
        return None
    url = f"http://127.0.0.1:{gateway.admin_port}/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        status = json.load(resp)
    seen: dict[int, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("backend") == "redis" and "batches" in node and "pid" in node:
                seen[node["pid"]] = node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(status)
    if not seen:
        return None
    checks = sum(n["checks"] for n in seen.values())
    batches = sum(n["batches"] for n in seen.values())
    return {
        "checks": checks,
        "batches": batches,
        "avg_batch_size": round(checks / batches, 2) if batches else 0.0,
        "largest_batch": max(n["largest_batch"] for n in seen.values()),
        "transport": ", ".join(sorted({str(n.get("transport")) for n in seen.values()})),
    }


def _noise(sample: dict[str, Any]) -> float:
    return max(sample["foreign_util"], sample["load_foreign_util"] or 0.0)


def _print_sample(name: str, proxy: str, rep: int, sample: dict[str, Any]) -> None:
    print(
        f"  {name:<16} {proxy:<8} run {rep + 1}: {sample['rps']:>8.0f} req/s  "
        f"p50 {sample['p50_ms']:.2f} ms  p99 {sample['p99_ms']:.2f} ms  "
        f"{sample['cpu_us_per_req']} CPU µs/req (user {sample['user_us_per_req']}, "
        f"sys {sample['sys_us_per_req']})  util {sample['cpu_util']}  "
        f"others {sample['foreign_util']}/{sample['load_foreign_util']}"
        + (f"  ERRORS {sample['errors']}" if sample["errors"] else ""),
        flush=True,
    )


def run_load_scenario(
    bench: Bench,
    scenario: Scenario,
    proxies: list[ProxyUnderTest],
    connections: int | None = None,
    tag: str = "",
) -> dict[str, Any]:
    settings = bench.settings
    conns = connections or scenario.connections or settings.connections
    name = scenario.name + tag
    if settings.warmup:
        for proxy in proxies:
            measure_load(
                bench, proxy, scenario, settings.warmup, conns, f"{name}-{proxy.name}-warmup"
            )
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in proxies}
    rerun = 0
    for rep in range(settings.repetitions):
        attempts: list[dict[str, dict[str, Any]]] = []
        while True:
            pair = {}
            for proxy in proxies:  # A B A B: drift hits both alike
                label = f"{name}-{proxy.name}-{rep + 1}" + (f"-{len(attempts)}" if attempts else "")
                pair[proxy.name] = measure_load(
                    bench, proxy, scenario, settings.duration, conns, label
                )
                _print_sample(name, proxy.name, rep, pair[proxy.name])
            attempts.append(pair)
            noisy = max(_noise(s) for s in pair.values()) > NOISE_LIMIT
            if not noisy or bench.split.shared or len(attempts) > settings.retry_noisy:
                break
            rerun += 1
            print(f"  {name:<16} noisy (other processes on the CPUs): run again", flush=True)
        quietest = min(attempts, key=lambda p: max(_noise(s) for s in p.values()))
        for proxy_name, sample in quietest.items():
            runs[proxy_name].append(sample)
    batches = redis_batches(proxies[0]) if scenario.redis else None
    if batches is not None:
        print(
            f"  {name:<16} gateway  Redis batches: {batches['checks']} checks in "
            f"{batches['batches']} round trips, {batches['avg_batch_size']} on average, "
            f"largest {batches['largest_batch']} ({batches['transport']})",
            flush=True,
        )
        bench.notes.append(
            f"{name}: {batches['avg_batch_size']} rate-limit checks per Redis round trip on "
            f"average (largest {batches['largest_batch']}), over the whole scenario"
        )
    if settings.py_spy is not None:
        profile_gateway(bench, proxies[0], scenario, conns, name)
    median, ratio, ratio_range = summarise(runs)
    return {
        "name": scenario.name,
        "title": scenario.title,
        "kind": scenario.kind,
        "method": scenario.method,
        "path": scenario.path,
        "body_bytes": len(scenario.body),
        "connections": conns,
        "runs": runs,
        "noisy_pairs_rerun": rerun,
        "median": median,
        "redis_batches": batches,
        "ratio": ratio,
        "ratio_range": ratio_range,
    }


def profile_gateway(
    bench: Bench, gateway: ProxyUnderTest, scenario: Scenario, connections: int, name: str
) -> None:
    """One extra, unreported load run of the gateway with py-spy attached to its (first)
    worker (the supervisor only waits); the profile goes to the results directory."""
    assert bench.settings.py_spy is not None
    duration = bench.settings.duration
    folded = bench.out / f"profile-{name}.folded"
    pid = (gateway.worker_pids() or [gateway.procs[0].pid])[0]
    spy = profile.start(bench.settings.py_spy, pid, duration, folded)
    time.sleep(0.3)  # let py-spy attach before the load starts
    measure_load(bench, gateway, scenario, duration, connections, f"{name}-gateway-profile")
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not folded.exists():
        print(f"  py-spy wrote no profile: {err.decode(errors='replace')[-500:]}", flush=True)
        return
    summary = bench.out / f"profile-{name}.txt"
    header = (
        f"py-spy, gateway, scenario {name}, {duration} s at {connections} connections, "
        f"commit {bench.git_commit}"
    )
    summary.write_text(profile.summarise(folded, header))
    print(f"  {name:<16} gateway  profile: {summary}", flush=True)


def run_idle_scenario(
    bench: Bench, scenario: Scenario, proxies: list[ProxyUnderTest]
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "name": scenario.name,
        "title": scenario.title,
        "kind": scenario.kind,
        "path": scenario.path,
        "idle_connections": scenario.idle_connections,
        "proxies": {},
        "ratio": {},
    }
    for proxy in proxies:
        proxy.check_alive()
        workers = proxy.worker_pids()
        before = [rss_kb(pid) for pid in workers]
        idle = loadgen.IdleConnections(proxy.port, scenario.path, scenario.idle_connections)
        try:
            time.sleep(0.5)  # let the proxy settle (buffers released after the request)
            during = [rss_kb(pid) for pid in workers]
            opened = idle.open
        finally:
            idle.close()
        proxy.check_alive()
        growth_kb = sum(during) - sum(before)
        entry = {
            "workers": len(workers),
            "connections_open": opened,
            "rss_kb_per_worker_before": round(statistics.mean(before)),
            "rss_kb_per_worker": round(statistics.mean(during)),
            "rss_kb_total": sum(rss_kb(pid) for pid in proxy.pids()),
            # RSS growth over the idle connections; can be ~0 where memory was preallocated.
            "bytes_per_connection": round(max(0, growth_kb) * 1024 / opened) if opened else None,
        }
        result["proxies"][proxy.name] = entry
        print(
            f"  {scenario.name:<16} {proxy.name:<8} {opened} idle connections: "
            f"RSS/worker {entry['rss_kb_per_worker_before']} -> {entry['rss_kb_per_worker']} "
            f"KiB, {entry['bytes_per_connection']} B/connection",
            flush=True,
        )
    g, n = result["proxies"].get("gateway"), result["proxies"].get("nginx")
    if g and n and n["rss_kb_per_worker"]:
        result["ratio"]["rss_kb_per_worker"] = round(
            g["rss_kb_per_worker"] / n["rss_kb_per_worker"], 3
        )
    return result


def run_scenario(bench: Bench, scenario: Scenario) -> dict[str, Any]:
    print(f"{scenario.name}: {scenario.title}", flush=True)
    proxies = start_proxies(bench, bench.work / scenario.name, 1, [scenario])
    try:
        if scenario.kind == "idle":
            return run_idle_scenario(bench, scenario, proxies)
        result = run_load_scenario(bench, scenario, proxies)
    finally:
        stop_proxies(bench, proxies)
    noisy = [
        f"{proxy} {median['foreign_util']:.0%} of the proxy's CPU, "
        f"{median.get('load_foreign_util', 0):.0%} of the load CPUs"
        for proxy, median in result["median"].items()
        if max(median["foreign_util"], median.get("load_foreign_util", 0)) > NOISE_LIMIT
    ]
    if noisy:
        bench.notes.append(
            f"{scenario.name}: other processes were busy during the runs ({'; '.join(noisy)}): "
            "req/s and latency are understated; CPU µs/req counts the proxy's own time only"
        )
    errors = sum(s["errors"] for samples in result["runs"].values() for s in samples)
    if errors:
        bench.notes.append(f"{scenario.name}: {errors} errors (socket errors, timeouts, >= 400)")
    return result


def repin(upstreams: dict[str, Upstream], cpus: list[int]) -> None:
    """Move every thread of the upstream processes onto ``cpus``."""
    for up in upstreams.values():
        for proc in up.procs:
            for pid in proc.pids():
                try:
                    tids = os.listdir(f"/proc/{pid}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        os.sched_setaffinity(int(tid), cpus)
                    except OSError:
                        pass


def run_scaling(bench: Bench, max_workers: int, cpus: list[int]) -> dict[str, Any]:
    scenario = BY_NAME[SCALING_SCENARIO]
    points = []
    for workers in range(1, max_workers + 1):
        bench.split = CpuSplit.for_workers(cpus, workers)
        split = bench.split
        repin(bench.upstreams, split.load)
        os.sched_setaffinity(0, split.load)
        if split.shared and split.pinned:
            bench.notes.append(
                f"scaling, {workers} workers: more workers than CPUs left for the load "
                "generator; load, upstream and proxy share CPUs (oversubscribed)"
            )
        print(
            f"scaling: {workers} worker(s) on CPUs {split.proxy}, load on {split.load}", flush=True
        )
        proxies = start_proxies(bench, bench.work / f"scaling-{workers}", workers, [scenario])
        try:
            conns = (scenario.connections or bench.settings.connections) * workers
            result = run_load_scenario(bench, scenario, proxies, conns, tag=f"-w{workers}")
        finally:
            stop_proxies(bench, proxies)
        points.append(
            {
                "workers": workers,
                "proxy_cpus": split.proxy,
                "load_cpus": split.load,
                "shared_cpus": split.shared,
                "connections": conns,
                "median": result["median"],
                "ratio": result["ratio"],
                "ratio_range": result["ratio_range"],
            }
        )
    return {
        "scenario": scenario.name,
        "method": (
            f"one gateway with `workers: N` (listener_sharing: {bench.settings.listener_sharing})"
            "; nginx: worker_processes N."
        ),
        "points": points,
    }


# -- the command -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure the gateway side by side with nginx as a reverse proxy.",
    )
    parser.add_argument("--quick", action="store_true", help="about half a minute: 2 s runs, 1 rep")
    parser.add_argument(
        "--scenarios", help=f"comma-separated, or 'none' (default: all of {', '.join(BY_NAME)})"
    )
    parser.add_argument("--duration", type=int, help="seconds per measured run (default 3)")
    parser.add_argument("--repetitions", type=int, help="A B pairs per scenario (default 5)")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per proxy (default 1)")
    parser.add_argument(
        "--connections", type=int, default=50, help="connections where a scenario sets none"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument(
        "--workers-scaling",
        type=int,
        nargs="?",
        const=0,
        metavar="N",
        help="also measure plain GET with 1..N workers (default N: CPUs minus one)",
    )
    parser.add_argument(
        "--retry-noisy",
        type=int,
        metavar="N",
        help="run an A B pair again, up to N times, when other processes used more than "
        f"{NOISE_LIMIT * 100:.0f}%% of the CPUs during it; the quietest is kept "
        "(default 1; --quick 0)",
    )
    parser.add_argument(
        "--loadgen", choices=["auto", "wrk", "locust"], default="auto", help="default: wrk"
    )
    parser.add_argument("--no-nginx", action="store_true", help="measure the gateway alone")
    parser.add_argument(
        "--upstream",
        choices=["auto", "asyncio"],
        default="auto",
        help="static stub upstream: nginx when installed (auto), or the asyncio one",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each load scenario, one more gateway run under py-spy (not measured)",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    parser.add_argument(
        "--listener-sharing",
        choices=["reuseport", "inherit"],
        default="reuseport",
        help="how the gateway's workers share the listener (its listener_sharing setting)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs = Processes()

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    keep = True  # the configs and logs, for a failed run
    try:
        run(args, procs, work, sys.argv[1:] if argv is None else argv)
        keep = False
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        keep = False
        return 130
    except SystemExit:
        keep = False
        raise
    except (RuntimeError, TimeoutError, ValueError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if keep or args.keep_temp:
            print(f"configs and logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, procs: Processes, work: Path, argv: list[str]) -> None:
    started = time.monotonic()
    load_average = os.getloadavg()
    scenarios = [] if args.scenarios == "none" else select(args.scenarios)
    notes: list[str] = []
    loadgen_name, wrk_binary = _choose_loadgen(args.loadgen, notes)
    settings = Settings(
        duration=args.duration or (2 if args.quick else 3),
        repetitions=args.repetitions or (1 if args.quick else 5),
        warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        connections=args.connections,
        retry_noisy=args.retry_noisy if args.retry_noisy is not None else (0 if args.quick else 1),
        loadgen=loadgen_name,
        wrk=wrk_binary,
        py_spy=_find_py_spy() if args.profile else None,
        listener_sharing=args.listener_sharing,
    )
    nginx_binary = None if args.no_nginx else nginx.find_nginx()
    if args.no_nginx:
        notes.append("--no-nginx: the gateway alone, no ratios")
    elif nginx_binary is None:
        notes.append(
            "nginx not found (Debian: apt-get install nginx-light): no reference proxy, no "
            "ratios, and the static upstream is the asyncio one"
        )

    env = machine.describe(wrk_binary)  # before the harness pins itself below
    cpus = available_cpus()
    split = CpuSplit.for_workers(cpus, 1)
    if not split.pinned:
        notes.append("one CPU only: nothing pinned; proxy, load and upstream share it")
    os.sched_setaffinity(0, split.load)  # the harness itself stays off the proxy's CPU
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        settings, split, procs, work, args.out, nginx_binary, env["git_commit"], notes=notes
    )

    scaling_n = None
    if args.workers_scaling is not None:
        scaling_n = args.workers_scaling or max(1, len(cpus) - 1)
    needed = {s.upstream for s in scenarios}
    if scaling_n:
        needed.add(BY_NAME[SCALING_SCENARIO].upstream)
    for name in sorted(needed):
        if name == "llm":
            bench.upstreams[name] = start_llm(procs, work / "llm", split.load)
        else:
            bench.upstreams[name] = start_static(
                procs, work / "upstream", split.load, prefer_nginx=args.upstream != "asyncio"
            )
    print(_banner(env, bench), flush=True)

    results = [run_scenario(bench, scenario) for scenario in scenarios]
    scaling = run_scaling(bench, scaling_n, cpus) if scaling_n else None

    payload = {
        "schema": 1,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["python", "-m", "benchmarks", *argv]),
        "quick": bool(args.quick),
        "machine": env,
        "setup": {
            "load_generator": settings.loadgen,
            "duration_s": settings.duration,
            "repetitions": settings.repetitions,
            "warmup_s": settings.warmup,
            "retry_noisy": settings.retry_noisy,
            "default_connections": settings.connections,
            "proxy_cpus": split.proxy,
            "load_cpus": split.load,
            "pinned": split.pinned,
            "upstreams": {name: up.kind for name, up in bench.upstreams.items()},
            "reference_proxy": (
                f"nginx {nginx.nginx_version(nginx_binary)}" if nginx_binary else None
            ),
            "gateway_workers": 1,
            "load_average_at_start": [round(x, 2) for x in load_average],
        },
        "scenarios": results,
        "planned_scenarios": [name for name, _ in PLANNED],
        "scaling": scaling,
        "notes": notes,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    written = report.write_all(payload, args.out)
    print()
    print(report.text_table(payload))
    for note in notes:
        print(f"note: {note}")
    print(f"written: {', '.join(str(p) for p in written)} ({payload['elapsed_s']} s)")


def _find_py_spy() -> str:
    binary = profile.find_py_spy()
    if binary is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    return binary


def _choose_loadgen(choice: str, notes: list[str]) -> tuple[str, str | None]:
    if choice in ("auto", "wrk"):
        binary, note = loadgen.ensure_wrk()
        if note:
            notes.append(note)
        if binary is not None:
            return "wrk", binary
        if choice == "wrk":
            raise RuntimeError(note)
    if not loadgen.locust_available():
        raise RuntimeError(
            "no load generator: install wrk (apt-get install wrk) or Locust "
            "(pip install -e '.[bench]')"
        )
    notes.append(
        "load generated by Locust, not wrk: Locust tops out at a few thousand requests/s per "
        "core, so req/s and latency describe Locust more than the proxies; CPU µs/request "
        "still compares them"
    )
    return "locust", None


def _banner(env: dict[str, Any], bench: Bench) -> str:
    s, split = bench.settings, bench.split
    nginx_text = (
        f"nginx {nginx.nginx_version(bench.nginx_binary)}" if bench.nginx_binary else "none"
    )
    return "\n".join(
        [
            f"machine: {env['cpu_model']}, {env['cpus_available']} CPUs, "
            f"{env['memory_mib']} MiB, {env['kernel']}, Python {env['python']}",
            f"proxy CPUs {split.proxy}, load CPUs {split.load}"
            + ("" if split.pinned else " (not pinned: one CPU)"),
            f"load: {s.loadgen}, {s.duration}s x {s.repetitions} reps per proxy, "
            f"{s.warmup}s warm-up",
            "upstreams: " + ", ".join(f"{n}={u.kind}" for n, u in bench.upstreams.items()),
            f"reference proxy: {nginx_text}",
        ]
    )
