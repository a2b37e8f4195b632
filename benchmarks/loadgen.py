"""Load generators: wrk for peaks, Locust as the fallback, and an asyncio idle-connection client.

Each ``run_*`` drives one proxy for one time window and returns a ``LoadResult``. wrk's
numbers come from a generated Lua ``done()`` hook that prints the summary and exact latency
percentiles (from wrk's own histogram, 1 µs resolution) as one JSON line, rather than parsing
its human-readable table. Every run is bounded: wrk and Locust get a duration and are killed
past it with a margin.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.scenarios import Scenario

RESULT_MARK = "WRK_RESULT "

_DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    MARK, summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


@dataclass(slots=True)
class LoadResult:
    requests: int
    duration_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and responses with status >= 400
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def find_wrk() -> str | None:
    return shutil.which("wrk")


def ensure_wrk() -> tuple[str | None, str]:
    """wrk's path, installing the Debian package when missing and running as root; with a
    note saying what happened."""
    found = find_wrk()
    if found:
        return found, ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get (Debian package 'wrk') ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
            try:
                subprocess.run(cmd, env=env, check=True, timeout=300, capture_output=True)
            except (subprocess.SubprocessError, OSError) as exc:
                return None, f"wrk is not installed and apt-get failed ({exc})"
        found = find_wrk()
        if found:
            return found, "wrk was installed with apt-get"
    return None, (
        "wrk is not installed (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)"
    )


def wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0].removeprefix("wrk ") if first else "unknown"


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def write_wrk_script(scenario: Scenario, directory: Path) -> Path:
    lines = [f"local MARK = {_lua_string(RESULT_MARK)}", f"wrk.method = {scenario.method!r}"]
    if scenario.body:
        body_path = directory / f"{scenario.name}.body"
        body_path.write_bytes(scenario.body)
        lines += [
            f"local f = assert(io.open({_lua_string(str(body_path))}, 'rb'))",
            "wrk.body = f:read('*a')",
            "f:close()",
        ]
    for name, value in scenario.request_headers().items():
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    path = directory / f"{scenario.name}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE_HOOK)
    return path


def run_wrk(
    binary: str,
    url: str,
    script: Path,
    connections: int,
    threads: int,
    duration: int,
    cpus: list[int],
) -> LoadResult:
    threads = max(1, min(threads, connections))
    argv = [
        binary, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # safe: called from one thread
    )
    for line in out.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK) :])
            errors = sum(
                data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors")
            )
            return LoadResult(
                requests=data["requests"],
                duration_s=data["duration_us"] / 1e6,
                p50_ms=data["p50_us"] / 1000,
                p99_ms=data["p99_us"] / 1000,
                errors=errors + data["timeouts"],
                tool="wrk",
            )
    raise RuntimeError(f"wrk printed no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")


def locust_available() -> bool:
    try:
        import locust  # noqa: F401
    except ImportError:
        return False
    return True


def locust_version() -> str:
    try:
        from importlib.metadata import version

        return version("locust")
    except Exception:
        return "not installed"


def run_locust(
    scenario: Scenario,
    url: str,
    connections: int,
    processes: int,
    duration: int,
    cpus: list[int],
    report_prefix: Path,
) -> LoadResult:
    """One headless Locust run of the scenario's user class; CSV + HTML at ``report_prefix``.

    Locust runs as a subprocess: importing it here would monkey-patch the harness (gevent)."""
    locustfile = Path(__file__).with_name("locustfile.py")
    report_prefix.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "locust", "-f", str(locustfile), "--headless",
        "-u", str(connections), "-r", str(connections), "-t", f"{duration}s",
        "--host", url, "--csv", str(report_prefix), "--html", f"{report_prefix}.html",
        "--only-summary", "--loglevel", "WARNING", "--stop-timeout", "2",
    ]  # fmt: skip
    if processes > 1:
        argv += ["--processes", str(processes)]
    argv.append(scenario.locust_class)
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),  # safe: called from one thread
    )
    stats = Path(f"{report_prefix}_stats.csv")
    if not stats.exists():
        raise RuntimeError(f"locust wrote no stats (exit {out.returncode}):\n{out.stderr[-2000:]}")
    with stats.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    if not rows:
        raise RuntimeError(f"no Aggregated row in {stats}")
    row = rows[0]
    count = int(row["Request Count"])
    rps = float(row["Requests/s"])
    return LoadResult(
        requests=count,
        duration_s=count / rps if rps > 0 else float(duration),
        p50_ms=float(row["50%"]),
        p99_ms=float(row["99%"]),
        errors=int(row["Failure Count"]),
        tool="locust",
    )


async def _open_idle(port: int, path: str, count: int, batch: int) -> list[asyncio.StreamWriter]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()

    async def one() -> asyncio.StreamWriter | None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                writer.close()
                return None
            return writer
        except (OSError, asyncio.IncompleteReadError, ValueError):
            return None

    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, batch):
        opened = await asyncio.gather(*(one() for _ in range(min(batch, count - start))))
        writers += [w for w in opened if w is not None]
    return writers


class IdleConnections:
    """``count`` keep-alive connections to 127.0.0.1:``port``, each used for one request and
    then held open and idle until ``close()``. Runs its own event loop in the harness."""

    def __init__(self, port: int, path: str, count: int, timeout: float = 60.0) -> None:
        self.loop = asyncio.new_event_loop()
        self.writers = self.loop.run_until_complete(
            asyncio.wait_for(_open_idle(port, path, count, batch=100), timeout)
        )

    @property
    def open(self) -> int:
        return len(self.writers)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.loop.close()
