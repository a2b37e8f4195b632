"""Which compiled fast paths the data plane runs.

``gateway/_speedups.c`` holds compiled versions of per-request work. It is built at install
when a C compiler and Python's headers are present (``setup.py``: an optional extension):

- ``RequestFields`` and ``scan_fields``: the header fields of the client's request and of
  the upstream's response (``gateway.http.fields``);
- ``gcra_take``: a rate-limit bucket's take in the shared-memory table, with its lock held
  (``gateway.state.shm``);
- ``Heads``: the request head sent upstream and the response head sent back
  (``gateway.proxy.forward``);
- ``TraceChild``: the ``traceparent`` sent upstream (``gateway.http.trace``);
- ``SlotDefaults``: a new exchange's starting values (``gateway.proxy.exchange``).

Each has a pure-Python version next to its use that behaves the same (``tests/unit/
test_speedups.py`` and ``test_speedups_heads.py`` hold them to it) and runs when the
extension is missing, or when ``GATEWAY_NO_SPEEDUPS`` is set. ``COMPILED`` says which
versions run (the admin ``/status`` shows it per worker).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

#: Set (to anything but "" or "0"): run the pure-Python versions of the compiled fast paths.
NO_SPEEDUPS_ENV = "GATEWAY_NO_SPEEDUPS"
#: what this code takes from the extension
_NAMES = ("RequestFields", "scan_fields", "gcra_take", "Heads", "TraceChild", "SlotDefaults")


def _load() -> ModuleType | None:
    if os.environ.get(NO_SPEEDUPS_ENV, "") not in ("", "0"):
        return None
    try:
        from gateway import _speedups
    except ImportError:  # built without a C compiler: the same, slower
        return None
    missing = [name for name in _NAMES if not hasattr(_speedups, name)]
    if missing:  # a build older than this code (rebuild: pip install -e .)
        logging.getLogger("gateway").warning(
            "gateway/_speedups is an older build (no %s): running the Python versions; "
            "rebuild it with: pip install -e .",
            ", ".join(missing),
        )
        return None
    return _speedups


#: the extension module, or None: the Python versions run
compiled = _load()
#: whether the compiled fast paths are in use
COMPILED = compiled is not None
