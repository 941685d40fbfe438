"""`syncd verify`: compare the source with the secondary row by row, after mapping; with `repair`, put
the keys that differ into the outbox, so the daemon ships them like any change (extra rows included:
their key is gone from SQLite, so the daemon deletes them).

Both sides are streamed in key order with keyset pagination, `page` rows at a time: SQLite one short
read per page, the secondary through `GET ?select&order&limit&or=(key > last)`. Each row becomes
(canonical key, hash of its canonical values). SQLite orders text bytewise and PostgreSQL by its
collation, so the two streams cannot simply be merged in step; the pairs go into a scratch SQLite file
instead, and one join per kind finds what is missing in the secondary, extra there, and different.
Memory stays bounded by a page whatever the size of the table; the scratch file is deleted on close.

Canonical values are what PostgreSQL holds, given the target column's type from PostgREST's OpenAPI
description: a timestamp is the instant (timestamptz) or wall time (timestamp) PostgreSQL reads from its text,
rounded to the microsecond as it rounds; numeric and the numbers inside json/jsonb compare exactly, as
numeric equality does (1.0 = 1, 1e2 = 100, a change in the last of 20 digits is a difference: the secondary's
numbers are read as Decimal, never through float64); double precision compares as float64, real at float32
precision and a vector as its float32 components; jsonb ignores key order; a number sent to a text column is
its JSON text. A source row the mapping refuses (the daemon dead-letters it) is counted as unshippable, not
compared.

The secondary is paged by what it answers, not by what was asked: Supabase and PostgREST's `db-max-rows` cap
every read (default 1000 rows) without an error, so a page shorter than asked ends the table only when the
count says every row was read (or when a page comes back empty).
"""

from __future__ import annotations

import decimal
import email.utils
import hashlib
import itertools
import json
import math
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from decimal import Decimal
from typing import TypeVar, cast

import apsw

from syncd import backoff, capture, outbox
from syncd.config import Config, TableConfig
from syncd.keys import InvalidText, decode_key, decode_safe_row, encode_key, key_sql, read_rows, safe_select
from syncd.mapping import JsonText, RowError, TableMapping
from syncd.progress import ReporterFactory, Silent
from syncd.sqlite import ForeignCollation, quote_ident
from syncd.target import PostgrestTarget, TargetError
from syncd.timeparse import pg_timestamp

PAGE = 5000
EXAMPLES = 5
READ_ATTEMPTS = 6  # transient failures of one page before verify gives up on a table
VALUE_PREVIEW = 60
FORMAT_KINDS = {
    "smallint": "integer", "integer": "integer", "bigint": "integer",
    "numeric": "exact", "double precision": "number", "real": "real",
    "boolean": "bool",
    "timestamp with time zone": "instant", "timestamp without time zone": "timestamp", "date": "date",
    "json": "json", "jsonb": "json",
    "bytea": "lower", "uuid": "uuid",
    "text": "text", "character varying": "text", "character": "padded", "citext": "text", "name": "text",
}
# Key columns whose type makes PostgreSQL call two spellings one key compare by that type's equality: citext by
# lower() (its documentation, "citext"); character(n) ignoring trailing spaces (which it pads with). As values they
# compare as stored (a citext holds 'ABC' as sent).
KEY_KINDS = {"citext": "folded"}
# The kinds whose equality syncd models exactly: an extra row of the secondary is deleted by a repair only when
# every key column is of one of these (else another spelling of a live row's key could be what it deletes).
MODELED_KEY_KINDS = frozenset({"integer", "exact", "text", "padded", "folded", "uuid", "date", "timestamp", "instant",
                               "bool", "lower"})


# -- canonical values --------------------------------------------------------------------------------


Canonical = Callable[[object], object]


def canonicalizer(target_format: str, *, key: bool = False) -> Canonical:
    """The function giving a value as PostgreSQL holds it in a column of that type (`key`: as PostgreSQL tells keys
    of that type apart, KEY_KINDS); a value it could not hold stays as it is (so it compares different, which is the
    truth). Chosen once per column."""
    kind = key_kind(target_format) if key else format_kind(target_format)
    convert, settled = CANONICAL[kind], SETTLED.get(kind)

    def canonical(value: object) -> object:
        if value is None or type(value) is settled:
            return value
        try:
            return convert(value)
        except (ValueError, TypeError, ArithmeticError, struct.error):  # decimal's errors are ArithmeticErrors
            return value

    return canonical


def format_kind(target_format: str) -> str:
    """The kind of comparison for a column of PostgREST's OpenAPI `format`, without its type modifier or schema:
    the real PostgREST 12 says 'public.vector(3)' and 'numeric(10,2)' where the dev server says 'public.vector';
    an unknown type compares as JSON."""
    base = TYPMOD.sub("", target_format).strip()
    kind = FORMAT_KINDS.get(base)
    if kind is None and base.rpartition(".")[2] == "vector":
        return "vector"
    return kind or "json"


def key_kind(target_format: str) -> str:
    """The kind of comparison for a key column of that type (KEY_KINDS, else its value's kind)."""
    return KEY_KINDS.get(TYPMOD.sub("", target_format).strip().rpartition(".")[2]) or format_kind(target_format)


TYPMOD = re.compile(r"\([^)]*\)")


def canonical(target_format: str, value: object) -> object:
    """`value` as PostgreSQL holds it in a column of type `target_format` (`canonicalizer` for one value)."""
    return canonicalizer(target_format)(value)


NON_DECIMAL_INTEGER = re.compile(r"[+-]?0(?:[xX](?:_?[0-9a-fA-F])+|[oO](?:_?[0-7])+|[bB](?:_?[01])+)")
# Exact arithmetic on any Decimal: normalize() rounds to the context's precision, this one never rounds.
EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)
INT_DIGITS = 4000  # Python refuses to print ints of more than 4300 digits; bigger integral values stay Decimal


def exact_number(value: object) -> object:
    """A number as PostgreSQL's numeric (and jsonb, whose numbers are numeric) holds it, in one canonical form:
    an int when integral (1.0, 1e2 and 100 are one value, as `'1.0'::jsonb = '1'::jsonb` says), else the Decimal
    without trailing zeros; every digit kept. A float counts as the text Python sends for it (its repr), which is
    what PostgreSQL parses; text as numeric input (spaces around allowed). NaN and Infinity (numeric has them;
    PostgREST sends them as JSON strings) are their text. Raises TypeError for a non-number, decimal's
    InvalidOperation for text that is not a number."""
    if type(value) is int or type(value) is bool:
        return value
    if type(value) is float:
        number = Decimal(repr(value))
    elif type(value) is Decimal:
        number = value
    elif type(value) is str:
        text = value.strip()
        # PostgreSQL 16 reads 0x1A, 0o17 and 0b101 as integers, and _ between digits, as Python's int() does
        number = Decimal(int(text, 0)) if NON_DECIMAL_INTEGER.fullmatch(text) else Decimal(text)
    else:
        raise TypeError(type(value).__name__)
    if not number.is_finite():
        return str(number)
    if number == number.to_integral_value() and number.adjusted() < INT_DIGITS:
        return int(number)
    return number.normalize(EXACT)


def _number(value: object) -> object:
    """double precision: compared as float64 (integral values as int)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str | Decimal):
        value = float(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, int | float):
        return value
    raise TypeError(type(value).__name__)


def _integer(value: object) -> object:
    if isinstance(value, Decimal):
        return exact_number(value)
    return int(value.strip()) if isinstance(value, str) else _number(value)


def _float32(value: float) -> float:
    return cast(float, struct.unpack("<f", struct.pack("<f", value))[0])


def _real(value: object) -> object:
    number = _number(value)
    return _number(_float32(float(number))) if isinstance(number, int | float) and not isinstance(number, bool) \
        else number


def _bool(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    flag = {"t": True, "true": True, "f": False, "false": False, "1": True, "0": False}.get(str(value).lower())
    if flag is None:
        raise ValueError(value)
    return flag


def _instant(value: object) -> str:
    return _pg_time(value, with_zone=True)


def _timestamp(value: object) -> str:
    return _pg_time(value, with_zone=False)  # PostgreSQL ignores an offset here


def _pg_time(value: object, with_zone: bool) -> str:
    """Text as PostgreSQL stores it in a timestamptz (`with_zone`) or timestamp column: ISO 8601, else RFC 2822."""
    if not isinstance(value, str):
        raise TypeError(type(value).__name__)
    try:
        return pg_timestamp(value, with_zone=with_zone)
    except ValueError:
        return pg_timestamp(rfc_2822(value), with_zone=with_zone)


def _date(value: object) -> str:
    """A date column keeps the date of what it is given, time and zone dropped ('2024-1-5 9:05' is 2024-01-05)."""
    text = str(value).strip()
    try:
        return pg_timestamp(text, with_zone=False)[:10]
    except ValueError:
        return date.fromisoformat(text[:10]).isoformat()


def rfc_2822(text: str) -> str:
    """'Mon, 15 Jan 2024 10:30:00 GMT' (RFC 2822/1123: JavaScript's Date.toUTCString(), HTTP dates), which
    PostgreSQL reads, as ISO 8601 text with its offset. Raises ValueError for anything else."""
    try:
        parsed = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        raise ValueError(f"{text!r} is neither ISO 8601 nor RFC 2822 date-time text") from None
    return parsed.isoformat()


def _json(value: object) -> object:
    if type(value) is dict:
        # sorted: jsonb keeps no key order, and the row's hash is taken over repr()
        return {k: value[k] if type(value[k]) in JSON_SETTLED else _json(value[k]) for k in sorted(value)}
    if type(value) is list:
        return [v if type(v) in JSON_SETTLED else _json(v) for v in value]
    if type(value) is float or type(value) is Decimal:
        return exact_number(value) if type(value) is Decimal or math.isfinite(value) else value
    if type(value) is JsonText:  # numbers float64 would change: read them as Decimal, as the secondary's are read
        return _json(json.loads(value.text, parse_float=Decimal))
    return value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _padded(value: object) -> object:
    """character(n): PostgreSQL pads with spaces to n and ignores trailing spaces when it compares."""
    return value.rstrip(" ") if isinstance(value, str) else _text(value)


def _folded(value: object) -> object:
    """A citext key: PostgreSQL compares citext by lower() (its documentation, "citext")."""
    text = _text(value)
    return text.lower() if isinstance(text, str) else text


def _uuid(value: object) -> object:
    """A uuid as PostgreSQL prints it: lower case, hyphenated 8-4-4-4-12. It reads upper case, braces, and hyphens
    after any group of four digits or none (PostgreSQL docs, "UUID Type"), so `{A0EE...}` and `a0ee...` are one key."""
    return str(uuid.UUID(value)) if isinstance(value, str) else value


def _text(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, JsonText):
        return value.text
    # PostgreSQL stores the JSON text of a number, boolean or object sent to a text column
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _vector(value: object) -> list[object]:
    numbers = json.loads(value) if isinstance(value, str) else value
    if not isinstance(numbers, list):
        raise TypeError(type(numbers).__name__)
    return [_number(_float32(float(v))) for v in numbers]


CANONICAL: dict[str, Canonical] = {
    "integer": _integer, "number": _number, "exact": exact_number, "real": _real, "bool": _bool, "instant": _instant,
    "timestamp": _timestamp, "date": _date, "json": _json, "lower": _lower, "uuid": _uuid, "text": _text,
    "vector": _vector, "padded": _padded, "folded": _folded,
}
# The type whose values each kind already holds canonically (the fast path of most values).
SETTLED: dict[str, type] = {"integer": int, "number": int, "exact": int, "json": str, "text": str, "bool": bool}
JSON_SETTLED = frozenset({str, int, bool, type(None)})
# Built once: json.dumps with options builds a new encoder per call.
KEY_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode


def row_hash(values: list[object]) -> bytes:
    """Canonical values are str, int, float, bool, None and lists and key-sorted dicts of them, whose repr()
    is deterministic: the cheapest exact serialisation to hash."""
    return hashlib.blake2b(repr(values).encode("utf-8", "surrogatepass"), digest_size=16).digest()


# -- reports -----------------------------------------------------------------------------------------


@dataclass
class TableReport:
    """One table's result of `verify`: row counts, differences by kind with a few examples each, the backlog, and the
    repair."""

    table: str
    target: str
    source_rows: int = 0
    target_rows: int = 0
    missing: int = 0  # in the source, not in the secondary
    extra: int = 0  # in the secondary, not in the source
    different: int = 0
    unshippable: int = 0  # source rows the mapping refuses (the daemon dead-letters them)
    shared: int = 0  # source rows that are one key of the secondary with another source row (1 and '1')
    examples: dict[str, list[str]] = field(default_factory=dict)
    pending: int = 0
    dead_letters: int = 0
    repair: int | None = None  # keys enqueued (or, dry run, that would be)
    answered: str | None = None  # the reconcile mark this repair answered, as read before the table was
    cleared: bool = False  # whether that mark was cleared (False: a newer one came meanwhile, or there was none)
    unrepairable: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def differences(self) -> int:
        """Rows that differ in any way: missing + extra + different + unshippable + shared."""
        return self.missing + self.extra + self.different + self.unshippable + self.shared

    @property
    def equal(self) -> bool:
        """Verified, and no difference."""
        return self.error is None and self.differences == 0

    def render(self, dry_run: bool) -> list[str]:
        """The table's lines as `syncd verify` prints them (`dry_run`: the repair was only counted)."""
        head = f"{self.table} -> {self.target}: "
        if self.error:
            return [head + f"NOT VERIFIED: {self.error}"]
        if self.equal:
            lines = [head + f"equal ({self.source_rows:,} rows)"]
        else:
            lines = [head + f"DIFFERENT: source {self.source_rows:,} rows, secondary {self.target_rows:,} rows"]
        for kind, label in (("missing", "missing in the secondary"), ("extra", "extra in the secondary"),
                            ("different", "different"), ("unshippable", "unshippable in the source (dead letters)"),
                            ("shared", "one key of the secondary with another row of the source (the secondary holds "
                                       "one of them; give the key column one spelling in SQLite)")):
            count = getattr(self, kind)
            if count:
                lines.append(f"  {count:,} {label}:")
                lines += [f"    {example}" for example in self.examples.get(kind, [])]
                if count > len(self.examples.get(kind, [])):
                    lines.append("    ...")
        if self.pending and not self.equal:
            lines.append(f"  {self.pending:,} change(s) still pending in the outbox: some differences may only be "
                         "in flight (`syncd run` ships them)")
        if self.repair is not None:
            verb = "would enqueue" if dry_run else "enqueued"
            lines.append(f"  repair: {verb} {self.repair:,} key(s)" + ("" if dry_run else "; `syncd run` ships them"))
        lines += [f"  cannot repair: {problem}" for problem in self.unrepairable]
        return lines


@dataclass
class Verification:
    """The result of `verify`: one TableReport per table, and whether it repaired (or, dry run, only counted)."""

    tables: list[TableReport]
    repair: bool = False
    dry_run: bool = False
    consistency: str = "key"  # how the file ships ([worker] consistency): what a reader may have seen meanwhile

    @property
    def equal(self) -> bool:
        """Every table verified and equal."""
        return all(t.equal for t in self.tables)

    def as_dict(self) -> dict[str, object]:
        """The `--json` form: equal, repair, dry_run, and each table's report with its own `equal`."""
        tables = [{**asdict(t), "equal": t.equal} for t in self.tables]
        return {"equal": self.equal, "repair": self.repair, "dry_run": self.dry_run, "consistency": self.consistency,
                "tables": tables}

    def render(self) -> str:
        """What `syncd verify` prints: each table's lines, then one summary line."""
        lines = [f"the file ships in {self.consistency} mode ([worker] consistency = \"{self.consistency}\")"]
        lines += [line for table in self.tables for line in table.render(self.dry_run)]
        differ = sum(not t.equal for t in self.tables)
        if not differ:
            lines.append(f"verify: {len(self.tables)} table(s) equal")
        else:
            lines.append(f"verify: {differ} of {len(self.tables)} table(s) differ"
                         + ("" if self.repair else "; `syncd verify --repair` enqueues the differing keys"))
        return "\n".join(lines)


# -- the comparison ----------------------------------------------------------------------------------


class TableProblem(Exception):
    """This table cannot be compared (missing in the secondary, a column missing there...)."""


def verify(conn: apsw.Connection, config: Config, target: PostgrestTarget, *, tables: Sequence[str] | None = None,
           repair: bool = False, dry_run: bool = False, page: int = PAGE,
           progress: ReporterFactory = Silent) -> Verification:
    """Compare every configured table (or those named) and, with `repair`, enqueue what differs. A repaired table
    is recorded as reconciled (the mark `syncd install` or the daemon left after a gap in capture is cleared).
    Raises CaptureError for a table that is not configured, or a repair where syncd is not installed."""
    chosen = [t for t in config.tables if tables is None or t.name in tables]
    if tables is not None and (unknown := sorted(set(tables) - {t.name for t in chosen})):
        raise capture.CaptureError(f"table(s) {', '.join(map(repr, unknown))} not configured; "
                                   "add a [[table]] section or check the name")
    installed = outbox.installed(conn)
    if repair and not installed:
        raise capture.CaptureError("syncd is not installed, so there is no outbox to repair through; run: "
                                   "syncd install")
    spec = read_with_retries(target.describe)
    pending = outbox.pending_by_table(conn) if installed else {}
    dead = outbox.dead_letters_by_table(conn) if installed else {}
    reports = []
    for table_config in chosen:
        report = TableReport(table_config.name, table_config.target_name,
                             pending=pending[table_config.name].count if table_config.name in pending else 0,
                             dead_letters=dead.get(table_config.name, 0))
        marked = outbox.tables_to_reconcile(conn).get(table_config.name) if installed else None
        try:
            TableVerifier(conn, target, table_config, spec, report, page, progress).run(repair, dry_run)
        except (TableProblem, capture.CaptureError, ForeignCollation) as exc:
            report.error = str(exc)
        except TargetError as exc:
            report.error = exc.message
        if repair and not dry_run and report.error is None:
            report.answered = marked
            report.cleared = outbox.reconciled(conn, table_config.name, report.repair or 0, time.time(), marked)
        reports.append(report)
    return Verification(reports, repair, dry_run, config.worker.consistency)


T = TypeVar("T")


def read_with_retries(read: Callable[..., T], *args: object, **kwargs: object) -> T:
    """A read of the secondary, retried over transient failures (a verify of an hour need not die of a 503)."""
    for attempt in itertools.count(1):
        try:
            return read(*args, **kwargs)
        except TargetError as error:
            if error.kind != "transient" or attempt >= READ_ATTEMPTS:
                raise
            time.sleep(backoff.delay(attempt, base=0.2, cap=5.0, retry_after=error.retry_after))
    raise AssertionError("unreachable")


class TableVerifier:
    """Compares one table: reads both sides into a Scratch file, counts and shows what differs, and with `repair`
    enqueues it. Raises TableProblem when the target table or a shipped column is missing in the secondary,
    CaptureError when the table cannot be captured."""

    def __init__(self, conn: apsw.Connection, target: PostgrestTarget, table_config: TableConfig,
                 spec: dict[str, object], report: TableReport, page: int, progress: ReporterFactory) -> None:
        self.conn = conn
        self.target = target
        self.report = report
        self.page = page
        self.progress = progress
        self.plan = capture.plan_table(conn, table_config)
        self.mapping = TableMapping.from_config(table_config, self.plan.key)
        self.formats = target_formats(spec, self.mapping.target)
        self.source_columns = [c for c in self.plan.table.columns if c not in self.mapping.exclude]
        shipped = [self.mapping.renames.get(c, c) for c in self.source_columns]
        if absent := [c for c in shipped if c not in self.formats]:
            raise TableProblem(f"column(s) {', '.join(map(repr, absent))} do not exist in {self.mapping.target!r} "
                               "of the secondary (`syncd check` shows the fix)")
        self.compared = sorted(shipped)
        self.target_key = self.mapping.target_key
        self.canonical = {column: canonicalizer(fmt) for column, fmt in self.formats.items()}
        self.key_steps = [(c, canonicalizer(self.formats[c], key=True)) for c in self.target_key]
        self.unmodeled = [c for c in self.target_key if key_kind(self.formats[c]) not in MODELED_KEY_KINDS]
        self.row_steps = [(c, self.canonical[c]) for c in self.compared]
        self.scratch = Scratch()

    def run(self, repair: bool, dry_run: bool) -> None:
        """Read both sides, compare, and with `repair` enqueue the keys that differ (`dry_run`: only count them); the
        scratch file is closed in any case. Raises TargetError when a read of the secondary fails (transient failures
        are retried first)."""
        try:
            self.read_source()
            self.read_target()
            self.compare()
            if repair:
                self.enqueue_differences(dry_run)
        finally:
            self.scratch.close()

    # -- the two sides -------------------------------------------------------------------------------

    def canonical_key(self, values: Sequence[object]) -> str:
        """The canonical key of key values given in target key order: a JSON array of their canonical values."""
        return KEY_JSON([canon(v) for (_, canon), v in zip(self.key_steps, values, strict=True)])

    def canonical_row(self, row: dict[str, object]) -> tuple[str, bytes]:
        """(canonical key, hash of the canonical values) of a mapped source row or a secondary row."""
        return (KEY_JSON([canon(row[c]) for c, canon in self.key_steps]),
                row_hash([canon(row.get(c)) for c, canon in self.row_steps]))

    def read_source(self) -> None:
        """Read every source row into the scratch file as (canonical key, hash, outbox key); rows with NULL in a key
        column are only counted, as unshippable."""
        table = quote_ident(self.plan.table.name)
        key_is_null = " OR ".join(f"{quote_ident(c)} IS NULL" for c in self.plan.key)
        # NOT INDEXED: the smallest index may be in a collation the app registers, which syncd's connection lacks
        (total,) = cast(tuple[int], self.conn.execute(f"SELECT count(*) FROM {table} NOT INDEXED").fetchone())
        null_row = self.conn.execute(f"SELECT count(*) FROM {table} WHERE {key_is_null}").fetchone()
        (null_keys,) = cast(tuple[int], null_row)
        self.report.source_rows = total
        if null_keys:
            self.report.unshippable += null_keys
            self.report.examples.setdefault("unshippable", []).append(
                f"{null_keys:,} row(s) with NULL in a key column ({', '.join(self.plan.key)}): they cannot be "
                "identified in the secondary")
        report = self.progress(f"verify {self.plan.table.name}: source", total, "rows")
        done = 0
        for rows in self.source_pages():
            self.scratch.add_source([self.source_entry(okey, row) for okey, row in rows])
            done += len(rows)
            report(done)
        report.close()

    def source_pages(self) -> Iterator[list[tuple[str | bytes, dict[str, object]]]]:
        """Pages of (outbox key, row) in key order, each read in one short read transaction."""
        after: tuple[object, ...] | None = None
        while True:
            try:
                rows = self.source_page(after, safe=False)
            except UnicodeDecodeError:  # a TEXT value that is not UTF-8: read that page as bytes
                rows = self.source_page(after, safe=True)
            if not rows:
                return
            yield rows
            after = tuple(rows[-1][1][c] for c in self.plan.key)

    def source_page(self, after: tuple[object, ...] | None,
                    safe: bool) -> list[tuple[str | bytes, dict[str, object]]]:
        """Up to `page` rows whose key comes after `after` (None: from the start), in key order, as (outbox key,
        {column: value}); `safe` reads TEXT as bytes (the outbox key too), for a page holding text that is not UTF-8."""
        table, key = quote_ident(self.plan.table.name), self.plan.key
        # under the unique index's collations: the column's own may call two keys equal and skip one at a page's end
        # (named only where they differ: a row value with COLLATE makes SQLite search the index by its first column)
        source = self.plan.table
        keys = ", ".join(quote_ident(c) if collation.upper() == source.collation(c).upper() else
                         f"{quote_ident(c)} COLLATE {quote_ident(collation)}"
                         for c, collation in zip(key, source.key_collations(key), strict=True))
        conditions = [f"{quote_ident(c)} IS NOT NULL" for c in key]
        params: list[object] = []
        if after is not None:
            # CAST: a key read as bytes (not UTF-8) must still compare as the TEXT it is
            bound = ", ".join("CAST(? AS TEXT)" if isinstance(v, InvalidText) else "?" for v in after)
            conditions.append(f"({keys}) > ({bound})")
            params += [bytes(v) if isinstance(v, InvalidText) else v for v in after]
        names = self.source_columns
        if safe:
            select = f"CAST({key_sql(key, table)} AS BLOB), {safe_select(names)}"
        else:
            select = key_sql(key, table) + ", " + ", ".join(quote_ident(c) for c in names)
        sql = f"SELECT {select} FROM {table} WHERE {' AND '.join(conditions)} ORDER BY {keys} LIMIT ?"
        pages = []
        for values in self.conn.execute(sql, (*params, self.page)):
            okey, rest = values[0], values[1:]
            row = decode_safe_row(names, rest) if safe else dict(zip(names, rest, strict=True))
            pages.append((okey, row))
        return pages

    def source_entry(self, okey: str | bytes, row: dict[str, object]) -> tuple[str, bytes | None, str]:
        """(canonical key, hash or None when unshippable, outbox key or the reason it cannot ship)."""
        key = tuple(row[c] for c in self.plan.key)
        if isinstance(okey, bytes):
            raw = okey
            try:
                okey = raw.decode("utf-8")
            except UnicodeDecodeError:
                return (f"unshippable:{raw.hex()}", None, f"key {raw[:40]!r} is text that is not valid UTF-8")
        try:
            mapped = self.mapping.map_row(row, key)
        except RowError as exc:
            try:
                mapped_key = self.mapping.map_key(key)
                canonical_key = self.canonical_key([mapped_key[c] for c in self.target_key])
            except RowError:
                canonical_key = f"unshippable:{okey}"
            return canonical_key, None, str(exc)
        # Multi-file mode: a source column named like the tenant column ships the tenant's id (as the target sends it)
        return (*self.canonical_row(self.target.scoped_row(mapped)), okey)

    def read_target(self) -> None:
        """Read every row of the target table, page by page in key order, into the scratch file as (canonical key,
        hash, key values as JSON). Pages by what the secondary answers (`last_page`), not by what was asked."""
        report = self.progress(f"verify {self.plan.table.name}: secondary", None, "rows")
        after: list[object] | None = None
        done = 0
        total: int | None = None
        while True:
            rows, count = read_with_retries(self.target.read_page, self.mapping.target, self.compared,
                                            self.target_key, limit=self.page, after=after, count=after is None)
            if after is None:
                total = count
                report.set_total(total)
            self.scratch.add_target([(*self.canonical_row(r), KEY_JSON([r[c] for c in self.target_key]))
                                     for r in rows])
            done += len(rows)
            report(done)
            if last_page(len(rows), self.page, done, total):
                break
            after = [keyset_value(rows[-1][c]) for c in self.target_key]
        self.report.target_rows = done
        report.close()

    # -- the outcome ---------------------------------------------------------------------------------

    def compare(self) -> None:
        """Count the missing, extra, different and unshippable rows from the scratch file, with a few examples of
        each."""
        report, scratch = self.report, self.scratch
        report.missing = scratch.count(MISSING)
        report.extra = scratch.count(EXTRA)
        report.different = scratch.count(DIFFERENT)
        report.unshippable += scratch.count(UNSHIPPABLE)
        report.shared, report.examples["shared"] = scratch.shared, scratch.shared_examples
        for kind, sql in (("missing", MISSING), ("extra", EXTRA)):
            report.examples[kind] = [self.show_key(k) for k, _ in scratch.rows(sql, EXAMPLES)]
        report.examples["different"] = [self.show_difference(*row) for row in scratch.rows(DIFFERENT, EXAMPLES)]
        report.examples.setdefault("unshippable", []).extend(
            f"{self.show_key(k) if not k.startswith('unshippable:') else '(key unreadable)'}: {reason}"
            for k, reason in scratch.rows(UNSHIPPABLE, EXAMPLES))

    def show_key(self, canonical_key: str) -> str:
        """A canonical key as the operator reads it, `(id, lang)=(1, "en")`, cut at 120 characters."""
        values = json.loads(canonical_key)
        text = f"({', '.join(self.target_key)})=({', '.join(json.dumps(v, ensure_ascii=False) for v in values)})"
        return text if len(text) <= 2 * VALUE_PREVIEW else text[:2 * VALUE_PREVIEW] + "..."

    def show_difference(self, canonical_key: str, okey: str, raw_key: str) -> str:
        """`(id)=(3): qty 5 (source) vs 7 (secondary)`: the rows are read again, so they may have moved on."""
        key = decode_key(okey)
        source = read_rows(self.conn, self.plan.table.name, self.plan.key, [key], safe=True).get(key)
        rows, _ = read_with_retries(self.target.read_page, self.mapping.target, self.compared, self.target_key,
                                    limit=1, equal=json.loads(raw_key))
        if source is None or not rows:
            return f"{self.show_key(canonical_key)}: changed while verifying"
        try:
            mapped = self.target.scoped_row(self.mapping.map_row(source, key))
        except RowError as exc:
            return f"{self.show_key(canonical_key)}: {exc}"
        changes = [f"{c} {preview(mapped.get(c))} (source) vs {preview(rows[0].get(c))} (secondary)"
                   for c in self.compared
                   if self.canonical[c](mapped.get(c)) != self.canonical[c](rows[0].get(c))]
        return f"{self.show_key(canonical_key)}: " + ("; ".join(changes) or "changed while verifying")

    def enqueue_differences(self, dry_run: bool) -> None:
        """Missing and different keys as the source spells them; extra keys rebuilt from the secondary's."""
        table = self.plan.table.name
        keys = itertools.chain(((table, okey) for _, okey in self.scratch.rows(MISSING_OR_DIFFERENT)),
                               self.extra_keys())
        if dry_run:
            self.report.repair = sum(1 for _ in keys)
        else:
            report = self.progress(f"repair {table}", self.report.missing + self.report.different + self.report.extra,
                                   "keys")
            self.report.repair = outbox.enqueue(self.conn, keys, report)
            report.close()

    def extra_keys(self) -> Iterator[tuple[str, str]]:
        """(table, outbox key) of every row only the secondary has, so that the daemon deletes it; a key that cannot
        be spelt as a SQLite key is reported in `unrepairable` instead."""
        for canonical_key, raw in self.scratch.rows(EXTRA):
            if self.unmodeled:
                types = ", ".join(f"{c} {self.formats[c]}" for c in self.unmodeled)
                self.report.unrepairable.append(
                    f"extra row {self.show_key(canonical_key)}: not deleted, since its key ({types}) is compared by "
                    "rules of PostgreSQL's that syncd does not model, and the delete could remove a live row whose "
                    "key PostgreSQL spells otherwise; delete it in the secondary by hand if it is really extra")
                continue
            okey = outbox_key(self.mapping, json.loads(raw), self.canonical_key)
            if okey is None:
                self.report.unrepairable.append(f"extra row {self.show_key(canonical_key)}: its key cannot be "
                                                "spelt as a SQLite key; delete it in the secondary by hand")
                continue
            yield self.plan.table.name, okey


def last_page(answered: int, asked: int, done: int, total: int | None) -> bool:
    """Whether a page of `answered` rows (`asked` were asked for; `done` rows read so far, this page included) ends
    the table, `total` being the count the secondary gave with the first page (None: it gave none). An empty page
    always ends it; a short one only when the count says every row is read: PostgREST's db-max-rows (Supabase's
    "Max rows", default 1000) answers fewer rows than asked without an error (PostgREST docs, "Configuration:
    db-max-rows"; measured on PostgREST 12.2.12: Content-Range 0-999/2500, status 200)."""
    if answered == 0:
        return True
    return answered < asked and total is not None and done >= total


def keyset_value(value: object) -> object:
    """A key value read from the secondary, as a keyset filter takes it: a Decimal (numeric keys are read exactly)
    goes as its text, which PostgreSQL parses back to the same number."""
    return str(value) if isinstance(value, Decimal) else value


def outbox_key(mapping: TableMapping, values: Sequence[object], canonical_key: Callable[[Sequence[object]], str]
               ) -> str | None:
    """The outbox key (SQLite quote() form) that the daemon maps back to these secondary key values, or
    None when there is none; checked by mapping it back and comparing canonical keys."""
    sqlite_values: list[object] = []
    for column, value in zip(mapping.key, values, strict=True):
        if mapping.transforms.get(column) == "bytea" and isinstance(value, str) and value.startswith("\\x"):
            try:
                sqlite_values.append(bytes.fromhex(value[2:]))
            except ValueError:
                return None
        elif isinstance(value, dict | list):
            sqlite_values.append(json.dumps(value, ensure_ascii=False, default=str))
        elif isinstance(value, Decimal):  # a numeric key: SQLite holds it as a REAL (checked below by mapping back)
            sqlite_values.append(float(value))
        else:
            sqlite_values.append(value)
    if None in sqlite_values:
        return None
    try:
        okey = encode_key(sqlite_values)
    except (TypeError, ValueError):
        return None
    try:
        mapped = mapping.map_key(decode_key(okey))
    except (RowError, ValueError):
        return None
    return okey if canonical_key([mapped[c] for c in mapping.target_key]) == canonical_key(values) else None


def target_formats(spec: dict[str, object], target: str) -> dict[str, str]:
    """{column: PostgreSQL type} of table `target` in PostgREST's OpenAPI description `spec`. Raises TableProblem
    when the table is not there."""
    definitions = spec.get("definitions")
    definition = definitions.get(target) if isinstance(definitions, dict) else None
    if not isinstance(definition, dict):
        raise TableProblem(f"the table {target!r} is not in the secondary (or not exposed); run the migrations, "
                           "then NOTIFY pgrst, 'reload schema'")
    return {name: str(prop.get("format", "")) for name, prop in definition.get("properties", {}).items()}


def preview(value: object) -> str:
    """`value` as JSON, cut at VALUE_PREVIEW characters (a Decimal or JsonText as its number's text)."""
    if isinstance(value, Decimal | JsonText):
        text = value.text if isinstance(value, JsonText) else str(value)
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= VALUE_PREVIEW else text[:VALUE_PREVIEW] + "..."


# -- the scratch file --------------------------------------------------------------------------------

MISSING = ("SELECT s.k, s.okey FROM source s WHERE s.h IS NOT NULL "
           "AND NOT EXISTS (SELECT 1 FROM target t WHERE t.k = s.k)")
EXTRA = "SELECT t.k, t.raw FROM target t WHERE NOT EXISTS (SELECT 1 FROM source s WHERE s.k = t.k)"
DIFFERENT = "SELECT s.k, s.okey, t.raw FROM source s JOIN target t ON t.k = s.k WHERE s.h IS NOT NULL AND s.h != t.h"
MISSING_OR_DIFFERENT = ("SELECT s.k, s.okey FROM source s LEFT JOIN target t ON t.k = s.k "
                        "WHERE s.h IS NOT NULL AND (t.k IS NULL OR s.h != t.h)")
UNSHIPPABLE = "SELECT k, okey FROM source WHERE h IS NULL"


class Scratch:
    """A private temporary SQLite file (SQLite deletes it on close) holding (key, hash) of both sides."""

    def __init__(self) -> None:
        self.db = apsw.Connection("")
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "cache_size = -16000"):
            self.db.execute(f"PRAGMA {pragma}").fetchall()  # a pragma that answers runs only once read
        self.db.execute("CREATE TABLE source (k TEXT PRIMARY KEY, h BLOB, okey TEXT NOT NULL) WITHOUT ROWID;"
                        "CREATE TABLE target (k TEXT PRIMARY KEY, h BLOB NOT NULL, raw TEXT NOT NULL) WITHOUT ROWID")
        self.shared = 0  # source rows that another source row's key of the secondary already named
        self.shared_examples: list[str] = []

    def add_source(self, entries: Sequence[tuple[str, bytes | None, str]]) -> None:
        """Store source rows: (canonical key, hash or None when unshippable, outbox key or the reason it cannot
        ship). A row whose canonical key an earlier row has (`1` and `'1'`: one key of the secondary) replaces it
        and is counted in `shared`, the two outbox keys in `shared_examples`."""
        with self.db:
            seen = dict(self.db.execute("SELECT k, okey FROM source WHERE k IN (SELECT value FROM json_each(?))",
                                        (json.dumps([key for key, _, _ in entries]),)))
            for key, _, okey in entries:
                if key in seen:
                    self.shared += 1
                    if len(self.shared_examples) < EXAMPLES:
                        self.shared_examples.append(f"{seen[key]} and {okey}")
                seen[key] = okey
            self.db.executemany("INSERT OR REPLACE INTO source VALUES (?, ?, ?)", entries)

    def add_target(self, entries: Sequence[tuple[str, bytes, str]]) -> None:
        """Store secondary rows: (canonical key, hash, key values as JSON)."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO target VALUES (?, ?, ?)", entries)

    def count(self, sql: str) -> int:
        """How many rows the query `sql` (MISSING, EXTRA, ...) gives."""
        return cast(tuple[int], self.db.execute(f"SELECT count(*) FROM ({sql})").fetchone())[0]

    def rows(self, sql: str, limit: int | None = None) -> Iterator[tuple[str, ...]]:
        """The rows of the query `sql`, at most `limit` of them."""
        yield from self.db.execute(sql + (f" LIMIT {limit}" if limit is not None else ""))

    def close(self) -> None:
        """Close the scratch file (SQLite deletes it)."""
        self.db.close()
