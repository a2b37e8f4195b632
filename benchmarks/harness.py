"""The peak harness: ``python -m benchmarks``.

Theory of operation
-------------------
1. CPUs are split: the proxy under test gets CPU 0 (CPUs 0..n-1 in a scaling step with n
   workers), the load generator, the stub upstreams and this harness get the rest. With a
   single CPU nothing is pinned and the results say so.
2. The stub upstreams start once (``benchmarks.upstreams``: nginx, or the asyncio fallback).
3. For each scenario (``benchmarks.scenarios``) a fresh gateway and a fresh nginx reverse proxy
   are started, both with a route per scenario, then measured in turn, A B A B, for the
   configured repetitions, after a short warm-up of each.
4. One measurement: read the proxy's CPU time (utime+stime of all its processes), run wrk
   (or Locust) for the window, read it again. CPU µs per request = CPU time / completed
   requests. Requests/s and p50/p99 come from the load generator.
5. Idle scenarios open N keep-alive connections (one request each, then idle) and read the
   RSS of the proxy's worker processes before and while they are held.
6. Medians of the repetitions and the ratio gateway/nginx go to stdout, ``results.json``,
   ``results.md``, ``machine.json`` and PNG charts in the output directory.

Everything started is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks import loadgen, machine, nginx, profile, report
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
#: Share of the proxy's CPUs used by other processes above which a run is flagged as noisy.
NOISE_LIMIT = 0.05


@dataclass(frozen=True, slots=True)
class Settings:
    duration: int
    repetitions: int
    warmup: int
    connections: int
    loadgen: str  # "wrk" or "locust"
    wrk: str | None
    retry_noisy: int = 0  # times a noisy A B pair is run again
    py_spy: str | None = None  # --profile: py-spy's path
    out: Path | None = None


@dataclass(slots=True)
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


class ProxyUnderTest:
    """A running gateway (N processes on one port) or nginx (master + N workers)."""

    def __init__(self, name: str, port: int, procs: list[Proc], version: str) -> None:
        self.name = name
        self.port = port
        self.procs = procs
        self.version = version

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return [pid for proc in self.procs for pid in proc.pids()]

    def worker_pids(self) -> list[int]:
        """Processes that serve connections: each gateway process; nginx's workers."""
        if self.name == "nginx":
            return [pid for proc in self.procs for pid in descendants(proc.pid)]
        return [proc.pid for proc in self.procs]

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode}; its log "
                    f"({proc.log_path}):\n{proc.log_tail()}"
                )


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def gateway_config(port: int, upstreams: dict[str, Upstream], scenarios: list[Scenario]) -> dict:
    return {
        "listeners": [{"name": "public", "bind": f"127.0.0.1:{port}"}],
        "upstreams": {
            name: {
                "targets": [{"url": up.url}],
                "keepalive": {"max_idle": 1024, "max_requests": 10000},
            }
            for name, up in upstreams.items()
        },
        "routes": [s.gateway_route() for s in scenarios],
        "limits": {"max_connections": nginx.PROXY_WORKER_CONNECTIONS},
        "log": {"level": "warning"},
    }


def start_gateway(
    procs: Processes,
    directory: Path,
    workers: int,
    cpus: list[int],
    upstreams: dict[str, Upstream],
    scenarios: list[Scenario],
) -> ProxyUnderTest:
    """``workers`` gateway processes sharing one port through SO_REUSEPORT (the gateway binds
    with it). This becomes ``workers: N`` in the config once the gateway has a supervisor."""
    from gateway import __version__

    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = directory / "gateway.yaml"
    conf.write_text(yaml.safe_dump(gateway_config(port, upstreams, scenarios), sort_keys=False))
    started = [
        procs.start(
            f"gateway[{i}]",
            [sys.executable, "-m", "gateway", "run", "-c", str(conf), "--log-format", "text"],
            directory / f"gateway-{i}.log",
            cpus=cpus,
            env=_env(),
            cwd=ROOT,
        )
        for i in range(workers)
    ]
    try:
        wait_listening(started, port)
    except Exception:
        for proc in started:
            procs.stop(proc)
        raise
    return ProxyUnderTest("gateway", port, started, __version__)


def start_nginx_proxy(
    procs: Processes,
    directory: Path,
    binary: str,
    workers: int,
    cpus: list[int],
    upstreams: dict[str, Upstream],
    scenarios: list[Scenario],
) -> ProxyUnderTest:
    port = free_port()
    nginx.write_proxy_config(
        directory, port, workers, {name: up.port for name, up in upstreams.items()}, scenarios
    )
    proc = procs.start(
        "nginx proxy", nginx.argv(binary, directory, "proxy"), directory / "proxy.out", cpus=cpus
    )
    try:
        wait_listening([proc], port)
        # All workers up (each holds the listening socket with reuseport).
        deadline = time.monotonic() + 10
        while len(descendants(proc.pid)) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception:
        procs.stop(proc)
        raise
    return ProxyUnderTest("nginx", port, [proc], nginx.nginx_version(binary))


def measure_load(
    proxy: ProxyUnderTest,
    scenario: Scenario,
    settings: Settings,
    split: CpuSplit,
    duration: int,
    connections: int,
    scripts: Path,
    reports: Path,
    label: str,
) -> dict[str, Any]:
    proxy.check_alive()
    pids = proxy.pids()
    url = proxy.url + scenario.path
    user_before, sys_before = cpu_seconds(pids)
    busy_before, steal_before = cpu_busy_seconds(split.proxy)
    wall_before = time.monotonic()
    if settings.loadgen == "wrk":
        assert settings.wrk is not None
        result = loadgen.run_wrk(
            settings.wrk,
            url,
            loadgen.write_wrk_script(scenario, scripts),
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
            report_prefix=reports / label,
        )
    wall = time.monotonic() - wall_before
    user_after, sys_after = cpu_seconds(pids)
    user, system = user_after - user_before, sys_after - sys_before
    cpu = user + system
    busy_after, steal_after = cpu_busy_seconds(split.proxy)
    proxy.check_alive()
    capacity = wall * len(split.proxy)
    return {
        "requests": result.requests,
        "duration_s": round(result.duration_s, 3),
        "rps": round(result.rps, 1),
        "p50_ms": round(result.p50_ms, 3),
        "p99_ms": round(result.p99_ms, 3),
        "cpu_s": round(cpu, 3),
        "cpu_us_per_req": round(cpu * 1e6 / result.requests, 2) if result.requests else None,
        # The split: kernel time (syscalls, TCP) is roughly what any proxy pays; user time is
        # the proxy's own code.
        "user_us_per_req": round(user * 1e6 / result.requests, 2) if result.requests else None,
        "sys_us_per_req": round(system * 1e6 / result.requests, 2) if result.requests else None,
        # Share of the proxy's CPUs it used over the window: near 1.0 means it was the
        # bottleneck; well below, the load generator or upstream was.
        "cpu_util": round(cpu / capacity, 3) if capacity > 0 else None,
        # Share of the proxy's CPUs used by other processes (or taken by the hypervisor) in
        # the window: the noise indicator. Near 0 on a quiet machine with pinning.
        "foreign_util": (
            round(max(0.0, busy_after - busy_before - cpu) / capacity, 3) if capacity else None
        ),
        "steal_util": round((steal_after - steal_before) / capacity, 3) if capacity else None,
        "errors": result.errors,
        "tool": result.tool,
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict, dict]:
    keys = (
        "rps", "p50_ms", "p99_ms", "cpu_us_per_req", "user_us_per_req", "sys_us_per_req",
        "cpu_util", "foreign_util",
    )  # fmt: skip
    median: dict[str, dict[str, float]] = {}
    for proxy, samples in runs.items():
        median[proxy] = {}
        for key in keys:
            values = [s[key] for s in samples if s.get(key) is not None]
            if values:
                median[proxy][key] = round(statistics.median(values), 3)
    ratio: dict[str, float] = {}
    if "gateway" in median and "nginx" in median:
        for key in (
            "rps",
            "p50_ms",
            "p99_ms",
            "cpu_us_per_req",
            "user_us_per_req",
            "sys_us_per_req",
        ):
            g, n = median["gateway"].get(key), median["nginx"].get(key)
            if g is not None and n:
                ratio[key] = round(g / n, 3)
    return median, ratio


def run_load_scenario(
    scenario: Scenario,
    proxies: list[ProxyUnderTest],
    settings: Settings,
    split: CpuSplit,
    work: Path,
    reports: Path,
    connections: int | None = None,
    tag: str = "",
) -> dict[str, Any]:
    conns = connections or scenario.connections or settings.connections
    name = scenario.name + tag
    if settings.warmup:
        for proxy in proxies:
            measure_load(
                proxy, scenario, settings, split, settings.warmup, conns, work, reports,
                f"{name}-{proxy.name}-warmup",
            )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {p.name: [] for p in proxies}
    retried = 0
    for rep in range(settings.repetitions):
        attempts: list[dict[str, dict[str, Any]]] = []
        while True:
            pair = {}
            for proxy in proxies:  # A B A B: drift hits both alike
                label = f"{name}-{proxy.name}-{rep + 1}" + (
                    f"-retry{len(attempts)}" if attempts else ""
                )
                sample = measure_load(
                    proxy, scenario, settings, split, settings.duration, conns, work, reports, label
                )
                pair[proxy.name] = sample
                _print_sample(name, proxy.name, rep, sample)
            attempts.append(pair)
            # A pair during which other processes took the proxy's CPU is run again (when
            # they are not our own load generator, as in an oversubscribed scaling step).
            if split.shared or len(attempts) > settings.retry_noisy or not _noisy(pair):
                break
            retried += 1
            print(
                f"  {name:<16} noisy pair (other processes on the proxy's CPU): again", flush=True
            )
        quietest = min(attempts, key=lambda p: max(s["foreign_util"] or 0 for s in p.values()))
        for proxy_name, sample in quietest.items():
            runs[proxy_name].append(sample)
    if settings.py_spy is not None:
        profile_gateway(proxies[0], scenario, settings, split, conns, work, reports, name)
    median, ratio = summarise(runs)
    return {
        "name": scenario.name,
        "title": scenario.title,
        "kind": scenario.kind,
        "method": scenario.method,
        "path": scenario.path,
        "body_bytes": len(scenario.body),
        "connections": conns,
        "runs": runs,
        "noisy_pairs_rerun": retried,
        "median": median,
        "ratio": ratio,
    }


def _noisy(pair: dict[str, dict[str, Any]]) -> bool:
    return any((s["foreign_util"] or 0) > NOISE_LIMIT for s in pair.values())


def _print_sample(name: str, proxy: str, rep: int, sample: dict[str, Any]) -> None:
    print(
        f"  {name:<16} {proxy:<8} run {rep + 1}: {sample['rps']:>10.0f} req/s  "
        f"p50 {sample['p50_ms']:.2f} ms  p99 {sample['p99_ms']:.2f} ms  "
        f"{sample['cpu_us_per_req']} CPU µs/req (user {sample['user_us_per_req']}, "
        f"sys {sample['sys_us_per_req']})  util {sample['cpu_util']}  "
        f"others {sample['foreign_util']}"
        + (f"  ERRORS {sample['errors']}" if sample["errors"] else ""),
        flush=True,
    )


def profile_gateway(
    gateway: ProxyUnderTest,
    scenario: Scenario,
    settings: Settings,
    split: CpuSplit,
    connections: int,
    work: Path,
    reports: Path,
    name: str,
) -> None:
    """One extra, unreported load run of the gateway with py-spy attached to its (first)
    process; the profile goes to the results directory."""
    assert settings.py_spy is not None and settings.out is not None
    folded = settings.out / f"profile-{name}.folded"
    spy = profile.start(settings.py_spy, gateway.procs[0].pid, settings.duration, folded)
    time.sleep(0.3)  # let py-spy attach before the load starts
    measure_load(
        gateway, scenario, settings, split, settings.duration, connections, work, reports,
        f"{name}-gateway-profile",
    )  # fmt: skip
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if not folded.exists():
        print(f"  py-spy wrote no profile: {err.decode(errors='replace')[-500:]}", flush=True)
        return
    summary = settings.out / f"profile-{name}.txt"
    summary.write_text(profile.summarise(folded))
    print(f"  {name:<16} gateway  profile: {summary}", flush=True)


def run_idle_scenario(scenario: Scenario, proxies: list[ProxyUnderTest]) -> dict[str, Any]:
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


def _start_proxies(
    procs: Processes,
    work: Path,
    nginx_binary: str | None,
    workers: int,
    split: CpuSplit,
    upstreams: dict[str, Upstream],
    scenarios: list[Scenario],
) -> list[ProxyUnderTest]:
    started = [start_gateway(procs, work / "gateway", workers, split.proxy, upstreams, scenarios)]
    if nginx_binary is not None:
        started.append(
            start_nginx_proxy(
                procs, work / "nginx-proxy", nginx_binary, workers, split.proxy, upstreams,
                scenarios,
            )
        )  # fmt: skip
    return started


def _stop_proxies(procs: Processes, proxies: list[ProxyUnderTest]) -> None:
    for proxy in proxies:
        for proc in proxy.procs:
            procs.stop(proc)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure the gateway side by side with nginx as a reverse proxy.",
    )
    parser.add_argument("--quick", action="store_true", help="about a minute: short runs, 1 rep")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, or 'none' (default: all of {', '.join(BY_NAME)})",
    )
    parser.add_argument("--duration", type=int, help="seconds per measured run (default 5)")
    parser.add_argument("--repetitions", type=int, help="A B pairs per scenario (default 3)")
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
        "--retry-noisy",
        type=int,
        metavar="N",
        help="run an A B pair again, up to N times, when other processes used more than "
        f"{NOISE_LIMIT:.0%} of the proxy's CPU during it; the quietest is kept (default 1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after each load scenario, one more gateway run under py-spy (not measured)",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep configs and logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    procs = Processes()

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    ok = False
    try:
        run(args, procs, work, sys.argv if argv is None else ["benchmarks", *argv])
        ok = True
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything", file=sys.stderr)
        ok = True  # nothing to debug: drop the temp files
        return 130
    except SystemExit:
        ok = True
        raise
    except (RuntimeError, TimeoutError, ValueError, OSError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if ok and not args.keep_temp:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"configs and logs kept in {work}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace, procs: Processes, work: Path, argv: list[str]) -> None:
    started = time.monotonic()
    load_average = os.getloadavg()
    scenarios = [] if args.scenarios == "none" else select(args.scenarios)
    notes: list[str] = []

    loadgen_name, wrk_binary = _choose_loadgen(args.loadgen, notes)
    settings = Settings(
        duration=args.duration or (2 if args.quick else 5),
        repetitions=args.repetitions or (1 if args.quick else 3),
        warmup=args.warmup if args.warmup is not None else (0 if args.quick else 1),
        connections=args.connections,
        loadgen=loadgen_name,
        wrk=wrk_binary,
        retry_noisy=(
            args.retry_noisy if args.retry_noisy is not None else (0 if args.quick else 1)
        ),
        py_spy=_find_py_spy() if args.profile else None,
        out=args.out,
    )
    nginx_binary = None if args.no_nginx else nginx.find_nginx()
    if nginx_binary is None:
        notes.append(
            "nginx not found (Debian: apt-get install nginx-light): no reference proxy, no "
            "ratios, and the static upstream is the asyncio one"
            if not args.no_nginx
            else "--no-nginx: the gateway alone, no ratios"
        )

    env = machine.describe(wrk_binary)  # before the harness pins itself below
    cpus = available_cpus()
    split = CpuSplit.for_workers(cpus, 1)
    if not split.pinned:
        notes.append("one CPU only: nothing pinned; proxy, load and upstream share it")
    os.sched_setaffinity(0, split.load)  # the harness itself stays off the proxy's CPU

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    reports = out / "locust"
    scripts = work / "wrk"
    scripts.mkdir()

    scaling_n = None
    if args.workers_scaling is not None:
        scaling_n = args.workers_scaling or max(1, len(cpus) - 1)

    needed = {s.upstream for s in scenarios}
    if scaling_n:
        needed.add(BY_NAME[SCALING_SCENARIO].upstream)
    starters: dict[str, Callable[[], Upstream]] = {
        "static": lambda: start_static(
            procs, work / "upstream", split.load, prefer_nginx=args.upstream != "asyncio"
        ),
        "llm": lambda: start_llm(procs, work / "llm", split.load),
    }
    upstreams = {name: starters[name]() for name in sorted(needed)}

    print(_banner(env, settings, split, upstreams, nginx_binary), flush=True)

    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        print(f"{scenario.name}: {scenario.title}", flush=True)
        proxies = _start_proxies(
            procs, work / scenario.name, nginx_binary, 1, split, upstreams, [scenario]
        )
        try:
            if scenario.kind == "idle":
                results.append(run_idle_scenario(scenario, proxies))
            else:
                results.append(
                    run_load_scenario(scenario, proxies, settings, split, scripts, reports)
                )
        finally:
            _stop_proxies(procs, proxies)
        noisy = [
            f"{proxy} {median['foreign_util']:.0%}"
            for proxy, median in results[-1].get("median", {}).items()
            if median.get("foreign_util", 0) > NOISE_LIMIT
        ]
        if noisy:
            notes.append(
                f"{scenario.name}: other processes used the proxy's CPU during the runs "
                f"({', '.join(noisy)}): req/s and latency are understated there; CPU µs/req "
                "counts the proxy's own time only"
            )
        errors = sum(s["errors"] for runs in results[-1].get("runs", {}).values() for s in runs)
        if errors:
            notes.append(f"{scenario.name}: {errors} errors (socket errors, timeouts or >= 400)")

    scaling = None
    if scaling_n:
        scaling = run_scaling(
            scaling_n, cpus, procs, work, nginx_binary, upstreams, settings, scripts, reports, notes
        )

    payload = {
        "schema": 1,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": shlex.join(["python", "-m", "benchmarks", *argv[1:]]),
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
            "upstreams": {name: up.kind for name, up in upstreams.items()},
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
    written = report.write_all(payload, out)
    print()
    print(report.text_table(payload))
    for note in notes:
        print(f"note: {note}")
    print(f"written: {', '.join(str(p) for p in written)} ({payload['elapsed_s']} s)")


def run_scaling(
    max_workers: int,
    cpus: list[int],
    procs: Processes,
    work: Path,
    nginx_binary: str | None,
    upstreams: dict[str, Upstream],
    settings: Settings,
    scripts: Path,
    reports: Path,
    notes: list[str],
) -> dict[str, Any]:
    scenario = BY_NAME[SCALING_SCENARIO]
    points = []
    for workers in range(1, max_workers + 1):
        split = CpuSplit.for_workers(cpus, workers)
        repin(upstreams, split.load)
        os.sched_setaffinity(0, split.load)
        if split.shared and split.pinned:
            notes.append(
                f"scaling, {workers} workers: more workers than CPUs left for the load "
                "generator; load, upstream and proxy share CPUs (oversubscribed)"
            )
        print(
            f"scaling: {workers} worker(s) on CPUs {split.proxy}, load on {split.load}", flush=True
        )
        proxies = _start_proxies(
            procs, work / f"scaling-{workers}", nginx_binary, workers, split, upstreams, [scenario]
        )
        try:
            conns = (scenario.connections or settings.connections) * workers
            result = run_load_scenario(
                scenario, proxies, settings, split, scripts, reports, conns, tag=f"-w{workers}"
            )
        finally:
            _stop_proxies(procs, proxies)
        points.append(
            {
                "workers": workers,
                "proxy_cpus": split.proxy,
                "load_cpus": split.load,
                "shared_cpus": split.shared,
                "connections": conns,
                "median": result["median"],
                "ratio": result["ratio"],
            }
        )
    return {
        "scenario": scenario.name,
        "method": (
            "N gateway processes on one port (SO_REUSEPORT); switches to `workers: N` once "
            "the gateway has a supervisor. nginx: worker_processes N."
        ),
        "points": points,
    }


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


def _banner(
    env: dict[str, Any],
    settings: Settings,
    split: CpuSplit,
    upstreams: dict[str, Upstream],
    nginx_binary: str | None,
) -> str:
    lines = [
        f"machine: {env['cpu_model']}, {env['cpus_available']} CPUs, "
        f"{env['memory_mib']} MiB, {env['kernel']}, Python {env['python']}",
        f"proxy CPUs {split.proxy}, load CPUs {split.load}"
        + ("" if split.pinned else " (not pinned: one CPU)"),
        f"load: {settings.loadgen}, {settings.duration}s x {settings.repetitions} reps per "
        f"proxy, {settings.warmup}s warm-up",
        "upstreams: " + ", ".join(f"{n}={u.kind}" for n, u in upstreams.items()),
        "reference proxy: "
        + (f"nginx {nginx.nginx_version(nginx_binary)}" if nginx_binary else "none"),
    ]
    return "\n".join(lines)
