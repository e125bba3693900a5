"""Byte sizes as users write them: 512MiB, 4GiB, 1.5G, 1000000."""
from __future__ import annotations

import re

from .errors import EngineError

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str | None, option: str = "ram_cache") -> int | None:
    """Bytes from an int or a string such as "512MiB"; None stays None (no limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise EngineError(f"{option}: expected a size such as 512MiB, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise EngineError(f"{option}: size must not be negative, got {value}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise EngineError(f"{option}: expected a size such as 512MiB or 4GiB, got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | float | None) -> str:
    """Bytes for people: 1.5 GiB, 640 MiB, 12 KiB."""
    if n is None:
        return "unlimited"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"
