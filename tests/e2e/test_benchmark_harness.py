"""The benchmark harness runs end to end (``python -m benchmarks --quick``) and writes a
well-formed result: every scenario, every proxy, every number present and positive.

Never a speed threshold: machines differ, and the numbers are read as ratios to nginx.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]

LOAD_SAMPLE_KEYS = (
    "requests", "duration_s", "rps", "p50_ms", "p99_ms", "cpu_s", "cpu_us_per_req",
    "user_us_per_req", "sys_us_per_req", "cpu_util",
)  # fmt: skip
MEDIAN_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_util")


def _positive(value: Any, where: str) -> None:
    assert isinstance(value, int | float) and not isinstance(value, bool), f"{where}: {value!r}"
    assert value > 0, f"{where} = {value}"


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_quick_run_writes_well_formed_results(tmp_path: Path) -> None:
    if shutil.which("wrk"):
        loadgen = "wrk"
    elif importlib.util.find_spec("locust") is not None:
        loadgen = "locust"
    else:  # scripts/test installs both; a missing one is a broken setup, not a reason to skip
        pytest.fail("no load generator: install wrk (apt-get install wrk) or Locust (.[bench])")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--loadgen", loadgen, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    payload = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().startswith("# Gateway vs nginx")
    assert json.loads((out / "machine.json").read_text()) == payload["machine"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "cpu_per_request.png").read_bytes().startswith(b"\x89PNG")
        assert payload["charts"] == ["cpu_per_request.png"]

    assert payload["schema"] == 1
    assert payload["quick"] is True
    _positive(payload["elapsed_s"], "elapsed_s")
    machine = payload["machine"]
    assert machine["cpu_model"] and machine["kernel"] and machine["python"]
    for key in ("cpus_online", "cpus_available", "memory_mib"):
        _positive(machine[key], f"machine.{key}")

    setup = payload["setup"]
    assert setup["load_generator"] == loadgen
    for key in ("duration_s", "repetitions", "default_connections", "gateway_workers"):
        _positive(setup[key], f"setup.{key}")
    assert setup["proxy_cpus"] and setup["load_cpus"]
    assert setup["upstreams"]["static"]
    proxies = ["gateway"] + (["nginx"] if setup["reference_proxy"] else [])

    results = {s["name"]: s for s in payload["scenarios"]}
    assert list(results) == [s.name for s in SCENARIOS]
    for scenario in SCENARIOS:
        result = results[scenario.name]
        assert result["kind"] == scenario.kind
        if scenario.kind == "load":
            _positive(result["connections"], f"{scenario.name}.connections")
            assert sorted(result["runs"]) == sorted(proxies)
            for proxy in proxies:
                samples = result["runs"][proxy]
                assert len(samples) == setup["repetitions"]
                for i, sample in enumerate(samples):
                    where = f"{scenario.name}.{proxy}[{i}]"
                    for key in LOAD_SAMPLE_KEYS:
                        _positive(sample[key], f"{where}.{key}")
                    assert sample["p99_ms"] >= sample["p50_ms"], where
                    assert sample["foreign_util"] >= 0 and sample["steal_util"] >= 0, where
                    assert sample["errors"] == 0, f"{where}: {sample['errors']} errors"
                    assert sample["tool"] == loadgen
                for key in MEDIAN_KEYS:
                    _positive(result["median"][proxy][key], f"{scenario.name}.median.{key}")
            if "nginx" in proxies:
                for key in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req"):
                    _positive(result["ratio"][key], f"{scenario.name}.ratio.{key}")
                low, high = result["ratio_range"]["cpu_us_per_req"]
                _positive(low, f"{scenario.name}.ratio_range")
                assert low <= result["ratio"]["cpu_us_per_req"] <= high
        else:
            assert sorted(result["proxies"]) == sorted(proxies)
            for proxy in proxies:
                entry = result["proxies"][proxy]
                where = f"{scenario.name}.{proxy}"
                assert entry["connections_open"] == scenario.idle_connections, where
                for key in ("workers", "rss_kb_per_worker_before", "rss_kb_per_worker"):
                    _positive(entry[key], f"{where}.{key}")
                # Growth over the idle connections: zero is possible where memory is
                # preallocated, so only its presence and sign are checked.
                assert entry["bytes_per_connection"] >= 0, where
            if "nginx" in proxies:
                _positive(result["ratio"]["rss_kb_per_worker"], f"{scenario.name}.ratio")


def test_hotpath_tool_proxies_through_fake_transports() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.hotpath", "--requests", "300", "--runs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    value = float(proc.stdout.split()[0])
    assert value > 0, proc.stdout
    assert "per proxied request" in proc.stdout
