"""Durations (``250ms``, ``5s``, ``2m``) and sizes (``64k``, ``10m``, ``1g``) as config values."""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_duration(value: object) -> float:
    """Seconds from ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s or 2m")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if m is None:
            raise ValueError(f"invalid duration {value!r}: use a number with ms, s, m or h")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if not math.isfinite(seconds):  # YAML's .nan would disable a timeout silently
        raise ValueError("a duration must be a finite number")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from ``"64k"``, ``"10m"``, ``"1g"`` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64k or 10m")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if m is None:
            raise ValueError(f"invalid size {value!r}: use a number with k, m or g")
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
