"""A worker: serves connections on the listeners, sweeps timeouts, drains on stop.

Under the supervisor (``gateway.supervisor``) a worker gets its listening sockets, config
snapshot and control socket from its parent; started alone (``Worker`` in a test) it binds
the listeners itself.

One ``ServerState`` per worker process holds what connections share: the current runtime,
the coarse clock and cached ``Date`` header (refreshed by the sweep, twice a second, not per
request), the open connections, the request-id generator and the observer (metrics and
access log).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import logging
import os
import signal
import socket
import time
import weakref
from email.utils import formatdate
from typing import Any

import orjson

from gateway import __version__, metrics, runinfo
from gateway.config.compile import Runtime
from gateway.echo import start_echo
from gateway.observe import AccessLog, Observer
from gateway.proxy.protocol import ClientConnection
from gateway.speedups import COMPILED

log = logging.getLogger("gateway.server")

SWEEP_INTERVAL = 0.5
#: Allocations between young-generation collections (CPython's default is 700).
GC_THRESHOLD_GEN0 = 20_000
#: While draining, a keep-alive connection idle this long is closed. One that goes idle
#: later was told ``Connection: close`` on its last response. Closing a connection the very
#: moment its client reuses it would fail that request: a client idle this long is unlikely
#: to be sending at that instant.
DRAIN_IDLE_GRACE = 1.0
#: Seconds between the worker's status-file writes (read by the admin ``/status``).
STATUS_INTERVAL = 1.0

CONNECTIONS_OPEN = metrics.gauge("connections_open", "Client connections open.", mode="sum")
CONNECTIONS_OPEN_CHILD = CONNECTIONS_OPEN.labels()


class ServerState:
    __slots__ = (
        "_ids",
        "_rid_prefix",
        "connections",
        "date_header",
        "draining",
        "handshaking",
        "now",
        "observer",
        "runtime",
    )

    def __init__(self, runtime: Runtime, observer: Observer | None = None) -> None:
        self.runtime = runtime
        self.observer = observer
        self.connections: set[ClientConnection] = set()
        #: Connections accepted on a TLS listener whose handshake is not done: not yet in
        #: ``connections`` (the protocol's ``connection_made`` comes after the handshake).
        #: Weak: a failed or timed-out handshake tells the protocol nothing, and its
        #: dropped protocol leaves the set by itself.
        self.handshaking: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
        self.draining = False
        self.now = time.monotonic()
        self.date_header = b""
        self._rid_prefix = os.urandom(8).hex()
        self._ids = itertools.count(1)
        self.tick()

    def tick(self) -> None:
        self.now = time.monotonic()
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"

    def next_request_id(self) -> str:
        return f"{self._rid_prefix}{next(self._ids):016x}"

    def sweep(self) -> None:
        self.tick()
        now = self.now
        for conn in list(self.connections):
            conn.check_timeouts(now)
        for target in self.runtime.targets():
            target.pool.sweep(now)


class Worker:
    """Runs one gateway worker on the current event loop until ``stop()``.

    ``sockets`` maps listener names to listening sockets made by the supervisor; without it
    the worker binds the listeners itself. ``control`` is the supervisor's end of a socket
    pair: the worker says ``ready`` on it, and stops when it reads end-of-file (the
    supervisor is gone).
    """

    def __init__(
        self,
        runtime: Runtime,
        drain_timeout: float = 30.0,
        sockets: dict[str, socket.socket] | None = None,
        control: socket.socket | None = None,
        generation: int = 0,
    ) -> None:
        cfg = runtime.config
        access = None
        if cfg.access_log.enabled:
            access = AccessLog(cfg.access_log.path, cfg.access_log.max_pending)
        self.access = access
        self.state = ServerState(runtime, Observer(access, runinfo.worker_id()))
        self.drain_timeout = drain_timeout
        self.generation = generation
        self._sockets = sockets
        self._control = control
        self._control_writer: asyncio.StreamWriter | None = None
        self._servers: list[asyncio.Server] = []
        self._echo: asyncio.Server | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._status_path = os.path.join(runinfo.run_dir(), f"worker-{os.getpid()}.json")
        self._started = time.time()

    async def start(self) -> None:
        runtime = self.state.runtime
        echo_targets = [t for t in runtime.targets() if t.builtin == "echo"]
        if echo_targets:
            self._echo = await start_echo()
            port = self._echo.sockets[0].getsockname()[1]
            for t in echo_targets:
                t.port = port
                t.host_header = f"127.0.0.1:{port}".encode()
                t.label = f"builtin:echo@127.0.0.1:{port}"
        for upstream in runtime.upstreams.values():
            await upstream.start()  # resolves host names, starts health checks
        for plugin in runtime.plugins:
            await plugin.start()
        loop = asyncio.get_running_loop()
        state = self.state
        for lst in runtime.listeners:
            if self._sockets is not None:
                server = await loop.create_server(
                    functools.partial(ClientConnection, state, lst),
                    sock=self._sockets[lst.name],
                    backlog=lst.backlog,
                    ssl=lst.ssl,
                    ssl_handshake_timeout=lst.ssl_handshake_timeout,
                )
            else:
                server = await loop.create_server(
                    functools.partial(ClientConnection, state, lst),
                    lst.host,
                    lst.port,
                    backlog=lst.backlog,
                    reuse_address=True,
                    reuse_port=True,
                    ssl=lst.ssl,
                    ssl_handshake_timeout=lst.ssl_handshake_timeout,
                )
            self._servers.append(server)
            bound = server.sockets[0].getsockname()
            log.debug("listening", extra={"listener": lst.name, "host": bound[0], "port": bound[1]})
        self.write_status()
        if self._control is not None:
            reader, writer = await asyncio.open_connection(sock=self._control)
            self._control_writer = writer
            writer.write(b"ready\n")
            self._tasks.append(loop.create_task(self._watch_supervisor(reader)))

    async def _watch_supervisor(self, reader: asyncio.StreamReader) -> None:
        while await reader.read(4096):
            pass
        if not self._stopping.is_set():
            log.warning("the supervisor is gone; draining")
            self.stop()

    def stop(self) -> None:
        self._stopping.set()

    def reopen_logs(self) -> None:
        if self.access is not None:
            self.access.reopen()

    async def serve_until_stopped(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._sweep()))
        try:
            await self._stopping.wait()
        finally:
            await self._drain()
            for task in self._tasks:
                task.cancel()
            if self._control_writer is not None:
                self._control_writer.close()

    async def _sweep(self) -> None:
        ticks = 0
        every = max(1, round(STATUS_INTERVAL / SWEEP_INTERVAL))
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                state = self.state
                state.sweep()
                CONNECTIONS_OPEN_CHILD.set(len(state.connections))
                metrics.flush()
                ticks += 1
                if ticks % every == 0:
                    self.write_status()
            except Exception:  # one failure must not stop timeouts, the clock, metrics
                log.exception("sweep failed")

    def status(self) -> dict[str, Any]:
        """What the admin ``/status`` shows for this worker."""
        runtime = self.state.runtime
        plugins = []
        for plugin in runtime.plugins:
            try:
                st = plugin.status()
            except Exception as exc:  # a plugin bug must not take /status down
                st = {"error": repr(exc)}
            if st:
                plugins.append({"plugin": plugin.name, "route": plugin.route_name, **st})
        upstreams = {}
        for name, upstream in runtime.upstreams.items():
            describe = getattr(upstream, "status", None)
            try:
                upstreams[name] = (
                    describe()
                    if describe is not None
                    else {"targets": [t.label for t in upstream.targets]}
                )
            except Exception as exc:
                upstreams[name] = {"error": repr(exc)}
        return {
            "pid": os.getpid(),
            "worker": runinfo.worker_id(),
            "generation": self.generation,
            "version": __version__,
            "compiled": COMPILED,
            "started": self._started,
            "connections": len(self.state.connections),
            "tls_handshakes": len(self.state.handshaking),
            "draining": self.state.draining,
            "ready": not any(p.get("ready") is False for p in plugins),
            "plugins": plugins,
            "upstreams": upstreams,
        }

    def write_status(self) -> None:
        tmp = self._status_path + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(self.status(), default=str))
            os.replace(tmp, self._status_path)
        except OSError as exc:
            log.warning("cannot write worker status: %s", exc)

    async def _drain(self) -> None:
        """Stop accepting; close keep-alive connections once idle for ``DRAIN_IDLE_GRACE``
        (in-flight exchanges finish with keep-alive turned off); TLS handshakes under way
        are waited for (bounded by the listener's handshake timeout), and their request
        answered; after ``drain_timeout`` close what is left."""
        state = self.state
        state.draining = True
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + self.drain_timeout
        while (state.connections or state.handshaking) and time.monotonic() < deadline:
            state.tick()
            now = state.now
            for conn in list(state.connections):
                if (
                    conn.active is None
                    and conn.parsing is None
                    and conn.transport is not None
                    and now - conn.idle_since >= DRAIN_IDLE_GRACE
                ):
                    conn.transport.close()
            await asyncio.sleep(0.05)
        for conn in list(state.connections):
            if conn.transport is not None:
                conn.transport.abort()
        # connection_lost (which logs and counts the cut exchanges) runs on the next
        # iterations: before the access log closes and the metrics are flushed.
        for _ in range(3):
            await asyncio.sleep(0)
        for upstream in state.runtime.upstreams.values():
            upstream.stop()
        for target in state.runtime.targets():
            target.pool.close_all()
        for plugin in state.runtime.plugins:
            try:
                await plugin.stop()
            except Exception:
                log.exception("plugin %s failed to stop", plugin.name)
        if self._echo is not None:
            self._echo.close()
        if self.access is not None:
            self.access.close()
        CONNECTIONS_OPEN_CHILD.set(0)
        metrics.flush()
        try:
            os.unlink(self._status_path)
        except OSError:
            pass
        log.info("worker stopped", extra={"open_connections": len(state.connections)})


async def run_worker(
    runtime: Runtime,
    sockets: dict[str, socket.socket] | None = None,
    control: socket.socket | None = None,
    generation: int = 0,
) -> None:
    worker = Worker(runtime, runtime.config.drain_timeout, sockets, control, generation)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    loop.add_signal_handler(signal.SIGUSR1, worker.reopen_logs)
    # A terminal hang-up reaches the whole process group; reloading is the supervisor's job.
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    await worker.start()
    tune_gc()
    await worker.serve_until_stopped()


def tune_gc() -> None:
    """Called once a worker is set up. Everything loaded so far (modules, config, compiled
    runtime) lives as long as the worker: move it out of the collector's sight, so full
    collections stop rescanning it. Requests free their objects by reference counting; the
    young generation is collected every ``GC_THRESHOLD_GEN0`` allocations rather than 700,
    which matters where requests wait in flight (an async plugin's tasks and frames are
    alive across loop iterations): at 700, a worker with 50 requests waiting on Redis spent
    about 10k instructions per request collecting (callgrind, ``benchmarks.hotpath``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD_GEN0, 20, 20)
