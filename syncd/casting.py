"""The casting table: the PostgreSQL type a SQLite column becomes, and the transform its values need on the way.

One table, used wherever syncd names a type for the secondary (`syncd init`'s DDL, the `ALTER TABLE ... ADD
COLUMN` a schema halt suggests). pgloader's SQLite rules are the anchor (its `*sqlite-default-cast-rules*`:
INTEGER -> bigint, BLOB -> bytea, DATETIME -> timestamptz, character types -> text without their length);
a declared type that names none of them gets SQLite's own affinity rules (https://sqlite.org/datatype3.html,
section 3.1), because the affinity decides what SQLite really stores in the column.

Every type is chosen so that the JSON syncd sends (syncd/mapping.py) lands for every value SQLite stores under
that declaration, as it is. A declaration does not bind a SQLite value: an INTEGER column can hold 'abc'
(text that does not look like a number stays text). Such a value is sent as a JSON string and PostgreSQL
refuses it (22P02, invalid input syntax): a row error, dead-lettered with PostgreSQL's message, never a wrong
value. Two choices differ from pgloader for that reason:

- NUMERIC/DECIMAL lose their precision and scale: `DECIMAL(10,2)` -> `numeric`. PostgreSQL rounds a value
  with more decimals to the declared scale without an error (measured: `'1.005'::numeric(10,2)` is 1.01;
  PostgreSQL docs 8.1.2); SQLite enforces neither, so a typmod would change values silently, and verify would
  report a difference no repair clears. Add the typmod by hand where every value fits.
- Integer types of every width become `bigint` (SQLite stores any 64-bit integer in a SMALLINT column), and
  64-bit unsigned ones (`UNSIGNED BIG INT`, `BIGINT UNSIGNED`) `numeric`: SQLite stores a value beyond
  2**63-1 as a REAL, which bigint refuses and numeric takes exactly as sent.

Declarations that name a type PostgreSQL would rewrite become `text`: `UUID` (PostgreSQL prints every uuid in
lower case with hyphens, so `'{A0EE...}'` or hex without hyphens would differ from SQLite forever) and `TIME`
(`'10:30'` comes back as `'10:30:00'`). A declaration of no known name with NUMERIC affinity (`STRING`, `ANY`
outside a STRICT table, `MONEY`) is `text` too: such a column keeps text that is not a number as text, and
a JSON number sent to a text column is stored as its JSON text (measured on PostgreSQL 16).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["CASTS", "affinity", "column_type", "json_checked_columns", "pg_type", "transform_for"]

# (SQLite declaration, PostgreSQL type, transform, why): the documented table, in README's order.
CASTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("INTEGER, INT, BIGINT, SMALLINT, TINYINT, INT8, ... (INTEGER affinity)", "bigint", None,
     "SQLite stores any 64-bit integer whatever width the name says"),
    ("UNSIGNED BIG INT, BIGINT UNSIGNED", "numeric", None,
     "values beyond 2**63-1 are REALs in SQLite; bigint refuses them"),
    ("REAL, DOUBLE, DOUBLE PRECISION, FLOAT (REAL affinity)", "double precision", None,
     "SQLite's REAL is an 8-byte float"),
    ("NUMERIC, DECIMAL(p,s)", "numeric", None,
     "without (p,s): PostgreSQL would round extra decimals silently"),
    ("TEXT, VARCHAR(n), CHAR(n), CLOB, NVARCHAR(n) (TEXT affinity)", "text", None,
     "SQLite enforces no length"),
    ("BLOB", "bytea", "bytea", "sent as hex '\\x...'"),
    ("BOOLEAN, BOOL", "boolean", "bool", "0/1 and 'true'/'false' text"),
    ("DATE", "date", None, "ISO text as stored"),
    ("DATETIME, TIMESTAMP, TIMESTAMPTZ", "timestamptz", "timestamp", "ISO text or unix seconds, as UTC"),
    ("JSON, JSONB, or any type with CHECK (json_valid(col))", "jsonb", "json", "numbers keep every digit"),
    ("UUID, TIME", "text", None, "PostgreSQL would rewrite the text (case, hyphens, seconds)"),
    ("(no type)", "text", None, "pgloader's rule; the column keeps each value's own kind"),
    ("anything else (NUMERIC affinity: STRING, MONEY, ANY...)", "text", None,
     "such a column keeps non-numeric text as text"),
)

# Declarations of NUMERIC affinity that name a PostgreSQL type (matched on the name without its typmod).
NAMED: dict[str, tuple[str, str | None]] = {
    "NUMERIC": ("numeric", None), "DECIMAL": ("numeric", None),
    "BOOLEAN": ("boolean", "bool"), "BOOL": ("boolean", "bool"),
    "DATE": ("date", None),
    "DATETIME": ("timestamptz", "timestamp"), "TIMESTAMP": ("timestamptz", "timestamp"),
    "TIMESTAMPTZ": ("timestamptz", "timestamp"), "TIMESTAMP WITH TIME ZONE": ("timestamptz", "timestamp"),
    "TIMESTAMP WITHOUT TIME ZONE": ("timestamptz", "timestamp"),
    "JSON": ("jsonb", "json"), "JSONB": ("jsonb", "json"),
}
BY_AFFINITY: dict[str, tuple[str, str | None]] = {
    "INTEGER": ("bigint", None), "TEXT": ("text", None), "BLOB": ("bytea", "bytea"),
    "REAL": ("double precision", None), "NUMERIC": ("text", None), "": ("text", None),
}
JSON_CAST = ("jsonb", "json")
# The type each transform's output lands in, as `init` writes it (vector: pgvector's, its size unknown here).
TRANSFORM_TYPES = {"bool": "boolean", "timestamp": "timestamptz", "json": "jsonb", "bytea": "bytea",
                   "vector": "vector"}
TYPMOD = re.compile(r"\(.*?\)")


def affinity(declared: str) -> str:
    """SQLite's column affinity of a declared type, by the five rules of https://sqlite.org/datatype3.html 3.1, in
    their order: 'INTEGER' (contains INT), 'TEXT' (CHAR, CLOB or TEXT), 'BLOB' (contains BLOB), 'REAL' (REAL, FLOA
    or DOUB), else 'NUMERIC'; '' for no declared type (affinity BLOB, but values are kept as given). So `POINT`
    is INTEGER and `STRING` NUMERIC, as SQLite says."""
    upper = declared.upper()
    if not upper.strip():
        return ""
    if "INT" in upper:
        return "INTEGER"
    if any(word in upper for word in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if "BLOB" in upper:
        return "BLOB"
    if any(word in upper for word in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def _cast(declared: str, json_checked: bool) -> tuple[str, str | None]:
    if json_checked:
        return JSON_CAST
    name = " ".join(TYPMOD.sub(" ", declared).upper().split())
    kind = affinity(declared)
    if kind == "INTEGER" and "UNSIGNED" in name.split() and ("BIG" in name or "INT8" in name):
        return ("numeric", None)
    return NAMED.get(name) or BY_AFFINITY[kind]


def pg_type(declared: str, json_checked: bool = False) -> str:
    """The PostgreSQL type of a column declared `declared` in SQLite (its text from PRAGMA table_info, '' for none):
    'INTEGER' -> 'bigint', 'VARCHAR(255)' -> 'text', 'DECIMAL(10,2)' -> 'numeric', 'DATETIME' -> 'timestamptz',
    'UUID' -> 'text' (see the module docstring and CASTS for why). `json_checked`: the table declares CHECK
    (json_valid(col)) on it (`json_checked_columns`), which makes any type 'jsonb'. Never raises."""
    return _cast(declared, json_checked)[0]


def transform_for(declared: str, json_checked: bool = False) -> str | None:
    """The transform (syncd/mapping.py CONVERTERS) that turns the values SQLite stores under `declared` into what
    the column of `pg_type(declared)` takes: 'bool' for BOOLEAN, 'timestamp' for DATETIME/TIMESTAMP, 'json' for
    JSON/JSONB or when `json_checked`, 'bytea' for BLOB affinity; None when the value goes as it is. Never raises."""
    return _cast(declared, json_checked)[1]


def column_type(declared: str, transform: str | None) -> str:
    """The PostgreSQL type for a column syncd ships with `transform` (None: as it is): the transform's, else
    `pg_type(declared)` (the halt of a table whose column the secondary lacks gives it in its ALTER TABLE)."""
    return TRANSFORM_TYPES.get(transform or "") or pg_type(declared)


def json_checked_columns(create_sql: str, columns: Iterable[str]) -> set[str]:
    """Those of `columns` that a CHECK constraint of the table's CREATE TABLE statement `create_sql` tests with
    `json_valid(col)` (as a column constraint or a table constraint, the name bare, "quoted", [bracketed] or
    `backticked`, in any letter case, as SQLite resolves it): `CHECK (json_valid(doc))` or `CHECK (doc IS NULL OR
    json_valid(doc))` marks `doc`. A json_valid outside a CHECK (a DEFAULT, a generated column) does not count."""
    checks = " ".join(_check_bodies(create_sql))
    found = set()
    for column in columns:
        spelled = "|".join(re.escape(form) for form in (column, f'"{column.replace(chr(34), chr(34) * 2)}"',
                                                         f"[{column}]", f"`{column}`"))
        if re.search(rf"json_valid\s*\(\s*(?:{spelled})\s*[,)]", checks, re.IGNORECASE):
            found.add(column)
    return found


def _check_bodies(sql: str) -> list[str]:
    """The text inside each CHECK ( ... ) of `sql`, parentheses balanced, the content of string literals left out
    (a CHECK comparing with the text 'json_valid(x)' tests no column)."""
    bodies = []
    for match in re.finditer(r"\bCHECK\s*\(", sql, re.IGNORECASE):
        body: list[str] = []
        depth, quote = 1, ""
        for char in sql[match.end():]:
            if quote:
                quote = "" if char == quote else quote
            elif char in "'\"`[":
                quote = "]" if char == "[" else char
            elif char == "(":
                depth += 1
            elif char == ")":
                depth -= 1
                if depth == 0:
                    bodies.append("".join(body))
                    break
            if quote != "'" and not (char == "'" and not quote):
                body.append(char)
    return bodies
