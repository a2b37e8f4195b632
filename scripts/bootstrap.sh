# Sourced by scripts/run and scripts/test: makes .venv with the project installed.
# BOOTSTRAP_EXTRAS selects pip extras (e.g. "test,bench"); BOOTSTRAP_SYSTEM lists commands
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

extras=${BOOTSTRAP_EXTRAS:-}
spec="."
[ -z "$extras" ] || spec=".[$extras]"
stamp="$VENV/.installed-$(cat pyproject.toml setup.py gateway/_speedups.c | sha1sum | cut -c1-12)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "installing the gateway and its dependencies into $VENV ..." >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e "$spec"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

compiled() { "$VENV/bin/python" -c 'import gateway._speedups' 2>/dev/null; }
if ! compiled; then
  ver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  if [ "${BOOTSTRAP_COMPILED:-}" = required ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
      die "the compiled fast paths did not build; install a C compiler and Python's headers (sudo apt-get install -y gcc python${ver}-dev), then run this again"
    fi
    apt_install gcc "python${ver}-dev" || apt_install gcc python3-dev
    "$VENV/bin/python" -m pip install -q --no-deps -e .
    compiled || die "the compiled fast paths (gateway/_speedups.c) still do not build: see pip install -v -e ."
  else
    echo "warning: the compiled fast paths did not build (no C compiler or Python headers:" \
      "apt-get install gcc python${ver}-dev); running the pure-Python versions" >&2
  fi
fi
