"""The supervisor: binds the listeners once, runs N worker processes, rolls them on reload.

- **Listeners** are bound here and handed to every worker (``pass_fds``), so no worker ever
  binds and the sockets outlive any worker: a connection waiting in an accept queue is
  accepted by whichever worker comes next. ``listener_sharing: reuseport`` (default) binds one
  ``SO_REUSEPORT`` socket per worker slot, so the kernel spreads connections evenly across
  slots; ``inherit`` binds one socket that all workers accept from (see docs/operations.md
  for the measurement behind the default).
- **Workers** are ``python -m gateway worker`` processes. Each reports ``ready`` on a
  socket pair once its plugins have started and it is accepting; the pair's end-of-file tells
  either side that the other is gone. A worker that dies unexpectedly is restarted after a
  backoff (0.1 s doubling to 30 s, reset once a worker has run for a minute).
- **Reload** (SIGHUP or ``POST /reload``): the new config is loaded and compiled here first;
  if it is invalid the old workers keep serving and the errors are reported. Otherwise a new
  generation of workers starts on the same sockets; once all of them are ready the old
  generation drains (stops accepting, finishes in-flight requests within ``drain_timeout``).
- **Stop** (SIGTERM/SIGINT): every worker drains; the supervisor exits 0 when they are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import __version__, metrics, runinfo
from gateway.config.compile import CompileError, Runtime, compile_config
from gateway.config.load import ConfigError, ConfigIssue, load_text
from gateway.config.model import GatewayConfig
from gateway.plugin import Registry

log = logging.getLogger("gateway.supervisor")

RELOADS = metrics.counter("config_reloads_total", "Config reloads, by result.", ("result",))
RESTARTS = metrics.counter("worker_restarts_total", "Workers restarted after dying.")
WORKERS_UP = metrics.gauge("workers", "Worker processes running.", mode="max")

#: How long a new worker may take to report ready before a start or reload is given up.
READY_TIMEOUT = 60.0
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0
#: A worker that ran this long before dying restarts without backoff.
STABLE_AFTER = 60.0


@dataclass
class Generation:
    number: int
    runtime: Runtime
    text: str
    version: str
    snapshot: str
    loaded_at: float = field(default_factory=time.time)


@dataclass(eq=False)  # identity: kept in sets
class WorkerProc:
    slot: int
    generation: Generation
    proc: asyncio.subprocess.Process
    control: socket.socket
    started: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    @property
    def up(self) -> bool:
        """Said ready and has not exited since."""
        return self.ready.is_set() and not self.exited.is_set()


class ReloadResult:
    def __init__(self, ok: bool, version: str, errors: list[str], message: str) -> None:
        self.ok = ok
        self.version = version
        self.errors = errors
        self.message = message


class Supervisor:
    def __init__(
        self,
        config_path: str | None,
        text: str,
        runtime: Runtime,
        registry: Registry,
        log_args: list[str],
        run_dir: str,
    ) -> None:
        self.config_path = config_path
        self.registry = registry
        self.log_args = log_args
        self.run_dir = run_dir
        self.metrics_dir = os.path.join(run_dir, "metrics")
        self.sockets: dict[tuple[str, int], socket.socket] = {}
        self.workers: list[WorkerProc] = []  # current generation, by slot
        self.old: list[WorkerProc] = []  # draining generations
        self.alive: set[WorkerProc] = set()  # every worker process not yet reaped
        self._generations = itertools.count(1)  # a failed reload's number is not reused
        self.generation = self._generation(next(self._generations), runtime, text)
        self.started = time.time()
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._metrics_lock = asyncio.Lock()
        self._starting: Generation | None = None  # a reload's generation, until it is in
        self._backoff: dict[int, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.admin: Any = None
        self._reloads = {"success": RELOADS.labels("success"), "failure": RELOADS.labels("failure")}
        self._restarts = RESTARTS.labels()
        self._workers_up = WORKERS_UP.labels()

    # -- setup -------------------------------------------------------------------------
    def _generation(self, number: int, runtime: Runtime, text: str) -> Generation:
        version = hashlib.sha256(text.encode()).hexdigest()[:12]
        snapshot = os.path.join(self.run_dir, f"config-{number}.yaml")
        with open(snapshot, "w", encoding="utf-8") as f:
            f.write(text)
        return Generation(number, runtime, text, version, snapshot)

    def _bind(
        self, config: GatewayConfig, runtime: Runtime
    ) -> dict[tuple[str, int], socket.socket]:
        """The sockets a generation needs, reusing the ones already bound."""
        slots = config.workers if config.listener_sharing == "reuseport" else 1
        wanted: dict[tuple[str, int], socket.socket] = {}
        for lst in runtime.listeners:
            for slot in range(slots):
                key = (f"{config.listener_sharing}:{lst.host}:{lst.port}", slot)
                sock = self.sockets.get(key)
                if sock is None:
                    reuse_port = config.listener_sharing == "reuseport"
                    sock = _listen(lst.host, lst.port, lst.backlog, reuse_port)
                wanted[key] = sock
        return wanted

    def _sockets_for(self, gen: Generation, slot: int) -> dict[str, socket.socket]:
        config = gen.runtime.config
        s = slot if config.listener_sharing == "reuseport" else 0
        return {
            lst.name: self.sockets[(f"{config.listener_sharing}:{lst.host}:{lst.port}", s)]
            for lst in gen.runtime.listeners
        }

    def _env(self, slot: int, gen: Generation) -> dict[str, str]:
        env = dict(os.environ)
        env[runinfo.RUN_DIR_ENV] = self.run_dir
        env[runinfo.WORKERS_ENV] = str(gen.runtime.config.workers)
        env[runinfo.WORKER_ID_ENV] = str(slot)
        env[metrics.MULTIPROC_ENV] = self.metrics_dir
        return env

    # -- workers -----------------------------------------------------------------------
    async def _spawn(self, slot: int, gen: Generation) -> WorkerProc:
        ours, theirs = socket.socketpair()
        listen = self._sockets_for(gen, slot)
        fds = ",".join(f"{name}={sock.fileno()}" for name, sock in listen.items())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "worker",
            "--snapshot",
            gen.snapshot,
            "--config-name",
            self.config_path or "<bundled example>",
            "--generation",
            str(gen.number),
            "--listen-fds",
            fds,
            "--control-fd",
            str(theirs.fileno()),
            *self.log_args,
            pass_fds=[theirs.fileno(), *(s.fileno() for s in listen.values())],
            env=self._env(slot, gen),
        )
        theirs.close()
        wp = WorkerProc(slot, gen, proc, ours)
        self.alive.add(wp)
        self._task(self._watch(wp))
        if self._stopping.is_set():  # stop began while it was being started
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        log.info(
            "worker started",
            extra={"worker": slot, "pid": proc.pid, "generation": gen.number},
        )
        return wp

    async def _watch(self, wp: WorkerProc) -> None:
        loop = asyncio.get_running_loop()
        wp.control.setblocking(False)
        try:
            while True:
                data = await loop.sock_recv(wp.control, 4096)
                if not data:
                    break
                if b"ready" in data and not wp.ready.is_set():
                    wp.ready.set()
                    self._update_workers_gauge()
        except OSError:
            pass
        rc = await wp.proc.wait()
        wp.returncode = rc
        wp.exited.set()
        self.alive.discard(wp)
        wp.control.close()
        async with self._metrics_lock:  # not while a scrape reads the files
            try:
                metrics.mark_process_dead(wp.pid, self.metrics_dir)
            except OSError as exc:
                log.warning("cannot archive a dead worker's metrics: %s", exc)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.run_dir, f"worker-{wp.pid}.json"))
        self._update_workers_gauge()
        if wp in self.old:
            self.old.remove(wp)
            log.info("worker drained", extra={"worker": wp.slot, "pid": wp.pid, "exit": rc})
            self._close_unused_sockets()
            self._remove_snapshots()
            return
        if self._stopping.is_set() or wp not in self.workers:
            return
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        lived = time.monotonic() - wp.started
        delay = 0.0 if lived > STABLE_AFTER else self._backoff.get(wp.slot, BACKOFF_MIN)
        self._backoff[wp.slot] = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
        log.error(
            "worker died (%s) after %.1fs; restarting in %.1fs",
            how,
            lived,
            delay,
            extra={"worker": wp.slot, "pid": wp.pid, "generation": wp.generation.number},
        )
        self._restarts.inc()
        metrics.flush()
        await asyncio.sleep(delay)
        if self._stopping.is_set() or wp not in self.workers:
            return
        try:
            new = await self._spawn(wp.slot, wp.generation)
        except OSError as exc:
            log.error("cannot start a worker: %s", exc)
            return
        try:
            self.workers[self.workers.index(wp)] = new
        except ValueError:  # a reload replaced the generation meanwhile: not needed
            with contextlib.suppress(ProcessLookupError):
                new.proc.send_signal(signal.SIGTERM)
            return

    async def _start_generation(self, gen: Generation) -> list[WorkerProc]:
        """Start a generation's workers and wait until all are ready; on failure, stop the
        ones started and raise RuntimeError."""
        started: list[WorkerProc] = []
        try:
            for slot in range(gen.runtime.config.workers):
                started.append(await self._spawn(slot, gen))  # noqa: PERF401 (in order)
            for wp in started:
                ready = asyncio.ensure_future(wp.ready.wait())
                exited = asyncio.ensure_future(wp.exited.wait())
                _, pending = await asyncio.wait(
                    {ready, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
                for f in pending:
                    f.cancel()
                if not wp.ready.is_set():
                    why = (
                        f"exited with status {wp.returncode}"
                        if wp.exited.is_set()
                        else f"not ready after {READY_TIMEOUT:g}s"
                    )
                    raise RuntimeError(f"worker {wp.slot} of generation {gen.number} {why}")
            # One that died after saying ready, while others were starting, would be taken
            # on without anybody to restart it.
            for wp in started:
                if wp.exited.is_set():
                    raise RuntimeError(
                        f"worker {wp.slot} of generation {gen.number} exited while starting"
                    )
            if self._stopping.is_set():
                raise RuntimeError("stopping")
        except BaseException:
            for wp in started:
                if wp.proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        wp.proc.kill()
            raise
        return started

    def _update_workers_gauge(self) -> None:
        self._workers_up.set(sum(1 for wp in self.workers if wp.up))
        metrics.flush()

    def _remove_snapshots(self) -> None:
        """Delete config snapshots no live worker uses (the current one stays)."""
        keep = {self.generation.snapshot} | {wp.generation.snapshot for wp in self.alive}
        if self._starting is not None:
            keep.add(self._starting.snapshot)
        for name in os.listdir(self.run_dir):
            path = os.path.join(self.run_dir, name)
            if name.startswith("config-") and path not in keep:
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def _close_unused_sockets(self) -> None:
        """Close the sockets that neither the current generation nor one being started
        uses (draining workers have closed their copies already)."""
        used = set()
        for gen in (self.generation, self._starting):
            if gen is None:
                continue
            for slot in range(gen.runtime.config.workers):
                try:
                    used |= {id(s) for s in self._sockets_for(gen, slot).values()}
                except KeyError:  # its sockets were never bound (a failed start)
                    pass
        for key, sock in list(self.sockets.items()):
            if id(sock) not in used:
                sock.close()
                del self.sockets[key]

    # -- reload ------------------------------------------------------------------------
    async def reload(self) -> ReloadResult:
        async with self._reload_lock:
            if self._stopping.is_set():
                return ReloadResult(False, self.generation.version, [], "stopping")
            result = await self._reload()
        self._reloads["success" if result.ok else "failure"].inc()
        metrics.flush()
        return result

    async def _reload(self) -> ReloadResult:
        current = self.generation
        name = self.config_path or "<bundled example>"
        try:
            if self.config_path is None:
                text = current.text
            else:
                text = await asyncio.to_thread(_read_text, self.config_path)
            config, source = load_text(text, self.registry, name)
            runtime = compile_config(config, source)
            check_runtime(runtime)
        except (ConfigError, CompileError) as exc:
            errors = [str(i) for i in exc.issues]
            for issue in errors:
                log.error("reload rejected: %s", issue, extra={"config": name})
            return ReloadResult(False, current.version, errors, "invalid config; still serving")
        except OSError as exc:
            log.error("reload rejected: %s", exc, extra={"config": name})
            return ReloadResult(False, current.version, [str(exc)], "cannot read the config")
        if self.admin is not None and config.admin is not None:  # noqa: SIM102
            if config.admin.bind != self.admin.bind:
                log.warning("admin.bind changed: takes effect on restart, not on reload")
        try:
            wanted = self._bind(config, runtime)
        except OSError as exc:
            log.error("reload rejected: cannot bind: %s", exc)
            return ReloadResult(False, current.version, [str(exc)], "cannot bind a listener")
        self.sockets.update(wanted)
        gen = self._starting = self._generation(next(self._generations), runtime, text)
        try:
            new = await self._start_generation(gen)
        except RuntimeError as exc:
            self._starting = None
            log.error("reload failed: %s; still serving the old config", exc)
            self._close_unused_sockets()
            self._remove_snapshots()
            return ReloadResult(False, current.version, [str(exc)], "new workers failed")
        self._starting = None
        old = self.workers
        self.workers = new
        self.generation = gen
        self.old.extend(old)
        for wp in old:
            wp.draining = True
            if wp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    wp.proc.send_signal(signal.SIGTERM)
        # Sockets the new generation does not use (fewer workers, a listener removed) close
        # now: left open, the kernel would keep queueing connections on them for nobody.
        self._close_unused_sockets()
        self._update_workers_gauge()
        log.info(
            "config reloaded",
            extra={"generation": gen.number, "version": gen.version, "workers": len(new)},
        )
        return ReloadResult(True, gen.version, [], "reloaded")

    # -- status ------------------------------------------------------------------------
    def worker_status(self, wp: WorkerProc) -> dict[str, Any]:
        out: dict[str, Any] = {
            "slot": wp.slot,
            "pid": wp.pid,
            "generation": wp.generation.number,
            "ready": wp.up,
            "draining": wp.draining,
            "uptime": round(time.monotonic() - wp.started, 3),
        }
        path = os.path.join(self.run_dir, f"worker-{wp.pid}.json")
        try:
            with open(path, "rb") as f:
                reported = orjson.loads(f.read())
        except (OSError, ValueError):
            reported = None
        if reported is not None:
            out["connections"] = reported.get("connections")
            out["tls_handshakes"] = reported.get("tls_handshakes", 0)
            out["plugins"] = reported.get("plugins", [])
            out["upstreams"] = reported.get("upstreams", {})
            out["plugins_ready"] = reported.get("ready", True)
            out["compiled"] = reported.get("compiled")
        return out

    def ready(self) -> tuple[bool, list[str]]:
        problems = []
        if not self.workers:
            problems.append("no workers")
        for wp in self.workers:
            st = self.worker_status(wp)
            if not wp.up:
                problems.append(f"worker {wp.slot} not ready")
            elif st.get("plugins_ready") is False:
                problems.append(f"worker {wp.slot}: a plugin is not ready")
        return not problems, problems

    def status(self) -> dict[str, Any]:
        gen = self.generation
        cfg = gen.runtime.config
        workers = [self.worker_status(wp) for wp in self.workers]
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started, 3),
            "config": {
                "path": self.config_path,
                "version": gen.version,
                "generation": gen.number,
                "loaded_at": gen.loaded_at,
            },
            "workers": workers,
            "draining_workers": [self.worker_status(wp) for wp in self.old],
            "listeners": [{"name": lst.name, "bind": lst.bind} for lst in cfg.listeners],
            "routes": [r.name for r in cfg.routes],
            "upstreams": workers[0].get("upstreams", {}) if workers else {},
            "plugins": workers[0].get("plugins", []) if workers else [],
        }

    # -- running -----------------------------------------------------------------------
    def _task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _signal(self, sig: int) -> None:
        # Only to workers that said ready: their handlers are installed by then.
        for wp in list(self.alive):
            if wp.ready.is_set() and wp.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    wp.proc.send_signal(sig)

    def stop(self) -> None:
        if not self._stopping.is_set():
            log.info("stopping: draining workers")
            self._stopping.set()

    def _sighup(self) -> None:
        log.info("SIGHUP: reloading the config")
        self._task(self.reload())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        runtime = self.generation.runtime
        cfg = runtime.config
        log.info(
            "starting",
            extra={"version": __version__, "config": self.config_path or "example"},
        )
        self.sockets.update(self._bind(cfg, runtime))
        if cfg.admin is not None:
            from gateway.admin import AdminServer

            self.admin = AdminServer(self, cfg.admin.bind, cfg.admin.token)
            await self.admin.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._signal(signal.SIGUSR1))
        try:
            async with self._reload_lock:  # a SIGHUP meanwhile waits for this
                self.workers = await self._start_generation(self.generation)
        except RuntimeError as exc:
            log.error("cannot start: %s", exc)
            await self._shutdown()
            return 1
        self._update_workers_gauge()
        log.info(
            "started",
            extra={
                "version": __version__,
                "workers": len(self.workers),
                "listeners": [lst.bind for lst in cfg.listeners],
                "admin": cfg.admin.bind if cfg.admin is not None else None,
            },
        )
        await self._stopping.wait()
        await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        self._stopping.set()
        deadline = time.monotonic() + self.generation.runtime.config.drain_timeout + 5.0
        signalled: set[WorkerProc] = set()
        # Workers a reload or a restart was starting when the stop came are in ``alive``
        # too: each gets SIGTERM, whenever it appears.
        while self.alive and time.monotonic() < deadline:
            for wp in list(self.alive - signalled):
                signalled.add(wp)
                with contextlib.suppress(ProcessLookupError):
                    wp.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
        for wp in list(self.alive):
            log.error("worker did not stop in time; killing it", extra={"pid": wp.pid})
            with contextlib.suppress(ProcessLookupError):
                wp.proc.kill()
            await wp.proc.wait()
        if self.admin is not None:
            await self.admin.stop()
        for sock in self.sockets.values():
            sock.close()
        for task in list(self._tasks):
            task.cancel()
        log.info("stopped")


def prepare_run_dir() -> str:
    """Make this instance's run directory (metrics files, worker status, shared tables)
    and point this process at it, before any metric value is created."""
    run_dir = tempfile.mkdtemp(prefix="gateway-")
    os.mkdir(os.path.join(run_dir, "metrics"))
    os.environ[runinfo.RUN_DIR_ENV] = run_dir
    os.environ[metrics.MULTIPROC_ENV] = os.path.join(run_dir, "metrics")
    return run_dir


def check_runtime(runtime: Runtime) -> None:
    """Checks a compile cannot make: the access log file can be opened."""
    al = runtime.config.access_log
    if al.enabled and al.path != "-":
        try:
            with open(al.path, "ab"):
                pass
        except OSError as exc:
            raise CompileError([ConfigIssue("access_log.path", str(exc))]) from None


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _listen(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
