"""Turning a run's result payload into a table on stdout, Markdown, JSON and PNG charts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
MACHINE_JSON = "machine.json"
CPU_CHART = "cpu_per_request.png"
SCALING_CHART = "scaling.png"

_LOAD_COLUMNS = (
    "req/s", "p50 ms", "p99 ms", "CPU µs/req", "user µs", "sys µs", "CPU util", "others",
    "others (load)",
)  # fmt: skip
_LOAD_KEYS = (
    "rps", "p50_ms", "p99_ms", "cpu_us_per_req", "user_us_per_req", "sys_us_per_req",
    "cpu_util", "foreign_util", "load_foreign_util",
)  # fmt: skip


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key == "rps":
        return f"{value:,.0f}"
    if key in ("cpu_util", "foreign_util", "load_foreign_util"):
        return f"{value:.2f}"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def _rows(payload: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """Rows of the load table and of the idle-connection table."""
    load: list[list[str]] = []
    idle: list[list[str]] = []
    for s in payload["scenarios"]:
        if s["kind"] == "load":
            for proxy, median in s["median"].items():
                load.append(
                    [s["name"], str(s["connections"]), proxy]
                    + [_fmt(median.get(k), k) for k in _LOAD_KEYS]
                )
            if s["ratio"]:
                load.append(
                    [s["name"], "", "ratio g/n"]
                    + [f"{s['ratio'][k]:.2f}x" if k in s["ratio"] else "" for k in _LOAD_KEYS]
                )
                low, high = s["ratio_range"]["cpu_us_per_req"]
                load.append(
                    [s["name"], "", "pair range"]
                    + [
                        f"{low:.2f}-{high:.2f}x" if k == "cpu_us_per_req" else ""
                        for k in _LOAD_KEYS
                    ]
                )
        else:
            for proxy, entry in s["proxies"].items():
                idle.append(
                    [
                        s["name"],
                        proxy,
                        str(entry["workers"]),
                        str(entry["connections_open"]),
                        _fmt(entry["rss_kb_per_worker_before"]),
                        _fmt(entry["rss_kb_per_worker"]),
                        _fmt(entry["bytes_per_connection"]),
                    ]
                )
            if s["ratio"]:
                idle.append(
                    [
                        s["name"],
                        "ratio g/n",
                        "",
                        "",
                        "",
                        f"{s['ratio']['rss_kb_per_worker']:.2f}x",
                        "",
                    ]
                )
    return load, idle


_LOAD_HEAD = ["scenario", "conns", "proxy", *_LOAD_COLUMNS]
_IDLE_HEAD = [
    "scenario", "proxy", "workers", "idle conns", "RSS/worker KiB before",
    "RSS/worker KiB with conns", "bytes/conn",
]  # fmt: skip


def _scaling_rows(payload: dict[str, Any]) -> list[list[str]]:
    rows = []
    for point in (payload.get("scaling") or {}).get("points", []):
        shared = "yes" if point["shared_cpus"] else "no"
        for proxy, median in point["median"].items():
            rows.append(
                [str(point["workers"]), proxy, shared]
                + [_fmt(median.get(k), k) for k in _LOAD_KEYS]
            )
        if point["ratio"]:
            rows.append(
                [str(point["workers"]), "ratio g/n", shared]
                + [f"{point['ratio'][k]:.2f}x" if k in point["ratio"] else "" for k in _LOAD_KEYS]
            )
    return rows


_SCALING_HEAD = ["workers", "proxy", "shared CPUs", *_LOAD_COLUMNS]


def _text(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [
        "  ".join(
            c.rjust(w) if i > 2 else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [head, *rows]
    ]
    return "\n".join(lines)


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(payload: dict[str, Any]) -> str:
    load, idle = _rows(payload)
    parts = []
    if load:
        parts.append(_text(_LOAD_HEAD, load))
    if idle:
        parts.append(_text(_IDLE_HEAD, idle))
    scaling = _scaling_rows(payload)
    if scaling:
        parts.append(_text(_SCALING_HEAD, scaling))
    return "\n\n".join(parts)


def markdown(payload: dict[str, Any], charts: list[str]) -> str:
    m, setup = payload["machine"], payload["setup"]
    lines = [
        "# Gateway vs nginx: benchmark results",
        "",
        f"Generated {payload['generated_at']} by `{payload['command']}` "
        f"({payload['elapsed_s']} s). Method: [benchmarks/README.md](../README.md).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cpus_available']} CPUs available "
        f"({m['cpus_online']} online); memory {m['memory_mib']} MiB; {m['kernel']}",
        f"- Python {m['python']}, gateway {m['gateway']} (commit {m['git_commit']}"
        + (", with uncommitted changes" if m.get("git_dirty") else "")
        + "), "
        f"nginx {m['nginx']}, wrk {m['wrk']}, Locust {m['locust']}",
        "",
        "## Setup",
        "",
        f"- Proxy under test pinned to CPUs {setup['proxy_cpus']}; load generator, upstream and "
        f"harness on {setup['load_cpus']}" + ("" if setup["pinned"] else " (not pinned: one CPU)"),
        f"- Load: {setup['load_generator']}, {setup['duration_s']} s per run, "
        f"{setup['repetitions']} repetition(s) per proxy alternating gateway/nginx, "
        f"{setup['warmup_s']} s warm-up; medians shown",
        "- Upstreams: " + ", ".join(f"{k}: {v}" for k, v in setup["upstreams"].items()),
        f"- Reference proxy: {setup['reference_proxy'] or 'none'}; gateway workers: "
        f"{setup['gateway_workers']}; load average at start "
        f"{setup.get('load_average_at_start')}",
        "- CPU µs/req: utime+stime of all the proxy's processes over the window / completed "
        "requests, split into user (the proxy's own code) and sys (kernel: syscalls, TCP). "
        "CPU util: that CPU time / wall time / proxy CPUs (near 1.0: the proxy was "
        "the bottleneck). Others: share of the proxy's CPUs used by other processes in the "
        "window; others (load): the same on the load CPUs, beyond wrk, the upstream and the "
        "harness (noise from a shared machine). Ratios are gateway / nginx: the median, over "
        "the repetitions, of each gateway run against the nginx run right after it; pair "
        "range: the lowest and highest of those ratios for CPU µs/req.",
        "",
    ]
    load, idle = _rows(payload)
    if load:
        lines += ["## Load scenarios", "", _markdown(_LOAD_HEAD, load), ""]
    if idle:
        lines += ["## Idle connections", "", _markdown(_IDLE_HEAD, idle), ""]
    scaling = _scaling_rows(payload)
    if scaling:
        lines += [
            "## Scaling",
            "",
            payload["scaling"]["method"],
            "",
            _markdown(_SCALING_HEAD, scaling),
            "",
        ]
    for chart in charts:
        lines += [f"![{chart}]({chart})", ""]
    if payload["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in payload["notes"]] + [""]
    if payload.get("planned_scenarios"):
        lines += [
            "Scenarios still to come (added by their issues): "
            + ", ".join(payload["planned_scenarios"])
            + ".",
            "",
        ]
    return "\n".join(lines)


def cpu_chart(payload: dict[str, Any], path: Path) -> bool:
    """Bars of CPU µs/request, gateway vs nginx, one panel per load scenario (their scales
    differ by orders of magnitude). False when matplotlib is missing or nothing to draw."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    scenarios = [s for s in payload["scenarios"] if s["kind"] == "load" and s["median"]]
    if not scenarios:
        return False
    colours = {"gateway": "#3b7dd8", "nginx": "#4caf50"}
    fig, axes = plt.subplots(1, len(scenarios), figsize=(3.2 * len(scenarios), 4), squeeze=False)
    for ax, s in zip(axes[0], scenarios, strict=True):
        names = list(s["median"])
        values = [s["median"][n].get("cpu_us_per_req", 0) for n in names]
        bars = ax.bar(names, values, color=[colours.get(n, "#999") for n in names])
        ax.bar_label(bars, fmt="%.1f")
        ratio = s["ratio"].get("cpu_us_per_req")
        ax.set_title(
            s["name"] + (f"\n{ratio:.2f}x nginx (median pair)" if ratio else ""), fontsize=10
        )
        ax.set_ylabel("CPU µs / request")
        ax.margins(y=0.15)
    fig.suptitle("Proxy CPU per request (lower is better), median of runs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def scaling_chart(payload: dict[str, Any], path: Path) -> bool:
    points = (payload.get("scaling") or {}).get("points") or []
    if not points:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for proxy in ("gateway", "nginx"):
        xs = [p["workers"] for p in points if proxy in p["median"]]
        ys = [p["median"][proxy]["rps"] for p in points if proxy in p["median"]]
        if xs:
            ax.plot(xs, ys, marker="o", label=proxy)
    ax.set_xlabel("workers (* CPUs shared with the load generator)")
    ax.set_ylabel("requests / s")
    ax.set_ylim(bottom=0)
    ax.set_xticks(
        [p["workers"] for p in points],
        [f"{p['workers']}{'*' if p['shared_cpus'] else ''}" for p in points],
    )
    ax.set_title(f"Scaling: {payload['scaling']['scenario']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_all(payload: dict[str, Any], out: Path) -> list[Path]:
    written = []
    charts = []
    if cpu_chart(payload, out / CPU_CHART):
        charts.append(CPU_CHART)
    if scaling_chart(payload, out / SCALING_CHART):
        charts.append(SCALING_CHART)
    payload["charts"] = charts
    for name, text in (
        (RESULTS_JSON, json.dumps(payload, indent=2, ensure_ascii=False) + "\n"),
        (MACHINE_JSON, json.dumps(payload["machine"], indent=2) + "\n"),
        (RESULTS_MD, markdown(payload, charts)),
    ):
        (out / name).write_text(text)
        written.append(out / name)
    written += [out / c for c in charts]
    return written
