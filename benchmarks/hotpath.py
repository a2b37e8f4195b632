"""The data plane's own cost per proxied request, with no sockets and no event loop work.

A client connection and a pooled upstream connection are driven with fake transports: each
iteration feeds one GET to the client side and one small response to the upstream side, so
everything measured is the gateway's Python (and httptools) work for one request. The
wall-clock mode is quick but noisy on a shared machine; ``--callgrind`` counts instructions
under valgrind instead, which is repeatable to a fraction of a percent and is the number to
compare before and after a hot-path change:

    python -m benchmarks.hotpath                 # µs per request (min of several runs)
    python -m benchmarks.hotpath --profile       # cProfile, sorted by own time
    python -m benchmarks.hotpath --callgrind     # instructions per request (needs valgrind)

``--observe`` picks what the log phase does: ``metrics`` (the default, as in a worker),
``access-log`` (metrics and an access-log line per request, written to /dev/null by the
writer thread, whose instructions callgrind counts too) or ``off`` (no log phase at all).
``--no-tracing`` turns the W3C traceparent off (on by default, as in the gateway).

``--scenario`` picks the route: ``plain`` (the default, the history below), ``headers`` (one
response-side plugin: the cost of a plugin chain), ``rate_limit`` (the memory-backend limiter
with its draft headers, as in the ``rate_limit`` benchmark scenario), ``bearer`` (the
same plain proxy, the request carrying an ``Authorization: Bearer`` JWT), ``jwt`` (that request
through the jwt plugin, a verified-token cache hit), ``jwt_cold_rs256`` / ``jwt_cold_es256``
(the cache off: a full verification per request). Compare ``jwt`` with ``bearer``: same bytes
parsed, the difference is the plugin.

``--targets N --balancer NAME`` sends the requests through a balancer over N targets (compare
with ``--targets 1``, the same driving loop without a balancer, for the balancer's own cost).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

from gateway.config.compile import compile_config
from gateway.config.load import load_text
from gateway.observe import AccessLog, Observer
from gateway.plugin import default_registry
from gateway.proxy.protocol import ClientConnection
from gateway.server import ServerState
from gateway.upstream.connection import UpstreamConnection

CONFIG = """
listeners: [{name: p, bind: "127.0.0.1:1"}]
upstreams:
  b: {targets: [{url: "http://127.0.0.1:9"}], keepalive: {max_requests: 1000000000}}
routes: [{name: r, match: {path_prefix: /}, upstream: b}]
"""
REQUEST = (
    b"GET /index.html HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 15:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n"
    b"hello world\n"
)


class FakeTransport:
    """Collects writes; enough of asyncio.Transport for the protocols."""

    def __init__(self) -> None:
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


SCENARIOS = (
    "plain",
    "headers",
    "rate_limit",
    "bearer",
    "jwt",
    "jwt_cold_rs256",
    "jwt_cold_es256",
)


def scenario_setup(scenario: str) -> tuple[str, bytes]:
    """The config and the request bytes for a scenario."""
    if scenario == "plain":
        return CONFIG, REQUEST
    if scenario == "headers":  # one response-side plugin: what a plugin chain costs
        plugin = "{headers: {response: {set: {x-served-by: gateway}}}}"
        return CONFIG.replace("upstream: b}", f"upstream: b, plugins: [{plugin}]}}"), REQUEST
    if scenario == "rate_limit":  # the memory backend, draft headers, as in the benchmark
        plugin = "{rate_limit: {key: ip, rate: 1000000/s, backend: memory}}"
        return CONFIG.replace("upstream: b}", f"upstream: b, plugins: [{plugin}]}}"), REQUEST
    import json

    from benchmarks import jwt_bench

    alg = "ES256" if scenario.endswith("es256") else "RS256"
    auth = b"Authorization: Bearer " + jwt_bench.token(alg).encode() + b"\r\n"
    request = REQUEST[:-2] + auth + b"\r\n"
    if scenario == "bearer":
        return CONFIG, request
    plugin = jwt_bench.plugin_config(cache=scenario == "jwt")
    config = CONFIG.replace("upstream: b}", f"upstream: b, plugins: [{json.dumps(plugin)}]}}")
    return config, request


def balanced_config(text: str, targets: int, balancer: str) -> str:
    """``text`` with ``targets`` targets (distinct ports, never connected to) and a balancer."""
    urls = ", ".join(f'{{url: "http://127.0.0.1:{9 + i}"}}' for i in range(targets))
    return text.replace(
        '{targets: [{url: "http://127.0.0.1:9"}]', f"{{balancer: {balancer}, targets: [{urls}]"
    )


async def drive(
    requests: int,
    observe: str = "metrics",
    tracing: bool = True,
    scenario: str = "plain",
    targets: int = 0,
    balancer: str = "round_robin",
) -> float:
    """Proxy ``requests`` GETs; return the seconds spent. With ``targets`` (>= 1), through a
    balancer over that many targets, each with a pooled connection; the response is fed to
    the connection the request went to (three attribute reads more per request)."""
    text, request = scenario_setup(scenario)
    if targets:
        text = balanced_config(text, targets, balancer)
    if not tracing:
        text += "tracing: {enabled: false}\n"
    config, source = load_text(text, default_registry())
    runtime = compile_config(config, source)
    access = AccessLog(os.devnull) if observe == "access-log" else None
    state = ServerState(runtime, None if observe == "off" else Observer(access))
    upstreams = []
    for target in runtime.targets():
        conn = UpstreamConnection(target)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        target.pool.release(conn, state.now)
        upstreams.append(conn)
    upstream = upstreams[0]
    client = ClientConnection(state)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    for _ in range(100):  # warm up
        client.data_received(request)
        active = client.active
        assert active is not None and active.upstream is not None
        active.upstream.data_received(RESPONSE)
    client_transport.writes = 0
    start = time.perf_counter()
    if not targets:
        for _ in range(requests):
            client.data_received(request)
            upstream.data_received(RESPONSE)
    else:
        for _ in range(requests):
            client.data_received(request)
            client.active.upstream.data_received(RESPONSE)  # type: ignore[union-attr]
    if access is not None:
        access.close()
    elapsed = time.perf_counter() - start
    if client_transport.writes != requests:
        raise RuntimeError(f"{client_transport.writes} responses for {requests} requests")
    return elapsed


def callgrind_total(module_argv: list[str]) -> int:
    """Instructions ``python -m <module_argv>`` executes under callgrind (all threads)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
             "-m", *module_argv],
            check=True, capture_output=True,
        )  # fmt: skip
        summary = subprocess.run(
            ["callgrind_annotate", out], check=True, capture_output=True, text=True
        ).stdout
    m = re.search(r"([\d,]+) \(100\.0%\)\s+PROGRAM TOTALS", summary)
    if m is None:
        raise RuntimeError("no totals in callgrind output")
    return int(m.group(1).replace(",", ""))


def _instructions(requests: int, flags: list[str]) -> int:
    return callgrind_total(
        ["benchmarks.hotpath", "--requests", str(requests), "--runs", "1", *flags]
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.hotpath",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5, help="wall-clock runs; the minimum counts")
    parser.add_argument("--profile", action="store_true", help="cProfile one run")
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="instructions per request under valgrind (deterministic)",
    )
    parser.add_argument("--observe", choices=["metrics", "access-log", "off"], default="metrics")
    parser.add_argument("--no-tracing", action="store_true")
    parser.add_argument("--scenario", choices=SCENARIOS, default="plain")
    parser.add_argument(
        "--targets",
        type=int,
        default=0,
        help="balance over this many targets (0: the plain single-target upstream)",
    )
    parser.add_argument("--balancer", default="round_robin", help="with --targets")
    args = parser.parse_args()
    flags = ["--observe", args.observe] + (["--no-tracing"] if args.no_tracing else [])
    if args.scenario != "plain":
        flags += ["--scenario", args.scenario]
    if args.targets:
        flags += ["--targets", str(args.targets), "--balancer", args.balancer]
    tracing = not args.no_tracing
    if args.callgrind:
        if shutil.which("valgrind") is None:
            print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
            return 1
        n = 3000
        base, loaded = _instructions(0, flags), _instructions(n, flags)
        print(
            f"{(loaded - base) / n:,.0f} instructions per proxied request (python side, "
            f"{' '.join(flags)})"
        )
        return 0
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        uvloop.run(
            drive(args.requests, args.observe, tracing, args.scenario, args.targets, args.balancer)
        )
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0
    if args.requests == 0:  # the setup alone: the baseline that --callgrind subtracts
        uvloop.run(drive(0, args.observe, tracing, args.scenario, args.targets, args.balancer))
        return 0
    best = min(
        uvloop.run(
            drive(args.requests, args.observe, tracing, args.scenario, args.targets, args.balancer)
        )
        for _ in range(args.runs)
    )
    print(
        f"{best / args.requests * 1e6:.2f} µs per proxied request (python side, best of "
        f"{args.runs})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
