"""How one SQLite row becomes the JSON object PostgREST receives (DESIGN.md, "Mapping").

A `TableMapping` holds one table's mapping: target name, key, renames, excluded columns and per-column
transforms. `map_row` turns {SQLite column: value} into {target column: JSON-ready value}; `map_key` does
the same for the key alone (deletes). Every value either comes out so that `json.dumps(..., allow_nan=False)`
accepts it and PostgreSQL gets the value the row holds, or the row raises `RowError` with an operator message
(table, key, column, what is wrong, the fix). Nothing is silently changed and no value crashes the caller.

The converters are chosen once per column and cached, so mapping a row is one loop of dict look-ups and,
for columns without a transform, a cheap type test.
"""

from __future__ import annotations

import enum
import functools
import json
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import apsw

from syncd.config import TRANSFORMS, TableConfig
from syncd.keys import InvalidText
from syncd.sqlite import quote_ident, quote_text
from syncd.timeparse import pg_timestamp

__all__ = ["JsonText", "RowError", "TableMapping", "encode_row"]

Converter = Callable[[object], object]
# (target column, converter or None for "no transform"); None instead of the tuple: the column is excluded.
Step = tuple[str, Converter | None] | None

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PREVIEW_CHARS = 40
HEX_PREFIX_BYTES = 16
BOOL_TEXT = {"0": False, "1": True, "false": False, "true": True, "f": False, "t": True}
BOOL_ACCEPTED = "0 or 1, or text '0', '1', 'true', 'false', 't', 'f' (any case)"
BLOB_FIX = 'set transform = "bytea" (or "vector" for float32 embeddings) in {section} of the config'
SQLITE_FIX = "fix the value in SQLite"


class _Unknown(enum.Enum):
    """A column without a step yet (the default of `steps.get`): a one-member enum, which `is` narrows away."""

    UNKNOWN = enum.auto()


_UNKNOWN = _Unknown.UNKNOWN


class RowError(Exception):
    """A row that cannot be shipped as it is; `str()` is the operator message (table, key, column, problem, fix)."""

    def __init__(self, message: str, *, table: str, key: tuple[object, ...], column: str | None = None) -> None:
        super().__init__(message)
        self.table = table
        self.key = key
        self.column = column


class _Unfit(Exception):
    """A value a converter cannot carry; the mapping adds table, key and column to make it a RowError."""

    def __init__(self, problem: str, fix: str = SQLITE_FIX) -> None:
        super().__init__(problem)
        self.problem = problem
        # problem may hold "{column}" and fix "{section}" ([table.columns.<col>]): converters do not know the column.
        self.fix = fix


def _row_error(table: str, key: tuple[object, ...], column: str | None, problem: str, fix: str) -> RowError:
    where = f"table {table!r}, key {key!r}" + (f", column {column!r}" if column is not None else "")
    return RowError(f"{where}: {problem}; {fix}", table=table, key=key, column=column)


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."


def _invalid_utf8(value: bytes | bytearray | memoryview) -> _Unfit:
    prefix = bytes(value[:HEX_PREFIX_BYTES]).hex()
    more = "..." if len(value) > HEX_PREFIX_BYTES else ""
    return _Unfit(f"invalid UTF-8 in column {{column}} ({len(value)} bytes, starting 0x{prefix}{more})", SQLITE_FIX)


def _non_finite(value: float) -> _Unfit:
    return _Unfit(f"JSON cannot carry Infinity or NaN (value {value!r})", SQLITE_FIX)


def _decode(value: bytes | bytearray | memoryview) -> str:
    if isinstance(value, InvalidText):
        raise _invalid_utf8(value)
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid_utf8(value) from None


# ---- No transform ---------------------------------------------------------------------------------------


def _plain(value: object) -> object:
    """A value without transform: str, None, 64-bit int and finite float go as they are."""
    kind = type(value)
    if kind is str or value is None or kind is bool:
        return value
    if type(value) is int:
        if INT64_MIN <= value <= INT64_MAX:
            return value
        raise _Unfit(f"integer {_preview(value)} is beyond 64 bits", SQLITE_FIX)
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise _non_finite(value)
    return _plain_other(value)


def _plain_other(value: object) -> object:
    if isinstance(value, InvalidText):
        raise _invalid_utf8(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raise _Unfit(f"a BLOB ({len(value)} bytes) cannot be carried in JSON as it is", BLOB_FIX)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int | float):
        return _plain(int(value) if isinstance(value, int) else float(value))
    raise _Unfit(f"a {type(value).__name__} value cannot be carried in JSON", SQLITE_FIX)


# ---- json -----------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> object:
    raise _Unfit(f"JSON cannot carry Infinity or NaN (the text holds {name})", SQLITE_FIX)


class JsonText:
    """JSON text that goes into the request body as written (`encode_row`): the value of a `json` column whose
    numbers Python's float would change (`12345678901234567.89`, `1.50`, `1e400`). PostgreSQL's jsonb and json
    read a JSON number as numeric, every digit kept (PostgreSQL docs, 8.14 "JSON Types", Table 8.23)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return type(other) is JsonText and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"JsonText({self.text!r})"


class _Inexact(Exception):
    """A JSON number whose float64 does not give back its text: the value must travel as written."""


def _exact_float(text: str) -> float:
    number = float(text)
    if repr(number) != text:  # repr is the shortest text giving the same float: equal only when nothing is lost
        raise _Inexact
    return number


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Unfit(f"JSON number {text[:PREVIEW_CHARS]} is beyond double precision range", SQLITE_FIX)
    return number


def _invalid_json(text: str, exc: json.JSONDecodeError) -> _Unfit:
    return _Unfit(f"invalid JSON ({exc}) in {_preview(text)}",
                  'fix the value in SQLite, or remove transform = "json" from {section} if it is plain text')


def _parse_json(text: str) -> object:
    """JSON text -> its value, every number exact: Python values when each number survives float64 (the common,
    fast case: one parse), else the text itself as JsonText (after a second parse that validates all of it)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_exact_float)
    except _Inexact:
        pass
    except json.JSONDecodeError as exc:
        raise _invalid_json(text, exc) from None
    except ValueError:  # an integer of more digits than int() converts (4300): jsonb takes it as numeric
        pass
    try:
        json.loads(text, parse_constant=_reject_constant, parse_float=str, parse_int=str)
    except json.JSONDecodeError as exc:
        raise _invalid_json(text, exc) from None
    return JsonText(text.strip())


def _parse_floats(text: str) -> object:
    """JSON text -> its value with numbers as float64 (for `vector`, whose components are float32 anyway)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise _invalid_json(text, exc) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _Unfit(f"JSON that cannot be read: {exc}", SQLITE_FIX) from None


def _to_json(value: object) -> object:
    """`json`: text holding JSON -> its value, numbers exactly as written (see `_parse_json`); empty or
    whitespace-only text -> None; numbers pass."""
    if isinstance(value, bytes | bytearray | memoryview):
        value = _decode(value)
    if isinstance(value, str):
        return _parse_json(value) if value.strip() else None
    if value is None or isinstance(value, int | float):
        return _plain(value)
    return _plain_other(value)


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


def encode_row(row: Mapping[str, object]) -> str:
    """A mapped row as the JSON object of a request body: JsonText values go in as written, the rest as
    `json.dumps` writes them (a row without JsonText costs one C encoder call, as before). Raises TypeError or
    ValueError as json does (NaN or Infinity, a value JSON has no type for)."""
    try:
        return _ENCODE(row if type(row) is dict else dict(row))
    except TypeError:
        if not any(type(value) is JsonText for value in row.values()):
            raise
    return "{" + ",".join(f"{_ENCODE(name)}:{value.text if type(value) is JsonText else _ENCODE(value)}"
                          for name, value in row.items()) + "}"


# ---- bool -----------------------------------------------------------------------------------------------


def _to_bool(value: object) -> bool | None:
    """`bool`: 0/1 (also 0.0/1.0) and the texts of BOOL_TEXT -> False/True; None -> None."""
    if value is None or type(value) is bool:
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, InvalidText):
        raise _invalid_utf8(value)
    if isinstance(value, str) and (flag := BOOL_TEXT.get(value.strip().lower())) is not None:
        return flag
    raise _Unfit(f"{_preview(value)} is not a boolean (transform bool accepts {BOOL_ACCEPTED})",
                 'fix the value in SQLite, or remove transform = "bool" from {section}')


# ---- timestamp ------------------------------------------------------------------------------------------


def _to_timestamp(value: object) -> str | None:
    """`timestamp`: unix seconds or ISO 8601 text -> ISO 8601 in UTC ('2024-01-15T10:30:00.123457+00:00'), the
    instant PostgreSQL reads from the text (`timeparse.pg_timestamp`: fractions rounded to the microsecond as it
    rounds them, offsets with seconds, 'infinity'). Text without an offset is taken as UTC; text with an offset is
    converted to UTC (timestamptz keeps no offset anyway). Text of digits only is unix seconds.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and type(value) is not bool:
        return _from_unix(value)
    if isinstance(value, InvalidText):
        raise _invalid_utf8(value)
    if isinstance(value, str):
        text = value.strip()
        return _from_digits(text) if text.isascii() and text.isdigit() else _from_iso(value)
    raise _Unfit(f"{_preview(value)} is not a time (transform timestamp accepts unix seconds or ISO 8601 text)",
                 'fix the value in SQLite, or remove transform = "timestamp" from {section}')


def _from_digits(text: str) -> str:
    if len(text) > 20:  # int() refuses very long digit strings; any this long is out of range anyway
        raise _Unfit(f"unix time {_preview(text)} is outside the years 1 to 9999", SQLITE_FIX)
    return _from_unix(int(text))


def _from_unix(seconds: float) -> str:
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise _non_finite(seconds)
    try:
        moment = EPOCH + timedelta(seconds=seconds)
    except OverflowError:
        raise _Unfit(f"unix time {seconds!r} is outside the years 1 to 9999", SQLITE_FIX) from None
    return moment.isoformat()


def _from_iso(original: str) -> str:
    try:
        return pg_timestamp(original, with_zone=True)
    except ValueError as exc:
        raise _Unfit(f"{_preview(original)} is not a time syncd can read as PostgreSQL does ({exc}; transform "
                     "timestamp accepts ISO 8601 text such as '2024-01-15T10:30:00Z', '2024-01-15 10:30:00.1234567', "
                     "'2024-01-15T10:30:00+05:30', 'infinity', or unix seconds)",
                     'fix the value in SQLite, or remove transform = "timestamp" from {section}') from None


# ---- bytea ----------------------------------------------------------------------------------------------


def _to_bytea(value: object) -> str | None:
    """`bytea`: BLOB (or text, as UTF-8; invalid UTF-8 text as its raw bytes) -> PostgreSQL hex '\\x...'."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    raise _Unfit(f"{_preview(value)} is not a BLOB or text (transform bytea)",
                 'fix the value in SQLite, or remove transform = "bytea" from {section}')


# ---- vector ---------------------------------------------------------------------------------------------


def _to_vector(value: object) -> str | None:
    """`vector`: BLOB of little-endian float32, or text holding a JSON array of numbers -> pgvector '[1,2.5]'."""
    if value is None:
        return None
    if isinstance(value, InvalidText):
        raise _invalid_utf8(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _vector_from_blob(bytes(value))
    if isinstance(value, str):
        return _vector_from_blob(_float32_blob(_number_list(value)))
    raise _Unfit(f"{_preview(value)} is not a vector (transform vector accepts a BLOB of float32 or a JSON array)",
                 'fix the value in SQLite, or remove transform = "vector" from {section}')


def _vector_from_blob(blob: bytes) -> str:
    if not blob or len(blob) % 4:
        raise _Unfit(f"a BLOB of {len(blob)} bytes is not a vector of float32 (a non-zero multiple of 4 bytes)",
                     'fix the value in SQLite, or use transform = "bytea" in {section} if it is not a vector')
    values = struct.unpack(f"<{len(blob) // 4}f", blob)
    if not all(map(math.isfinite, values)):
        raise _Unfit("a vector holding NaN or Infinity cannot be carried (pgvector refuses them)", SQLITE_FIX)
    return "[" + ",".join([format(v, ".9g") for v in values]) + "]"


def _number_list(text: str) -> list[float]:
    parsed = _parse_floats(text) if text.strip() else None
    if not isinstance(parsed, list) or not parsed:
        raise _Unfit(f"{_preview(text)} is not a non-empty JSON array of numbers (transform vector)", SQLITE_FIX)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in parsed):
        raise _Unfit(f"the JSON array {_preview(text)} holds something other than numbers (transform vector)",
                     SQLITE_FIX)
    try:
        return [float(v) for v in parsed]
    except OverflowError:
        raise _Unfit("the JSON array holds a number beyond float range (transform vector)", SQLITE_FIX) from None


def _float32_blob(numbers: list[float]) -> bytes:
    # Packing as float32 is what pgvector stores; numbers beyond its range fail here rather than there.
    try:
        return struct.pack(f"<{len(numbers)}f", *numbers)
    except OverflowError:
        raise _Unfit("the JSON array holds a number beyond float32 range (transform vector)", SQLITE_FIX) from None


CONVERTERS: dict[str, Converter] = {
    "json": _to_json,
    "bool": _to_bool,
    "timestamp": _to_timestamp,
    "bytea": _to_bytea,
    "vector": _to_vector,
}
assert set(CONVERTERS) == set(TRANSFORMS), "every transform of the config needs a converter"


# ---- The mapping ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableMapping:
    """One table's mapping; raises ValueError when built with an inconsistent mapping."""

    source: str
    target: str
    key: tuple[str, ...]
    exclude: frozenset[str] = frozenset()
    renames: Mapping[str, str] = field(default_factory=dict)
    transforms: Mapping[str, str] = field(default_factory=dict)
    _steps: dict[str, Step] = field(init=False, repr=False, compare=False)
    _claimed: dict[str, str] = field(init=False, repr=False, compare=False)
    _rendered: dict[tuple[str, ...], tuple[str, str] | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(self)
        steps: dict[str, Step] = {column: None for column in self.exclude}
        for column in {*self.key, *self.renames, *self.transforms} - self.exclude:
            steps[column] = self._make_step(column)
        object.__setattr__(self, "_steps", steps)
        # target name -> the configured column shipped under it, to catch an unconfigured column colliding.
        object.__setattr__(self, "_claimed", {step[0]: column for column, step in steps.items() if step})
        object.__setattr__(self, "_rendered", {})

    @classmethod
    def from_config(cls, table: TableConfig, key: Sequence[str]) -> TableMapping:
        """The mapping of `table`; `key` is the config's key or, without one, the SQLite primary key."""
        return cls(
            source=table.name,
            target=table.target_name,
            key=tuple(key),
            exclude=frozenset(table.exclude),
            renames={column: spec.rename for column, spec in table.columns.items() if spec.rename is not None},
            transforms={column: spec.transform for column, spec in table.columns.items()
                        if spec.transform is not None},
        )

    @property
    def target_key(self) -> list[str]:
        """The key columns as named in the target."""
        return [self.renames.get(column, column) for column in self.key]

    def map_row(self, row: Mapping[str, object], key: tuple[object, ...]) -> dict[str, object]:
        """{SQLite column: value} -> {target column: JSON-ready value}; `key` only names the row in errors."""
        steps = self._steps
        out: dict[str, object] = {}
        column = None
        try:
            for column, value in row.items():
                step = steps.get(column, _UNKNOWN)
                if step is _UNKNOWN:
                    step = self._unknown_step(column, key)
                if step is None:
                    continue
                target, convert = step
                if convert is None:
                    kind = type(value)  # `type(value) is int`, not `kind is int`, where mypy must narrow value
                    if (kind is str or value is None or (type(value) is int and INT64_MIN <= value <= INT64_MAX)
                            or (type(value) is float and math.isfinite(value))):
                        out[target] = value
                    else:
                        out[target] = _plain(value)
                else:
                    out[target] = convert(value)
        except _Unfit as exc:
            raise self._error(key, column, exc) from None
        return out

    def map_key(self, key: tuple[object, ...]) -> dict[str, object]:
        """The key values (in the order of `self.key`) -> {target key column: value}, transformed as in rows."""
        if len(key) != len(self.key):
            raise ValueError(f"table {self.source!r} has key {self.key!r}; got {len(key)} values {key!r}")
        out: dict[str, object] = {}
        for column, value in zip(self.key, key, strict=True):
            if value is None:
                raise _row_error(self.source, key, column, f"NULL in key column {column!r}",
                                 "a row without a key cannot be identified in the secondary; give it a key in SQLite")
            step = self._steps[column]
            assert step is not None  # a key column is never excluded (_check)
            target, convert = step
            try:
                out[target] = (convert or _plain)(value)
            except _Unfit as exc:
                raise self._error(key, column, exc) from None
        return out

    def sql_rendering(self, columns: Sequence[str]) -> tuple[str, str] | None:
        """The same mapping done by SQLite itself, for a table whose columns are `columns` (as now in SQLite):
        (the SQL expression of one row's JSON object, the SQL condition under which a row must take `map_row`
        instead), or None when the table cannot be rendered in SQL (a json, timestamp or vector transform, a
        name that two columns would ship under). Both give the same JSON, to the digit (tests/test_rendering.py): a REAL
        goes through `syncd_real_json` (the connection needs `sqlite.register_functions`), and the rows SQLite cannot
        render as `map_row` does (a BLOB, a zero or infinite REAL, a bool text in another spelling) take
        `map_row`. Text that is not UTF-8 shows when the JSON is read (apsw raises UnicodeDecodeError)."""
        cached = self._rendered.get(tuple(columns))
        if cached is not None or tuple(columns) in self._rendered:
            return cached
        rendering = _render(self, columns)
        self._rendered[tuple(columns)] = rendering
        return rendering

    def _make_step(self, column: str) -> Step:
        transform = self.transforms.get(column)
        return self.renames.get(column, column), CONVERTERS[transform] if transform else None

    def _unknown_step(self, column: str, key: tuple[object, ...]) -> Step:
        owner = self._claimed.get(column)
        if owner is not None:
            # Shipping both would silently drop one of the two values.
            raise _row_error(self.source, key, column,
                             f"column {column!r} has the same name as the target column that {owner!r} is renamed to",
                             f"rename one of them in [table.columns.{column}] or [table.columns.{owner}], "
                             "or exclude one")
        step = self._make_step(column)
        self._steps[column] = step
        return step

    def _error(self, key: tuple[object, ...], column: str | None, exc: _Unfit) -> RowError:
        problem = exc.problem.replace("{column}", repr(column))
        return _row_error(self.source, key, column, problem, exc.fix.replace("{section}", f"[table.columns.{column}]"))


# ---- The same, in SQL ------------------------------------------------------------------------------------

SQL_RENDERED = (None, "bool", "bytea")  # transforms SQLite can do exactly; the others stay in Python
BOOL_SQL_TEXT = "('0', '1', 'false', 'true', 'f', 't')"


def _render(mapping: TableMapping, columns: Sequence[str]) -> tuple[str, str] | None:
    """(json_object(...) of a row, the condition for map_row) for these columns, or None (see sql_rendering)."""
    pairs, python_when, targets = [], [], set()
    for column in columns:
        if column in mapping.exclude:
            continue
        transform = mapping.transforms.get(column)
        target = mapping.renames.get(column, column)
        owner = mapping._claimed.get(target)
        if transform not in SQL_RENDERED or target in targets or (owner is not None and owner != column):
            return None
        targets.add(target)
        value, unfit = _column_sql(quote_ident(column), transform)
        pairs.append(f"{quote_text(target)}, {value}")
        python_when.append(unfit)
    if not pairs:
        return None
    return f"json_object({', '.join(pairs)})", " OR ".join(f"({condition})" for condition in python_when)


def _column_sql(q: str, transform: str | None) -> tuple[str, str]:
    """(the SQL value json_object gets for column `q`, the condition under which map_row must do it instead).
    Every comparison of the column's value says COLLATE BINARY: one with the column's own collation would need it,
    and a collation the application registers (Anki's unicase) is unknown to syncd's connection, which then cannot
    even prepare the statement ("no such collation sequence"). Only numbers are compared, so BINARY decides alike."""
    b = f"{q} COLLATE BINARY"
    if transform == "bool":
        value = (f"CASE WHEN {q} IS NULL THEN NULL WHEN typeof({q}) IN ('integer', 'real') THEN "
                 f"json(CASE WHEN {b} = 1 THEN 'true' ELSE 'false' END) ELSE "
                 f"json(CASE WHEN lower({q}) IN ('1', 'true', 't') THEN 'true' ELSE 'false' END) END")
        fits = (f"{q} IS NULL OR (typeof({q}) IN ('integer', 'real') AND {b} IN (0, 1)) "
                f"OR (typeof({q}) = 'text' AND lower({q}) IN {BOOL_SQL_TEXT})")
        return value, f"NOT ({fits})"
    if transform == "bytea":
        return (f"CASE WHEN {q} IS NULL THEN NULL ELSE '\\x' || lower(hex({q})) END",
                f"typeof({q}) NOT IN ('blob', 'text', 'null')")
    # No transform: SQLite renders text and integers as Python's json does; a REAL with its shortest digits as
    # Python does (`real_sql`), but -0.0 as 0.0 (only a column without affinity keeps a -0.0; atan2 tells it apart);
    # a BLOB or an infinite REAL is map_row's to refuse.
    negative_zero = f"atan2({q}, -1) < 0" if math_functions() else "1"
    value = f"CASE WHEN typeof({q}) = 'real' THEN {real_sql(q)} ELSE {q} END"
    return value, (f"typeof({q}) = 'blob' OR (typeof({q}) = 'real' AND (({b} = 0 AND {negative_zero}) "
               f"OR abs({q}) > 1.7976931348623157e308))")


def real_sql(q: str) -> str:
    """The JSON number of the REAL `q` as Python's repr writes it (its shortest digits that give the double back):
    SQLite's printf when they number at most 15, `syncd_real_json` (Python, sqlite.register_functions) otherwise.

    SQLite's own rendering (json_object, quote) writes 17 digits where fewer give the double back (1.0/3 as
    0.33333333333333332). Its printf with 15 digits is read back here (CAST ... AS REAL): no two decimals of 15
    significant digits are the same double (C's DBL_DIG), so a text that gives the double back is the only one, the
    digits repr writes; a wrong one would not give it back and takes Python. This holds in the range where %g and
    repr both write no exponent (1e-4 <= |x| < 1e15). 16 digits would need printf to round exactly, which it does
    not everywhere (a tie at the 16th digit rounds away from zero, and SQLite's float rendering changed with 3.43
    and depends on the platform's long double), so a value that needs 16 or 17 digits takes Python. A call into
    Python costs ~0.8 us per value, printf a tenth of it."""
    python = f"json(syncd_real_json({q}))"
    b = f"{q} COLLATE BINARY"  # as in _column_sql: an application's collation would stop the statement's prepare
    digits = f"printf('%!.15g', {q})"
    return (f"CASE WHEN ((abs({q}) >= 1e-4 AND abs({q}) < 1e15) OR {b} = 0) AND CAST({digits} AS REAL) = {b} "
            f"THEN json({digits}) ELSE {python} END")


@functools.cache
def math_functions() -> bool:
    """Whether this SQLite has its math functions (SQLITE_ENABLE_MATH_FUNCTIONS: atan2 and friends)."""
    try:
        apsw.Connection(":memory:").execute("SELECT atan2(0, -1)").fetchall()
    except apsw.SQLError:
        return False
    return True


def _check(mapping: TableMapping) -> None:
    """Reject what would make rows unshippable or ambiguous (the config checks most of it already)."""
    table = mapping.source
    if not mapping.key:
        raise ValueError(f"table {table!r}: give at least one key column")
    if excluded := sorted(set(mapping.key) & mapping.exclude):
        raise ValueError(f"table {table!r}: key column(s) {excluded!r} are excluded; a key is always shipped, "
                         "remove them from exclude")
    if unknown := sorted({t for t in mapping.transforms.values() if t not in CONVERTERS}):
        raise ValueError(f"table {table!r}: unknown transform(s) {unknown!r}; use one of {list(TRANSFORMS)!r}")
    owners: dict[str, str] = {}
    for column in dict.fromkeys([*mapping.key, *mapping.renames, *mapping.transforms]):
        if column in mapping.exclude:
            continue
        target = mapping.renames.get(column, column)
        if owners.setdefault(target, column) != column:
            raise ValueError(f"table {table!r}: columns {owners[target]!r} and {column!r} both ship as {target!r}; "
                             "rename one of them")
