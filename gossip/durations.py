"""The one duration grammar of rumor: ``"250ms"``, ``"5s"``, ``"1.5m"``, ``"1h"``.

Service specs and check intervals (CLI, service files) and policy documents all read
durations here, so an operator learns one spelling. Policy documents require the unit
(is a bare ``5`` seconds or milliseconds?); a service spec's bare number is seconds,
as in Consul's check definitions.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class DurationError(ValueError):
    """Not a duration in this grammar."""


def parse_duration(text: str, *, unit_required: bool = False) -> float:
    """Seconds in ``text``; raises ``DurationError`` for anything else."""
    m = _DURATION.fullmatch(text)
    if m is None or (unit_required and m.group(2) is None):
        raise DurationError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest exact spelling ``parse_duration`` reads back: "250ms", "5s", "2m"."""
    ms = round(seconds * 1000, 3)
    if ms % 1000:
        return f"{int(ms)}ms" if ms == int(ms) else f"{ms:.3f}".rstrip("0") + "ms"
    s = int(ms // 1000)
    if s and s % 3600 == 0:
        return f"{s // 3600}h"
    if s and s % 60 == 0:
        return f"{s // 60}m"
    return f"{s}s"


__all__ = ["DurationError", "format_duration", "parse_duration"]
