# Sourced by scripts/run and scripts/test: makes .venv with the project installed.
# BOOTSTRAP_EXTRAS selects the project's extras (e.g. "test,bench"); BOOTSTRAP_SYSTEM lists commands
# whose Debian packages must be present (installed with apt-get when running as root).
# BOOTSTRAP_COMPILED=required makes the compiled fast paths (gateway/_speedups.c) a must:
# a C compiler and Python's headers are installed with apt-get when root, otherwise it stops
# saying what to install; by default a failed build only warns (the gateway then runs the
# pure-Python versions of the same code).
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

die() { echo "error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python 3.11 or newer is needed ($("$PYTHON" --version 2>&1) found)"

declare -A PKG_FOR=([redis-server]=redis-server [nginx]=nginx-light [wrk]=wrk)

apt_install() {
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    die "missing system packages; install them with: sudo apt-get install -y $*"
  fi
  echo "installing system packages: $*" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
}

missing=()
for cmd in ${BOOTSTRAP_SYSTEM:-}; do
  if ! command -v "$cmd" >/dev/null && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("${PKG_FOR[$cmd]}")
  fi
done
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    ver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python${ver}-venv" || apt_install python3-venv
    "$PYTHON" -m venv "$VENV"
  fi
fi

# Python packages come from uv.lock only (exact versions and hashes). uv itself is in the lock (the
# `tools` group): the first time, the venv's pip installs that exact uv wheel, checked against the
# lock's hashes; after that uv keeps itself at the locked version.
export UV_PROJECT_ENVIRONMENT="$VENV" UV_PYTHON_DOWNLOADS=never
if [ ! -x "$VENV/bin/uv" ]; then
  echo "installing uv (the version and hashes in uv.lock) into $VENV ..." >&2
  "$VENV/bin/python" - <<'PY' >"$VENV/uv-requirement.txt"
import tomllib
lock = tomllib.load(open("uv.lock", "rb"))
(uv,) = [p for p in lock["package"] if p["name"] == "uv"]
hashes = " ".join(f"--hash={w['hash']}" for w in uv["wheels"])
print(f"uv=={uv['version']} {hashes}")
PY
  "$VENV/bin/python" -m pip install -q --no-deps --only-binary :all: --require-hashes \
    -r "$VENV/uv-requirement.txt" || die "could not install uv from the hashes in uv.lock"
fi
sync_args=(--locked --python "$VENV/bin/python")
for extra in ${BOOTSTRAP_EXTRAS//,/ }; do sync_args+=(--extra "$extra"); done
# With no extras (scripts/run) the test and bench packages another command installed may stay.
[ -n "${BOOTSTRAP_EXTRAS:-}" ] || sync_args+=(--inexact)
if ! "$VENV/bin/uv" sync -q "${sync_args[@]}"; then
  if ! "$VENV/bin/uv" lock --check -q 2>/dev/null; then
    die "uv.lock does not match pyproject.toml: run $VENV/bin/uv lock (it changes only what pyproject.toml asks for) or scripts/upgrade-deps (the newest of everything), then commit uv.lock"
  fi
  die "could not install the locked packages into $VENV (see uv's message above)"
fi
# The venv's seed pip and setuptools are not in the lock: they go, so .venv holds the lock's set.
"$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" pip setuptools 2>/dev/null || true

compiled() { "$VENV/bin/python" -c 'import gateway._speedups' 2>/dev/null; }
if ! compiled; then
  ver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "${BOOTSTRAP_COMPILED:-}" = required ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
      die "the compiled fast paths did not build; install a C compiler and Python's headers (sudo apt-get install -y gcc python${ver}-dev), then run this again"
    fi
    apt_install gcc "python${ver}-dev" || apt_install gcc python3-dev
    "$VENV/bin/uv" sync -q "${sync_args[@]}" --reinstall-package edge-gateway
    compiled || die "the compiled fast paths (gateway/_speedups.c) still do not build: see $VENV/bin/uv sync -v --reinstall-package edge-gateway"
  else
    echo "warning: the compiled fast paths did not build (no C compiler or Python headers:" \
      "apt-get install gcc python${ver}-dev); running the pure-Python versions" >&2
  fi
fi
