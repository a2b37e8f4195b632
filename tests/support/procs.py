"""Real processes for end-to-end tests: the gateway and the test upstream, on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


#: Every port ``free_port`` has handed out in this process.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing is bound to, and never one this process was given before.

    The kernel picks a port at random for each ``bind(("127.0.0.1", 0))``, so two picks made
    before either port is bound (a gateway's listener and admin ports, bound later by the
    gateway process) can be the same port: about one pair in 14,000 here, over the hundred
    or so pairs of a test run (the gateway then fails to start with "address in use")."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    """Poll until ``predicate()`` is truthy and return its value (effects that happen in
    another process are waited for, not assumed; timing is never asserted)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class UpstreamProcess:
    """``tests.support.upstream_server`` in its own process: on ``port`` (a free one by
    default; pass a stopped one's to restart it), answering after ``delay`` seconds. With
    ``tls`` (``cert``, ``key`` and optionally ``client_ca`` file paths) it also serves https on
    ``tls_port``; the recording endpoints stay on the plain ``port``."""

    def __init__(
        self, port: int | None = None, delay: float = 0.0, tls: dict[str, str] | None = None
    ) -> None:
        self.port = port or free_port()
        args = [sys.executable, "-m", "tests.support.upstream_server", str(self.port)]
        if delay:
            args += ["--delay", str(delay)]
        self.tls_port = 0
        if tls is not None:
            self.tls_port = free_port()
            args += ["--tls-port", str(self.tls_port)]
            args += [a for k, v in tls.items() for a in (f"--{k.replace('_', '-')}", v)]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.proc)
        if self.tls_port:
            wait_for_port(self.tls_port, self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def received(self) -> list[dict[str, Any]]:
        from tests.support.client import request

        resp = request(self.port, "GET", "/__received")
        return list(json.loads(resp.body)["requests"])

    def connections(self) -> int:
        from tests.support.client import request

        resp = request(self.port, "GET", "/__received")
        return int(json.loads(resp.body)["connections"])

    def reset(self) -> None:
        from tests.support.client import request

        request(self.port, "POST", "/__reset")

    def set_health(self, status: int) -> None:
        """What its ``/__health`` answers from now on."""
        from tests.support.client import request

        request(self.port, "POST", f"/__health/set/{status}")

    def fail_with(self, status: int) -> None:
        """Answer every request with ``status`` from now on (0: serve normally again)."""
        from tests.support.client import request

        request(self.port, "POST", f"/__fail/set/{status}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class GatewayProcess:
    """``python -m gateway run -c <config>`` with logs captured to a file.

    A dict config gets a listener on ``port`` and an admin listener on ``admin_port`` (free
    ports) unless it names its own. Construction waits until the supervisor reports every
    worker ready (``wait=False``: returns at once)."""

    def __init__(
        self,
        config: dict[str, Any] | str,
        tmp: Path,
        port: int | None = None,
        extra_env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.admin_port = free_port()
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        if isinstance(config, dict):
            config = dict(config)
            config.setdefault("listeners", [{"name": "public", "bind": f"127.0.0.1:{self.port}"}])
            config.setdefault("admin", {"bind": f"127.0.0.1:{self.admin_port}"})
            if config["admin"]:
                self.admin_port = int(str(config["admin"]["bind"]).rsplit(":", 1)[1])
            text = yaml.safe_dump(config, sort_keys=False)
        else:
            text = config.replace("{PORT}", str(self.port)).replace(
                "{ADMIN_PORT}", str(self.admin_port)
            )
        self.config_path = tmp / f"gateway-{self.port}.yaml"
        self.config_path.write_text(text)
        self.log_path = tmp / f"gateway-{self.port}.log"
        self._log = self.log_path.open("wb")
        env = _env()
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        if wait:
            try:
                self.wait_started()
            except Exception:
                self.stop()
                raise RuntimeError(f"gateway did not start:\n{self.logs()}") from None

    def wait_started(self, timeout: float = 30.0) -> None:
        """Until every worker is ready: the admin ``/readyz`` answers 200 (or, for a config
        without the admin API, the supervisor logs ``started``)."""
        deadline = time.monotonic() + timeout
        admin = f"127.0.0.1:{self.admin_port}" in self.config_path.read_text()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            if admin:
                try:
                    if self.admin("GET", "/readyz", timeout=1.0).status == 200:
                        return
                except OSError:
                    pass
            else:
                text = self.logs()
                if '"msg":"started"' in text or "gateway.supervisor: started " in text:
                    return
            time.sleep(0.05)
        raise TimeoutError("the gateway did not report started")

    def logs(self) -> str:
        if not self._log.closed:  # stop() closes it; the file stays readable
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.logs().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
        return out

    def log_records(self) -> list[dict[str, Any]]:
        """The gateway's own log records (stderr), without the access log."""
        return [r for r in self._json_lines() if "level" in r]

    def access_records(self) -> list[dict[str, Any]]:
        """The access log lines (stdout by default)."""
        return [r for r in self._json_lines() if "level" not in r and "request_id" in r]

    def admin(self, method: str, path: str, **kw: Any) -> Any:
        """A request to the admin API (``tests.support.client.request``)."""
        from tests.support.client import request

        return request(self.admin_port, method, path, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)


def run_cli(
    *args: str, timeout: float = 30, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = _env()
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
