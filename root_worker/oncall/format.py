"""Text helpers of ``trimmer-inspect``: durations, timestamps and aligned tables.

Runs in the ``trimmer-inspect`` process only. Pure functions, no I/O.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence

_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d)?\s*", re.I)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_OFF = ("off", "none", "never", "disabled")


def parse_duration(text: str) -> float:
    """Seconds from ``"500ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"1d"`` or a bare number of
    seconds; ``"0"`` / ``"off"`` give ``0.0`` (the threshold is disabled).

    Raises ``ValueError`` with a message fit for argparse.
    """
    if text.strip().lower() in _OFF:
        return 0.0
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r} (examples: 500ms, 5s, 2m, 1h, off)")
    unit = (match.group(2) or "s").lower()
    return float(match.group(1)) * _UNIT_SECONDS[unit]


def format_duration(seconds: float | None) -> str:
    """A short human duration: ``"0.4s"``, ``"12s"``, ``"3m12s"``, ``"5h02m"``, ``"3d04h"``."""
    if seconds is None:
        return "?"
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 10:
        return f"{sign}{s:.1f}s"
    whole = int(s)
    if whole < 60:
        return f"{sign}{whole}s"
    if whole < 3600:
        return f"{sign}{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{sign}{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{sign}{whole // 86400}d{whole % 86400 // 3600:02d}h"


def format_threshold(seconds: float) -> str:
    return "off" if seconds <= 0 else format_duration(seconds)


def iso_utc(ns: int) -> str:
    """``2025-01-31T12:00:00.123Z`` for a wall-clock ns timestamp; ``"-"`` for 0 (never)."""
    if ns <= 0:
        return "-"
    when = _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def ago(ns: int, now_ns: int) -> str:
    """``"3m12s ago"`` (``"never"`` for 0)."""
    if ns <= 0:
        return "never"
    return f"{format_duration((now_ns - ns) / 1e9)} ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
          max_width: int = 0) -> str:
    """Left-aligned columns separated by two spaces; the last column is never padded.

    ``max_width`` > 0 truncates the last column so no line is longer (with ``…``).
    """
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.ljust(w) for c, w in zip(row[:-1], widths[:-1], strict=True)] + [row[-1]]
        line = "  ".join(parts).rstrip()
        if max_width > 0 and len(line) > max_width:
            line = line[: max_width - 1] + "\u2026"
        lines.append(line)
    return "\n".join(lines)


def key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """``key   value`` lines with the keys aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}".rstrip() for k, v in pairs)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    return text.replace("\n", " ") if "\n" in text else text
