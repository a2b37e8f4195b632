"""The lock file (uv.lock): the environment holds exactly its versions, and a lock that no
longer matches pyproject.toml stops the bootstrap with the command that fixes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from tests.support.procs import ROOT


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_installed_versions_are_the_locked_ones() -> None:
    # A package may be locked at several versions, one per Python range (resolution markers).
    locked: dict[str, set[str]] = {}
    for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        locked.setdefault(_normalise(p["name"]), set()).add(p["version"])
    installed = {_normalise(d.metadata["Name"]): d.version for d in metadata.distributions()}
    # Every package in the test environment is in the lock, at the locked version.
    unlocked = sorted(set(installed) - set(locked))
    assert unlocked == [], f"installed but not locked: {unlocked}"
    wrong = {n: (v, locked[n]) for n, v in installed.items() if v not in locked[n]}
    assert wrong == {}, f"installed version != locked version: {wrong}"
    # The test extra's own tools are among them (the check above is not vacuous).
    for name in ("pytest", "mypy", "redis", "uv", "edge-gateway"):
        assert name in installed


def test_a_stale_lock_stops_the_bootstrap_naming_the_fix(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    (project / "gateway").mkdir()
    for rel in ("uv.lock", "setup.py", "README.md", "scripts/bootstrap.sh", "gateway/_speedups.c"):
        shutil.copy(ROOT / rel, project / rel)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"h11>=0.14"' in pyproject
    (project / "pyproject.toml").write_text(pyproject.replace('"h11>=0.14"', '"h11>=0.14.1"'))
    # A venv of its own holding only uv (the bootstrap's first step), so nothing is installed
    # into the suite's environment.
    venv = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (venv / "bin" / "uv").symlink_to(Path(sys.executable).parent / "uv")
    proc = subprocess.run(
        ["bash", "-c", ". scripts/bootstrap.sh"],
        cwd=project,
        env={**os.environ, "BOOTSTRAP_EXTRAS": "test", "VENV": ".venv"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "uv.lock does not match pyproject.toml" in proc.stderr
    assert "uv lock" in proc.stderr and "scripts/upgrade-deps" in proc.stderr
    assert "h11" in proc.stderr  # uv's own line naming the changed requirement
    # Nothing was installed: the lock was not quietly re-resolved.
    assert not list((venv / "lib").glob("python*/site-packages/h11*"))
    assert (project / "uv.lock").read_bytes() == (ROOT / "uv.lock").read_bytes()
