"""The outbox's keys and times: how a row's key is spelt in `_syncd_outbox`, read back, and used to find the
row again; and the Julian days its times are stored in.

A key is the text SQLite's `quote()` gives for each key column, comma separated: `1`, `'a''b'`, `X'00ff'`,
`NULL`, `2.5`. `quote()` is exact for every storage class (BLOBs, text that is not UTF-8, NULL, reals), so a
trigger that writes it can never fail for a value the app can store (SQLite documents quote() as returning
"a string which is the value of its argument suitable for inclusion into another SQL statement"). Triggers
build it in SQL (`key_sql`), Python reads it with `decode_key` and spells one with `encode_key`.

Times in the outbox are Julian days (`julianday('now')` is the cheapest clock a trigger can read);
`unix_time` and `julian_day` convert.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence

import apsw

from syncd.sqlite import quote_ident, quote_text

__all__ = [
    "MAX_PARAMS",
    "NOW_SQL",
    "InvalidText",
    "decode_key",
    "decode_safe_row",
    "encode_key",
    "julian_day",
    "key_sql",
    "read_rows",
    "safe_select",
    "unix_time",
]

# julianday('now') alone is measurably cheaper per row than converting to unix seconds inside the trigger.
NOW_SQL = "julianday('now')"
UNIX_EPOCH_JULIAN_DAY = 2440587.5
MAX_PARAMS = 30_000  # below SQLite's default limit of 32,766 host parameters per statement

KEY_TOKEN = re.compile(r"""\s*(?:'((?:[^']|'')*)'|X'([0-9A-Fa-f]*)'|(NULL)|([-+0-9.eEInf]+))\s*(,|$)""", re.S)


class InvalidText(bytes):
    """A TEXT value that is not valid UTF-8, as the reader hands it over (the raw bytes)."""


# -- time -------------------------------------------------------------------------------------------------


def unix_time(day: float) -> float:
    """A Julian day (as `julianday()` returns it) -> unix seconds."""
    return (day - UNIX_EPOCH_JULIAN_DAY) * 86400.0


def julian_day(unix: float) -> float:
    """Unix seconds -> a Julian day, the unit of the outbox's `at`."""
    return unix / 86400.0 + UNIX_EPOCH_JULIAN_DAY


# -- keys -------------------------------------------------------------------------------------------------


def key_sql(columns: Sequence[str], row: str) -> str:
    """SQL building the outbox key of `row` (`NEW`, `OLD` or a table name): quote() of each key column,
    comma separated, e.g. `quote(NEW."id") || ',' || quote(NEW."lang")`."""
    return " || ',' || ".join(f"quote({row}.{quote_ident(c)})" for c in columns)


def encode_key(values: Sequence[object]) -> str:
    """The outbox key of these SQLite values, as `key_sql` spells them: (1, "a'b", b"\\x00", None) ->
    "1,'a''b',X'00',NULL". Reals are spelt as Python's repr (decode_key reads both forms).

    Raises TypeError for a value SQLite cannot store (a dict, a list, ...) and ValueError for a float
    that is not finite."""
    parts = []
    for value in values:
        if value is None:
            parts.append("NULL")
        elif isinstance(value, bool):
            parts.append("1" if value else "0")
        elif isinstance(value, int):
            parts.append(str(value))
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"{value!r} cannot be a key")
            parts.append(repr(value))
        elif isinstance(value, str):
            parts.append(quote_text(value))
        elif isinstance(value, bytes | bytearray | memoryview):
            parts.append(f"X'{bytes(value).hex()}'")
        else:
            raise TypeError(f"a key value must be NULL, an integer, a real, text or a BLOB, not {type(value).__name__}")
    return ",".join(parts)


def decode_key(text: str) -> tuple[object, ...]:
    """Invert key_sql: "1,'a''b',X'00',NULL,2.5" -> (1, "a'b", b"\\x00", None, 2.5); ValueError when
    the text is not such a key."""
    if text.isdigit() or (text[:1] == "-" and text[1:].isdigit()):
        return (int(text),)  # the common single INTEGER key, without the tokenizer
    values: list[object] = []
    pos = 0
    while pos < len(text):
        match = KEY_TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"malformed outbox key: {text[:80]!r}")
        quoted, blob, null, number = match.group(1, 2, 3, 4)
        if quoted is not None:
            values.append(quoted.replace("''", "'"))
        elif blob is not None:
            values.append(bytes.fromhex(blob))
        elif null:
            values.append(None)
        else:
            values.append(parse_number(number))
        pos = match.end()
        if match.group(5) == "" and pos < len(text):
            raise ValueError(f"malformed outbox key: {text[:80]!r}")
    return tuple(values)


MAX_SPELLINGS = 8  # other spellings of one key looked up (a wide key of numbers would have 2^n)
INT64 = range(-(2**63), 2**63)


def other_spellings(key: Sequence[object]) -> list[tuple[object, ...]]:
    """The keys of other SQLite types that are the same key in the secondary, as `conflicts.identity` tells: a number
    and its text (`1` and `'1'`, `2.5` and `'2.5'`), per column and combined (at most MAX_SPELLINGS), `key` itself
    left out. Only a column without type affinity holds both (https://sqlite.org/datatype3.html)."""
    options = [[value, *_spellings(value)] for value in key]
    others = (combo for combo in itertools.product(*options) if combo != tuple(key))
    return list(itertools.islice(others, MAX_SPELLINGS))


def _spellings(value: object) -> list[object]:
    if isinstance(value, int | float):
        return [str(value)]
    if not isinstance(value, str):
        return []
    if re.fullmatch(r"-?\d+", value):
        number = int(value)
        return [number] if str(number) == value and number in INT64 else []
    try:
        real = float(value)
    except ValueError:
        return []
    return [real] if math.isfinite(real) and str(real) == value else []


def parse_number(token: str) -> int | float:
    """A number as quote() spells it: an integer, or a real (`Inf` for SQLite's infinities)."""
    if re.fullmatch(r"[-+]?\d+", token):
        return int(token)
    return float(token.replace("Inf", "inf"))


# -- rows by key ------------------------------------------------------------------------------------------


def read_rows(conn: apsw.Connection, table: str, key_columns: Sequence[str], keys: Sequence[tuple[object, ...]],
              safe: bool = False) -> dict[tuple[object, ...], dict[str, object]]:
    """The current rows of `table` for `keys` (at most MAX_PARAMS values in all), as {key: {column: value}}.

    A key with no row is absent from the answer. `safe` reads TEXT as bytes, so text that is not UTF-8
    comes back as InvalidText instead of raising UnicodeDecodeError (apsw's answer to such a value)."""
    columns = [r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})")]
    width = len(key_columns)
    select = safe_select(columns) if safe else ", ".join(quote_ident(c) for c in columns)
    key_list = ", ".join(quote_ident(c) for c in key_columns)
    row_value = "(" + ", ".join("?" * width) + ")"
    matches = (f"{key_list} IN ({', '.join('?' * len(keys))})" if width == 1 else
               f"({key_list}) IN (VALUES {', '.join([row_value] * len(keys))})")
    params = [value for key in keys for value in key]
    found = {}
    for values in conn.execute(f"SELECT {select} FROM {quote_ident(table)} WHERE {matches}", params):
        row = decode_safe_row(columns, values) if safe else dict(zip(columns, values, strict=True))
        found[tuple(row[c] for c in key_columns)] = row
    return found


def safe_select(columns: Sequence[str]) -> str:
    """A select list that reads TEXT as bytes (type, value per column), so invalid UTF-8 cannot stop a read;
    `decode_safe_row` turns such a row back into values."""
    return ", ".join(f"typeof({quote_ident(c)}), CASE typeof({quote_ident(c)}) WHEN 'text' THEN "
                     f"CAST({quote_ident(c)} AS BLOB) ELSE {quote_ident(c)} END" for c in columns)


def decode_safe_row(columns: Sequence[str], values: Sequence[object]) -> dict[str, object]:
    """A row read through `safe_select` -> {column: value}; text that is not UTF-8 becomes InvalidText."""
    row: dict[str, object] = {}
    for i, column in enumerate(columns):
        kind, value = values[2 * i], values[2 * i + 1]
        if kind == "text":
            assert isinstance(value, bytes)
            raw = value
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = InvalidText(raw)
        row[column] = value
    return row


def read_rendered(conn: apsw.Connection, table: str, key_columns: Sequence[str], keys: Sequence[tuple[object, ...]],
                  rendering: tuple[str, str]) -> dict[tuple[object, ...], str | None]:
    """The current rows of `table` for `keys` rendered as JSON objects by SQLite (`rendering`: the JSON expression
    and the condition under which a row needs Python instead), as {key: JSON text, or None for such a row}. A key
    with no row is absent. Raises UnicodeDecodeError when a key or the JSON holds text that is not UTF-8."""
    json_sql, python_when = rendering
    width = len(key_columns)
    key_list = ", ".join(quote_ident(c) for c in key_columns)
    row_value = "(" + ", ".join("?" * width) + ")"
    matches = (f"{key_list} IN ({', '.join('?' * len(keys))})" if width == 1 else
               f"({key_list}) IN (VALUES {', '.join([row_value] * len(keys))})")
    params = [value for key in keys for value in key]
    sql = (f"SELECT {key_list}, CASE WHEN {python_when} THEN NULL ELSE {json_sql} END "
           f"FROM {quote_ident(table)} WHERE {matches}")
    return {tuple(values[:width]): values[width] for values in conn.execute(sql, params)}


def table_columns(conn: apsw.Connection, table: str) -> list[str]:
    """The columns of `table` as SQLite's catalog says now (PRAGMA table_info), in order."""
    return [r[1] for r in conn.execute(f"PRAGMA table_info({quote_ident(table)})")]
