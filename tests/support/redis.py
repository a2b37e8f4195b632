"""A real ``redis-server`` on a free loopback port, with the faults the tests need.

Two kinds of stall, each returning once it is in effect (a test that went on as soon as the
fault was sent could talk to a server not stalled yet):

- ``freeze()`` stops the server process (SIGSTOP): a hung host. It answers nothing (the
  kernel still accepts connections and buffers what clients send) until ``thaw()``;
  ``stall(seconds)`` freezes it for that long.
- ``debug_sleep(seconds)`` sends ``DEBUG SLEEP``: a server busy with one slow command.

``kill()`` SIGKILLs it, ``restart()`` starts it again on the same port (with an empty dataset
and script cache, as after a crash).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

from tests.support.procs import free_port, wait_for_port


def _command(*args: str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        raw = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:  # the tests never skip: install it (apt-get install redis-server)
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: tuple[str, ...] = ()
        self._thaw_timer: threading.Timer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--enable-debug-command",
                "local",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.proc)

    def command(self, *args: str | int, timeout: float = 5.0) -> bytes:
        """Send one command, return the raw reply (enough for FLUSHALL, PING, GET...)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(_command(*args))
            return s.recv(65536)

    def flush(self) -> None:
        assert self.command("FLUSHALL").startswith(b"+OK")

    def freeze(self) -> None:
        """Stop the server (SIGSTOP); return once it is stopped, so that every command sent
        from now on waits until ``thaw()``."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(self.proc.pid) != "T":  # the signal is delivered asynchronously
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not stop")
            time.sleep(0.001)

    def thaw(self) -> None:
        """Let a frozen server go on (SIGCONT): it then answers what it was sent meanwhile."""
        timer, self._thaw_timer = self._thaw_timer, None
        if timer is not None:
            timer.cancel()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stall(self, seconds: float) -> None:
        """Freeze the server now, and thaw it ``seconds`` later without waiting for it here."""
        self.freeze()
        self._thaw_timer = threading.Timer(seconds, self.thaw)
        self._thaw_timer.daemon = True
        self._thaw_timer.start()

    def debug_sleep(self, seconds: float) -> None:
        """Send ``DEBUG SLEEP seconds`` (from a thread: its reply comes when the sleep ends)
        and return once the server sleeps: its main thread blocked in a system call other
        than the one it waits for events in (``/proc/<pid>/syscall``)."""
        assert self.proc is not None and self.proc.poll() is None
        pid = self.proc.pid
        idle = _syscall(pid)
        while idle == "running":  # between two waits for events (serverCron, ...)
            time.sleep(0.001)
            idle = _syscall(pid)

        def run() -> None:
            try:
                self.command("DEBUG", "SLEEP", seconds, timeout=seconds + 10)
            except OSError:
                pass

        threading.Thread(target=run, daemon=True).start()
        deadline = time.monotonic() + 10
        while _syscall(pid) in (idle, "running"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start its DEBUG SLEEP")
            time.sleep(0.001)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.thaw()  # a timer of a stall has nothing left to do

    def restart(self) -> None:
        self.kill()
        self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        self.thaw()  # a stopped process would not act on SIGTERM
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _state(pid: int) -> str:
    """A process's state letter from /proc (``T``: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _syscall(pid: int) -> str:
    """The system call a process's main thread is blocked in (its number), or ``running``."""
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0]


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisClusterServers:
    """A three-primary Redis Cluster (no replicas) on free loopback ports."""

    def __init__(self) -> None:
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(3):
                node = RedisServer.__new__(RedisServer)
                node.binary = shutil.which("redis-server") or "redis-server"
                node.port = _cluster_port()
                node.dir = tempfile.mkdtemp(prefix="gw-redis-cluster-")
                node.proc = None
                node._thaw_timer = None
                node.extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
                node.start()
                self.nodes.append(node)
            cli = shutil.which("redis-cli") or "redis-cli"
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            deadline = time.monotonic() + 20
            while b"cluster_state:ok" not in self.nodes[0].command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the test Redis Cluster did not become ready")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class RedisSentinel:
    """One Redis Sentinel watching ``master`` as service ``name``."""

    def __init__(self, master: RedisServer, name: str = "gw") -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gw-sentinel-")
        conf = f"{self.dir}/sentinel.conf"
        with open(conf, "w") as f:
            f.write(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {name} 127.0.0.1 {master.port} 1\n"
            )
        binary = shutil.which("redis-server") or "redis-server"
        self.proc = subprocess.Popen(
            [binary, conf, "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)
        self.url = f"redis+sentinel://127.0.0.1:{self.port}/{name}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
