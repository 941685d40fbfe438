"""Durations and times as operators type them: '90s', '15m', '2h', '7d', '2w', '10y', or ISO 8601."""

from __future__ import annotations

from datetime import UTC, datetime

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}


def parse_duration(text: str) -> float:
    """'90s' -> 90.0; a bare number means seconds."""
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
    """'2024-01-15T10:00:00Z' (naive means UTC), or a duration back from now: '90s', '15m', '2h', '7d'."""
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
