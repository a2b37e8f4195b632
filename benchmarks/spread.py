"""How evenly the workers share the load, for each ``listener_sharing`` mode.

One gateway with ``workers: N`` in front of the static upstream; wrk drives it with many
keep-alive connections, then with a new connection per request (``Connection: close``); the
admin ``/metrics`` says how many requests each worker answered (``worker_requests_total``).
The spread is reported as each worker's share and the max/min ratio (1.00 is perfectly even):

    python -m benchmarks.spread [--workers 4] [--duration 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import loadgen
from benchmarks.machine import describe
from benchmarks.procs import Processes, available_cpus, free_port, wait_listening
from benchmarks.upstreams import start_static

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def _per_worker(admin_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "gateway_worker_requests_total":
                counts[s.labels["worker"]] = s.value
    return counts


def _wait_ready(admin_port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


def measure(
    procs: Processes, work: Path, wrk: str, upstream_url: str, mode: str, workers: int,
    duration: int, cpus: list[int],
) -> dict[str, Any]:  # fmt: skip
    port, admin_port = free_port(), free_port()
    config = {
        "workers": workers,
        "listener_sharing": mode,
        "listeners": [{"name": "public", "bind": f"127.0.0.1:{port}"}],
        "admin": {"bind": f"127.0.0.1:{admin_port}"},
        "access_log": {"enabled": False},
        "upstreams": {"static": {"targets": [{"url": upstream_url}]}},
        "routes": [{"name": "all", "match": {"path_prefix": "/"}, "upstream": "static"}],
        "log": {"level": "warning"},
    }
    directory = work / mode
    directory.mkdir(parents=True)
    conf = directory / "gateway.yaml"
    conf.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    gw = procs.start(
        "gateway",
        [sys.executable, "-m", "gateway", "run", "-c", str(conf)],
        directory / "gateway.log",
        cpus=cpus,
        env=env,
        cwd=ROOT,
    )
    result: dict[str, Any] = {"mode": mode, "workers": workers}
    try:
        wait_listening([gw], port)
        _wait_ready(admin_port)
        before = _per_worker(admin_port)
        for pattern, extra in (
            ("keep-alive", []),
            ("new connection each", ["-H", "Connection: close"]),
        ):
            subprocess.run(
                [wrk, "-t2", "-c64", f"-d{duration}s", *extra, f"http://127.0.0.1:{port}/"],
                check=True,
                capture_output=True,
            )
            time.sleep(1.2)  # two metric flushes
            after = _per_worker(admin_port)
            counts = [after.get(str(w), 0) - before.get(str(w), 0) for w in range(workers)]
            before = after
            total = sum(counts) or 1
            result[pattern] = {
                "requests": counts,
                "shares": [round(c / total, 3) for c in counts],
                "max_over_min": round(max(counts) / max(min(counts), 1), 2),
            }
    finally:
        procs.stop(gw)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=max(2, len(available_cpus()) - 1))
    parser.add_argument("--duration", type=int, default=3)
    args = parser.parse_args()
    wrk = loadgen.find_wrk()
    if wrk is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    cpus = available_cpus()
    procs = Processes()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gateway-spread-") as tmp:
        work = Path(tmp)
        try:
            upstream = start_static(procs, work / "upstream", cpus)
            results = [
                measure(procs, work, wrk, upstream.url, mode, args.workers, args.duration, cpus)
                for mode in ("reuseport", "inherit")
            ]
        finally:
            procs.stop_all()
    machine = describe(wrk)
    lines = [
        f"# Load spread across {args.workers} workers",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cpus_available']} CPUs, "
        f"{machine['kernel']}, Python {machine['python']}, commit {machine['git_commit']}. "
        f"wrk -t2 -c64, {args.duration} s per pattern; gateway, upstream and wrk share the CPUs.",
        "",
        "| listener_sharing | pattern | requests per worker | max/min |",
        "|---|---|---|---|",
    ]
    for r in results:
        for pattern in ("keep-alive", "new connection each"):
            p = r[pattern]
            lines.append(
                f"| {r['mode']} | {pattern} | {', '.join(f'{c:,.0f}' for c in p['requests'])}"
                f" | {p['max_over_min']} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "spread.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "spread.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
