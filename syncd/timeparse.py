"""Durations and times as operators type them ('90s', '15m', '2h', '7d', '2w', '10y', or ISO 8601) and read them
('4.5m', '2.0h ago'), and timestamps as PostgreSQL reads them (`pg_timestamp`: the `timestamp` transform and verify)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

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


# -- timestamps as PostgreSQL reads them -------------------------------------------------------------------

# The ISO 8601 family PostgreSQL's timestamp input takes (datetime.c DecodeDateTime), measured on PostgreSQL 18:
# a year of 3 or 4 digits (1- and 2-digit years are read as other field orders), 'T', 't' or spaces before the time,
# seconds and fraction optional, a zone after optional spaces: Z, UTC, GMT (any case) or an offset +H, +HH, +HHMM,
# +HH:MM, +HH:MM:SS up to 15:59:59.
_PG_TIMESTAMP = re.compile(
    r"\s*(?P<year>\d{3,4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})"
    r"(?:(?:[Tt]|\s+)(?P<hour>\d{1,2}):(?P<minute>\d{1,2})(?::(?P<second>\d{1,2})(?:\.(?P<fraction>\d*))?)?)?"
    r"(?:\s*(?:(?P<utc>[Zz]|[Uu][Tt][Cc]|[Gg][Mm][Tt])"
    r"|(?P<sign>[+-])(?P<oh>\d{1,2})(?::?(?P<om>\d{2})(?::(?P<os>\d{2}))?)?))?\s*", re.ASCII)
_PG_INFINITY = {"infinity": "infinity", "+infinity": "infinity", "-infinity": "-infinity"}
MAX_OFFSET_HOURS = 15  # PostgreSQL's MAX_TZDISP_HOUR


def pg_timestamp(text: str, with_zone: bool) -> str:
    """ISO 8601 text -> the value PostgreSQL stores for it, as ISO text: with_zone (timestamptz) the instant in UTC
    ('2024-01-15T10:30:00.123457+00:00'; text without a zone is UTC, the session TimeZone of Supabase and of the
    dev server), else (timestamp) the wall time as written, any zone ignored ('2024-01-15T10:30:00.123457');
    'infinity' and '-infinity' as they are. Fractions round to the microsecond as PostgreSQL does
    (ParseFractionalSecond: rint(strtod(fraction) * 1e6), so half to even on the double), 24:00:00 is the next
    day's midnight, second 60 the next minute. Raises ValueError for text outside this family (PostgreSQL reads
    more: names of zones, other field orders, BC, 'epoch') or a value outside the years 1 to 9999."""
    special = _PG_INFINITY.get(text.strip().lower())
    if special is not None:
        return special
    match = _PG_TIMESTAMP.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not ISO 8601 date-time text")
    wall = _wall_time(match)
    offset = _offset_seconds(match)
    if not with_zone:
        return wall.isoformat()
    try:
        return (wall - timedelta(seconds=offset)).replace(tzinfo=UTC).isoformat()
    except OverflowError:
        raise ValueError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def _wall_time(match: re.Match[str]) -> datetime:
    hour, minute, second = (int(match[name] or 0) for name in ("hour", "minute", "second"))
    micro = round(float("0." + match["fraction"]) * 1_000_000) if match["fraction"] else 0
    if minute > 59 or second > 60 or (second == 60 and micro) or hour > 24 or (hour == 24 and (minute or second
                                                                                              or micro)):
        raise ValueError(f"time {match[0].strip()!r} is out of range")
    day = datetime(int(match["year"]), int(match["month"]), int(match["day"]))  # ValueError for year 0, Feb 30...
    try:
        return day + timedelta(hours=hour, minutes=minute, seconds=second, microseconds=micro)
    except OverflowError:
        raise ValueError(f"{match[0].strip()!r} is after the year 9999") from None


def _offset_seconds(match: re.Match[str]) -> int:
    """Seconds east of UTC that the text names (0 without a zone)."""
    if match["sign"] is None:
        return 0
    hours, minutes, seconds = int(match["oh"]), int(match["om"] or 0), int(match["os"] or 0)
    if hours > MAX_OFFSET_HOURS or minutes > 59 or seconds > 59:
        raise ValueError(f"time zone offset {match[0].strip()!r} is out of range")
    total = hours * 3600 + minutes * 60 + seconds
    return -total if match["sign"] == "-" else total
