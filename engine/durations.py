"""Durations as users write them: "30s", "10m", "1h30m", "500ms", "2d", numbers of seconds, or
``timedelta``."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["Duration", "parse_duration"]

Duration = str | int | float | timedelta

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")


def parse_duration(value: Duration | None, *, what: str = "duration") -> float | None:
    """Seconds in ``value``; ``None`` stays ``None``. Raises ``ValueError`` saying what is wrong."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like '30s', got {value!r}")
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        pos = 0
        seconds = 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(
                f"{what}: cannot read {value!r} as a duration; write it like '30s', '10m', "
                "'1h30m', '500ms' or '2d', or pass a number of seconds or a timedelta"
            )
    else:
        raise ValueError(f"{what}: expected a duration like '30s', got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    return seconds
