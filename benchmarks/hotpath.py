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
import asyncio
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
from gateway.server import ServerState, tune_gc
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


#: The Redis URL the ``rate_limit_redis`` scenario uses (``main`` starts a server and sets it).
REDIS_URL_ENV = "GATEWAY_HOTPATH_REDIS"

SCENARIOS = (
    "plain",
    "headers",
    "rate_limit",
    "rate_limit_redis",
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
    if scenario == "rate_limit_redis":  # a real redis-server (REDIS_URL_ENV), batched checks
        plugin = "{rate_limit: {key: ip, rate: 1000000/s}}"
        text = CONFIG.replace("upstream: b}", f"upstream: b, plugins: [{plugin}]}}")
        # A timeout valgrind's slowness never reaches.
        url = os.environ[REDIS_URL_ENV]
        return text + f"state: {{backend: redis, url: '{url}', timeout: 9s}}\n", REQUEST
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
    tune_gc()  # as a worker does once started
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


class _CountingTransport(FakeTransport):
    """An upstream connection's transport: counts request heads written to it, and tells
    the driver when all of a round's have been."""

    def __init__(self, round_: _Round) -> None:
        super().__init__()
        self.round = round_

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.round.attached()


class _Round:
    def __init__(self) -> None:
        self.waiting = 0
        self.done: asyncio.Future[None] | None = None

    def attached(self) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self.done is not None and not self.done.done():
            self.done.set_result(None)


async def drive_concurrent(
    requests: int, concurrency: int, observe: str, tracing: bool, scenario: str
) -> float:
    """Proxy ``requests`` GETs in rounds of ``concurrency``: each round feeds one request to
    each of ``concurrency`` client connections, runs the event loop until every one of them
    has reached its upstream (an async plugin, say the Redis limiter, batches their checks
    into one round trip), then feeds the responses. The loop's own work counts, as in a
    worker under load."""
    text, request = scenario_setup(scenario)
    if not tracing:
        text += "tracing: {enabled: false}\n"
    config, source = load_text(text, default_registry())
    runtime = compile_config(config, source)
    for plugin in runtime.plugins:
        await plugin.start()
    access = AccessLog(os.devnull) if observe == "access-log" else None
    state = ServerState(runtime, None if observe == "off" else Observer(access))
    round_ = _Round()
    (target,) = runtime.targets()
    for _ in range(concurrency):
        conn = UpstreamConnection(target)
        conn.connection_made(_CountingTransport(round_))  # type: ignore[arg-type]
        target.pool.release(conn, state.now)
    clients = []
    for _ in range(concurrency):
        client = ClientConnection(state)
        client.connection_made(FakeTransport())  # type: ignore[arg-type]
        clients.append(client)
    loop = asyncio.get_running_loop()
    tune_gc()  # as a worker does once started

    async def one_round() -> None:
        round_.waiting = concurrency
        round_.done = loop.create_future()
        for client in clients:
            client.data_received(request)
        if round_.waiting:
            await round_.done
        for client in clients:
            client.active.upstream.data_received(RESPONSE)  # type: ignore[union-attr]

    for _ in range(max(1, 100 // concurrency)):  # warm up
        await one_round()
    start = time.perf_counter()
    for _ in range(requests // concurrency):
        await one_round()
    elapsed = time.perf_counter() - start
    if access is not None:
        access.close()
    for plugin in runtime.plugins:
        await plugin.stop()
    return elapsed


def start_redis() -> subprocess.Popen[bytes]:
    """A throwaway redis-server on a free port, its URL in ``REDIS_URL_ENV``."""
    import socket

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the rate_limit_redis scenario needs redis-server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)
    os.environ[REDIS_URL_ENV] = f"redis://127.0.0.1:{port}/0"
    return proc


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
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="requests in flight per round, through the event loop (0: one at a time, "
        "synchronously; the rate_limit_redis scenario needs at least 1)",
    )
    args = parser.parse_args()
    if args.scenario == "rate_limit_redis" and args.concurrency < 1:
        parser.error("--scenario rate_limit_redis needs --concurrency N (N >= 1)")
    if args.concurrency and args.targets:
        parser.error("--concurrency does not combine with --targets")
    flags = ["--observe", args.observe] + (["--no-tracing"] if args.no_tracing else [])
    if args.scenario != "plain":
        flags += ["--scenario", args.scenario]
    if args.targets:
        flags += ["--targets", str(args.targets), "--balancer", args.balancer]
    if args.concurrency:
        flags += ["--concurrency", str(args.concurrency)]
    tracing = not args.no_tracing

    def run(requests: int) -> float:
        if args.concurrency:
            return uvloop.run(
                drive_concurrent(requests, args.concurrency, args.observe, tracing, args.scenario)
            )
        return uvloop.run(
            drive(requests, args.observe, tracing, args.scenario, args.targets, args.balancer)
        )

    redis = None
    if args.scenario == "rate_limit_redis" and REDIS_URL_ENV not in os.environ:
        redis = start_redis()
    try:
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
            run(args.requests)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return 0
        if args.requests == 0:  # the setup alone: the baseline that --callgrind subtracts
            run(0)
            return 0
        best = min(run(args.requests) for _ in range(args.runs))
        print(
            f"{best / args.requests * 1e6:.2f} µs per proxied request (python side, best of "
            f"{args.runs})"
        )
        return 0
    finally:
        if redis is not None:
            redis.kill()
            redis.wait()


if __name__ == "__main__":
    sys.exit(main())
