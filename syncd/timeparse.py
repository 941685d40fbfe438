"""Durations and times as operators type them ('90s', '15m', '2h', '7d', '2w', '10y', or ISO 8601) and read them
('4.5m', '2.0h ago')."""

from __future__ import annotations

from datetime import UTC, datetime

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}


def parse_duration(text: str) -> float:
    """'90s' -> 90.0 (seconds); a bare number means seconds. Raises ValueError for anything else
    (an unknown unit, a number that is negative, infinite or unreadable)."""
    text = text.strip().lower()
    number, unit = (text[:-1], DURATION_UNITS.get(text[-1])) if text[-1:].isalpha() else (text, 1)
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit is None or not 0 <= value < float("inf"):
        raise ValueError(f"{text!r} is not a duration; use a number with s, m, h, d, w or y, like 90s or 2h")
    return value * unit


def parse_time(text: str, now: float) -> float:
    """'2024-01-15T10:00:00Z' (naive means UTC), or a duration back from `now`: '90s', '15m', '2h', '7d' ->
    unix seconds (`now` is unix seconds too). Raises ValueError when `text` is neither."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time; use ISO 8601 like 2024-01-15T10:00:00Z or a duration "
                         "back from now like 90s, 15m, 2h, 7d") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def format_age(seconds: float | None, suffix: str = "") -> str:
    """A duration as people read it: 42.0s, 4.5m, 2.0h, 3.1d (and `suffix`); '-' for None."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}{suffix}"
    return f"{seconds:.1f}s{suffix}"
