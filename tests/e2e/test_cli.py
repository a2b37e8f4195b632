"""The ``gateway`` command as a user runs it: ``check``, ``version``, ``run``."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import example_config_text, main
from tests.support.client import request
from tests.support.procs import ROOT, _env, free_port, run_cli, wait_for_port

GOOD = """\
listeners:
  - {name: public, bind: "127.0.0.1:18080"}
upstreams:
  backend:
    targets: [{url: "http://127.0.0.1:9000"}, {url: "builtin:echo"}]
routes:
  - name: all
    match: {path_prefix: /}
    upstream: backend
    plugins:
      - headers: {response: {set: {x-a: b}}}
plugins: [headers]
"""

BAD = """\
listeners:
  - {name: public, bind: "127.0.0.1:18080"}
upstreams:
  backend:
    targets: [{url: "http://127.0.0.1:9000"}]
routes:
  - name: all
    upstream: nope
  - name: all
    upstream: backend
    strip_prefix: true
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- check ------------------------------------------------------------------------------------
def test_check_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{path}: ok: 1 listener(s), 1 upstream(s), 1 route(s), 2 plugin instance(s)"
    )


def test_check_bad_file_lists_every_error_with_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: routes[0].upstream: unknown upstream 'nope' (known: backend) (line 8)",
        f"{path}: routes[1].name: duplicate route name 'all' (line 9)",
        f"{path}: routes[1].strip_prefix: needs match.path_prefix (line 11)",
        f"{path}: 3 error(s); config rejected",
    ]


def test_check_reports_schema_and_plugin_errors_together(tmp_path: Path) -> None:
    text = """\
listeners:
  - {name: public, bind: "127.0.0.1:18080", tsl: {}}
routes:
  - name: r
    upstream: u
    plugins:
      - cors: {allow_origins: ["*"], allow_credentials: true}
"""
    path = write(tmp_path, text)
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert f"{path}: listeners[0].tsl: unknown key (line 2)" in lines
    assert (
        f"{path}: routes[0].plugins[0].cors: allow_credentials cannot be combined with '*' "
        "in allow_origins: list the trusted origins (line 7)"
    ) in lines
    assert lines[-1] == f"{path}: 2 error(s); config rejected"


# The next few call ``gateway.cli.main`` in-process: the same code path as the command,
# without a Python start-up per case.
def check_in_process(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str, str]:
    rc = main(["check", "-c", str(path)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_interpolates_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = GOOD.replace("127.0.0.1:18080", "${GW_BIND:-127.0.0.1:1}")
    path = write(tmp_path, text.replace("http://127.0.0.1:9000", "${GW_TEST_BACKEND}"))
    monkeypatch.setenv("GW_TEST_BACKEND", "")
    rc, _, err = check_in_process(capsys, path)
    assert rc == 2
    assert err.splitlines()[0] == (
        f"{path}: upstreams.backend.targets[0].url: String should have at least 1 character "
        "(line 5)"
    )
    monkeypatch.setenv("GW_TEST_BACKEND", "http://10.1.1.1:80")
    rc, out, err = check_in_process(capsys, path)
    assert rc == 0, err
    assert out.startswith(f"{path}: ok: ")


def test_check_names_a_missing_environment_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GW_UNSET_HOST_X", raising=False)
    path = write(tmp_path, GOOD.replace("http://127.0.0.1:9000", "http://${GW_UNSET_HOST_X}:80"))
    rc, _, err = check_in_process(capsys, path)
    assert rc == 2
    assert err.splitlines()[0] == (
        f"{path}: upstreams.backend.targets[0].url: environment variable GW_UNSET_HOST_X "
        "is not set (line 5)"
    )


def test_check_unreadable_and_invalid_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = check_in_process(capsys, tmp_path / "absent.yaml")
    assert rc == 2
    assert f"cannot read {tmp_path / 'absent.yaml'}" in err
    broken = write(tmp_path, "listeners: [\n  {name: a\nroutes: []\n", "broken.yaml")
    rc, _, err = check_in_process(capsys, broken)
    assert rc == 2
    first = err.splitlines()[0]
    assert first.startswith(f"{broken}: invalid YAML: ")
    assert first.endswith("(line 3)")


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([], ["frobnicate"], ["check", "--bogus"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "usage: gateway" in capsys.readouterr().err


def test_check_without_c_validates_the_bundled_example() -> None:
    result = run_cli("check")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<bundled example>: ok: 1 listener(s), 1 upstream(s)")


def test_version() -> None:
    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"gateway {__version__}"


# -- run --------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _serve(args: list[str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", *args],
            cwd=ROOT,
            env=_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"gateway did not start:\n{log.read_text()}") from None
    return proc


def _on_free_ports(text: str, port: int) -> str:
    """The example config with its listener on ``port`` and its admin API on a free port."""
    return text.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
        "127.0.0.1:9901", f"127.0.0.1:{free_port()}"
    )


def _check_demo(port: int) -> None:
    resp = request(port, "GET", "/demo/hello?x=1", headers=[("Origin", "https://site.test")])
    assert resp.status == 200, resp.body
    assert resp.header("x-served-by") == "gateway-demo"
    assert resp.header("access-control-allow-origin") == "*"
    echoed = resp.json()
    assert echoed["method"] == "GET"
    assert echoed["url"] == "/hello?x=1"  # strip_prefix: /demo
    assert ["x-forwarded-host", "test.local"] in echoed["headers"]
    missing = request(port, "GET", "/elsewhere")
    assert missing.status == 404 and missing.json()["error"]["code"] == "no_route"


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_run_serves_the_bundled_example(tmp_path: Path) -> None:
    """With no -c, ``gateway run`` serves the bundled example on 127.0.0.1:8080. When that
    port is taken here, the same example runs from a copy on a free port instead."""
    text = example_config_text()
    assert 'bind: "127.0.0.1:8080"' in text
    if _port_free(8080) and _port_free(9901):
        proc = _serve([], 8080, tmp_path / "bundled.log")
        try:
            _check_demo(8080)
        finally:
            assert _stop(proc) == 0
        records = [json.loads(line) for line in (tmp_path / "bundled.log").read_text().splitlines()]
        assert any(r.get("config") == "example" and r["msg"] == "starting" for r in records)
    port = free_port()
    copy = write(tmp_path, _on_free_ports(text, port), "example.yaml")
    proc = _serve(["-c", str(copy)], port, tmp_path / "copy.log")
    try:
        _check_demo(port)
    finally:
        assert _stop(proc) == 0


def test_run_text_log_format(tmp_path: Path) -> None:
    port = free_port()
    copy = write(
        tmp_path,
        _on_free_ports(example_config_text(), port),
        "example.yaml",
    )
    log = tmp_path / "text.log"
    proc = _serve(["-c", str(copy), "--log-format", "text"], port, log)
    try:
        assert request(port, "GET", "/demo/").status == 200
    finally:
        assert _stop(proc) == 0
    text = log.read_text()
    assert " INFO    gateway.supervisor: starting" in text
    assert not text.lstrip().startswith("{")


def test_run_with_a_bad_config_exits_2_and_logs_every_error(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "-c", str(path)],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    errors = [r for r in records if r["level"] == "error"]
    assert [r["msg"] for r in errors] == [
        "config error: routes[0].upstream: unknown upstream 'nope' (known: backend) (line 8)",
        "config error: routes[1].name: duplicate route name 'all' (line 9)",
        "config error: routes[1].strip_prefix: needs match.path_prefix (line 11)",
    ]
    assert all(r["config"] == str(path) for r in errors)
    assert not any(r["msg"] in ("starting", "listening") for r in records)


def test_run_with_a_port_in_use_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        path = write(tmp_path, GOOD.replace("127.0.0.1:18080", f"127.0.0.1:{port}"))
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "-c", str(path)],
            cwd=ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr
