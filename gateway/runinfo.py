"""What the workers of one gateway instance share: a run directory and the worker count.

The supervisor creates the run directory (metrics files, shared-memory tables, worker status)
and passes it to its workers in ``GATEWAY_RUN_DIR``; ``GATEWAY_WORKERS`` carries the number of
workers. A process started without a supervisor (a test, an embedded worker) gets a private
temporary directory, removed at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

RUN_DIR_ENV = "GATEWAY_RUN_DIR"
WORKERS_ENV = "GATEWAY_WORKERS"
WORKER_ID_ENV = "GATEWAY_WORKER_ID"

_private: str | None = None


def run_dir() -> str:
    """The directory shared by all workers of this gateway instance."""
    global _private
    path = os.environ.get(RUN_DIR_ENV)
    if path:
        return path
    if _private is None:
        _private = tempfile.mkdtemp(prefix="gateway-run-")
        atexit.register(shutil.rmtree, _private, True)
        os.environ[RUN_DIR_ENV] = _private
    return _private


def worker_count() -> int:
    """How many workers this node runs (1 without a supervisor)."""
    try:
        return max(1, int(os.environ.get(WORKERS_ENV, "1")))
    except ValueError:
        return 1


def worker_id() -> int:
    """This worker's slot number, 0..worker_count()-1 (0 without a supervisor)."""
    try:
        return int(os.environ.get(WORKER_ID_ENV, "0"))
    except ValueError:
        return 0
