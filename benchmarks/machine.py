"""A description of the machine a run happened on, recorded with its results."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks import loadgen, nginx


def _cpuinfo_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip()


def describe(wrk_binary: str | None) -> dict[str, Any]:
    from gateway import __version__ as gateway_version

    nginx_binary = nginx.find_nginx()
    return {
        "cpu_model": _cpuinfo_model(),
        "cpus_online": os.cpu_count() or 0,
        "cpus_available": len(os.sched_getaffinity(0)),
        "memory_mib": _mem_total_mib(),
        "kernel": f"{platform.system()} {platform.release()}",
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "python": platform.python_version(),
        "gateway": gateway_version,
        "git_commit": _git("rev-parse", "--short", "HEAD") or None,
        # Uncommitted changes to the code under test: the commit alone does not describe it.
        "git_dirty": bool(_git("status", "--porcelain", "--", "gateway", "plugins")),
        "nginx": nginx.nginx_version(nginx_binary) if nginx_binary else None,
        "wrk": loadgen.wrk_version(wrk_binary) if wrk_binary else None,
        "locust": loadgen.locust_version(),
    }
