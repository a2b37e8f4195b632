"""Processes the harness starts, and what it reads about them from /proc.

Every process is started in its own session (so its whole tree can be signalled at once),
pinned to a CPU set before it runs a single instruction of its own (``preexec_fn`` sets the
affinity between fork and exec, so nginx workers forked later inherit it), and registered in
``Processes``, whose ``stop_all()`` runs on normal exit, on Ctrl-C and on SIGTERM.

CPU time is ``utime + stime`` from ``/proc/PID/stat`` (fields 14 and 15, clock ticks; all
threads of the process included), summed over the process and its descendants, so nginx's
master and workers, or N gateway processes, are counted together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def available_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


class Proc:
    """One started process (and its session), with the log file its output goes to."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def pids(self) -> list[int]:
        """This process and all its descendants (nginx: master and workers)."""
        return [self.pid, *descendants(self.pid)]

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the session (a worker that outlived its master) is killed.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} {'running' if self.alive() else 'exited'}>"


class Processes:
    """The registry of everything the harness started; ``stop_all()`` is idempotent."""

    def __init__(self) -> None:
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        cpus: Iterable[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        cpu_set = set(cpus) if cpus is not None else None

        def pin() -> None:
            if cpu_set:
                os.sched_setaffinity(0, cpu_set)

        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=pin,  # safe: the harness starts processes from one thread
            )
        proc = Proc(name, popen, log_path)
        self._procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        while self._procs:
            self._procs.pop().stop()


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, read from /proc/*/stat parent links."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), ()):
            found.append(child)
            stack.append(child)
    return found


def _read_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the parenthesised command name), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def cpu_seconds(pids: Iterable[int]) -> tuple[float, float]:
    """(utime, stime) of ``pids`` in seconds, summed (processes that have gone count as 0)."""
    user = system = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            # stat[0] is field 3 (state); utime and stime are fields 14 and 15.
            user += int(stat[11])
            system += int(stat[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def cpu_busy_seconds(cpus: Iterable[int]) -> tuple[float, float]:
    """(user + nice + system, steal) seconds spent so far on ``cpus``, from /proc/stat.

    Interrupt and softirq time are left out: part of it is the proxy's own network work,
    which a process's stime may or may not include depending on the kernel's accounting."""
    wanted = {f"cpu{c}" for c in cpus}
    busy = steal = 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] in wanted:
                    user, nice, system = int(fields[1]), int(fields[2]), int(fields[3])
                    busy += user + nice + system
                    steal += int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        pass
    return busy / CLOCK_TICKS, steal / CLOCK_TICKS


def rss_kb(pid: int) -> int:
    """Resident set size of one process in KiB (0 if it has gone)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def listening_pids(port: int, pids: Iterable[int]) -> set[int]:
    """Which of ``pids`` hold a socket listening on 127.0.0.1/0.0.0.0:``port`` (TCP, IPv4)."""
    inodes: set[str] = set()
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    except OSError:
        return set()
    holders: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                holders.add(pid)
                break
    return holders


def wait_listening(procs: Sequence[Proc], port: int, timeout: float = 20.0) -> None:
    """Wait until each of ``procs`` (or one of its descendants) listens on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = []
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with {proc.popen.returncode} before listening on "
                    f"port {port}; its log ({proc.log_path}):\n{proc.log_tail()}"
                )
            if not listening_pids(port, proc.pids()):
                waiting.append(proc)
        if not waiting:
            return
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in waiting)
            raise TimeoutError(f"{names} not listening on port {port} after {timeout:.0f}s")
        time.sleep(0.05)


def wait_connectable(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
