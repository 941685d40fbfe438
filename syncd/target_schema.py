"""The secondary's tables as they already are, for `syncd init --target` / `--pg-url` (issue 24): each table's
columns with their PostgreSQL type, NOT NULL, whether a default fills them, its primary key and its foreign keys.

Two readers give the same `TargetTable`s:
- `from_openapi`: PostgREST's OpenAPI description (`GET /` on the API root, Swagger 2.0, what `syncd run` reads
  too). `definitions.<table>.properties.<column>.format` is the PostgreSQL type (`format_type`: `character
  varying`, `timestamp with time zone`, the real PostgREST 12 writes an extension's type qualified with its
  modifier, `public.vector(384)`); `required` lists the NOT NULL columns; a primary-key column's description holds
  `<pk/>` and a foreign key's `<fk table='t' column='c'/>`. PostgREST describes only the tables the key's role may
  use (openapi-mode follow-privileges), and shows a default only where it can write it as JSON: never for a
  sequence (serial, identity), json/jsonb or array columns, nor for a number or boolean whose default is not a
  JSON literal (measured on 12.2.12, as syncd/devserver/openapi.py `default_of` says). So a NOT NULL column
  without a shown default is certainly unfilled only when PostgREST types it `string` (`default_known`).
- `from_catalog`: PostgreSQL's catalog through psycopg (pg_attribute, pg_attrdef, pg_constraint), every table of
  the schema whatever its grants, every default and identity known.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from syncd.redact import error_line, mask_url, register_connection

if TYPE_CHECKING:
    from syncd.target import PostgrestTarget

__all__ = ["TargetColumn", "TargetSchemaError", "TargetTable", "base_type", "from_catalog", "from_openapi",
           "read_catalog", "read_openapi"]

FOREIGN_KEY_NOTE = re.compile(r"<fk table='([^']*)' column='([^']*)'/>")
MODIFIER = re.compile(r"\(.*\)")

CATALOG_SQL = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       d.adbin IS NOT NULL OR a.attidentity <> '' OR a.attgenerated <> '', a.attgenerated <> '',
       coalesce(a.attnum = ANY (p.conkey), false)
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_constraint p ON p.conrelid = c.oid AND p.contype = 'p'
WHERE n.nspname = %s AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""
FOREIGN_KEYS_SQL = """
SELECT c.relname, a.attname, r.relname
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_class r ON r.oid = k.confrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
WHERE k.contype = 'f' AND n.nspname = %s
"""


class TargetSchemaError(Exception):
    """The secondary's schema cannot be read (unreachable, refused, not PostgREST, psycopg missing); the message
    starts with the flag and masks every password."""


@dataclass(frozen=True)
class TargetColumn:
    """One column of a secondary's table. `type`: the PostgreSQL type as `format_type` spells it; `fed`: an insert
    that leaves it out is accepted (it is nullable, or a default, sequence, identity or generation fills it; None:
    the description cannot tell); `generated`: a generated column, which refuses any value sent."""

    name: str
    type: str
    not_null: bool
    fed: bool | None
    primary_key: bool = False
    generated: bool = False
    references: str | None = None  # the table a foreign key of this column points to

    @property
    def base(self) -> str:
        """The type without schema or modifiers: 'vector', 'character varying', 'integer[]'."""
        return base_type(self.type)


@dataclass
class TargetTable:
    """One table of the secondary: its columns in their order and its primary key (empty: none)."""

    name: str
    columns: list[TargetColumn] = field(default_factory=list)

    @property
    def key(self) -> list[str]:
        return [c.name for c in self.columns if c.primary_key]

    def column(self, name: str) -> TargetColumn | None:
        return next((c for c in self.columns if c.name == name), None)


def base_type(format_text: str) -> str:
    """'public.vector(384)' -> 'vector', 'character varying(20)' -> 'character varying', 'numeric(10,2)[]' ->
    'numeric[]', 'timestamp(3) with time zone' -> 'timestamp with time zone': what decides a transform."""
    array = "[]" if format_text.endswith("[]") else ""
    text = " ".join(MODIFIER.sub(" ", format_text.removesuffix("[]")).split())
    if "." in text and not text.startswith('"'):
        text = text.rsplit(".", 1)[1]
    return text.strip('"') + array


# ---- PostgREST's OpenAPI ---------------------------------------------------------------------------------


def from_openapi(spec: Mapping[str, object]) -> dict[str, TargetTable]:
    """The tables of an OpenAPI (Swagger 2.0) document as PostgREST v12 writes it (see the module docstring);
    a definition without properties is left out."""
    definitions = spec.get("definitions")
    tables: dict[str, TargetTable] = {}
    for name, definition in (definitions.items() if isinstance(definitions, dict) else ()):
        if not isinstance(definition, dict) or not isinstance(definition.get("properties"), dict):
            continue
        required = set(definition.get("required") or ())
        table = TargetTable(str(name))
        for column, prop in definition["properties"].items():
            prop = prop if isinstance(prop, dict) else {}
            description = str(prop.get("description") or "")
            reference = FOREIGN_KEY_NOTE.search(description)
            not_null = column in required
            fed: bool | None = True if "default" in prop else (False if default_known(prop) else None)
            table.columns.append(TargetColumn(str(column), str(prop.get("format") or ""), not_null,
                                              fed if not_null else True, "<pk/>" in description,
                                              references=reference[1] if reference else None))
        tables[table.name] = table
    return tables


def default_known(prop: Mapping[str, object]) -> bool:
    """Whether PostgREST would show this column's default if it had one: for Swagger type `string` it shows the
    literal or the expression (now()); it hides sequences' nextval (integer columns), defaults it cannot write as
    a JSON number or boolean, and every json/jsonb/array one."""
    return prop.get("type") == "string"


def read_openapi(target: PostgrestTarget) -> dict[str, TargetTable]:
    """The tables PostgREST describes to `target`'s key (GET / with Accept: application/openapi+json, the schema in
    Accept-Profile). Raises syncd.target.TargetError as every request does (unreachable, 401, not PostgREST)."""
    return from_openapi(target.describe())


# ---- PostgreSQL's catalog --------------------------------------------------------------------------------


def from_catalog(rows: list[tuple[str, str, str, bool, bool, bool, bool]],
                 foreign_keys: list[tuple[str, str, str]]) -> dict[str, TargetTable]:
    """The tables of CATALOG_SQL's rows (table, column, type, NOT NULL, filled, generated, in the primary key)
    and FOREIGN_KEYS_SQL's (table, column, parent)."""
    parents = {(table, column): parent for table, column, parent in foreign_keys}
    tables: dict[str, TargetTable] = {}
    for name, column, kind, not_null, fed, generated, primary in rows:
        table = tables.setdefault(name, TargetTable(name))
        table.columns.append(TargetColumn(column, kind, not_null, fed or not not_null, primary, generated,
                                          parents.get((name, column))))
    return tables


def read_catalog(pg_url: str, schema: str) -> dict[str, TargetTable]:
    """Every table of `schema` in the PostgreSQL at `pg_url` (read in one read-only transaction). Raises
    TargetSchemaError naming --pg-url, its password masked, when psycopg is missing or the database refuses."""
    try:
        import psycopg
    except ImportError:
        raise TargetSchemaError("--pg-url needs psycopg: pip install 'syncd[postgres]', or give --target URL (the "
                                "PostgREST API) instead") from None
    register_connection(pg_url)
    try:
        with psycopg.connect(pg_url, connect_timeout=10) as conn:
            conn.read_only = True
            rows = conn.execute(CATALOG_SQL, (schema,)).fetchall()
            foreign_keys = conn.execute(FOREIGN_KEYS_SQL, (schema,)).fetchall()
    except psycopg.Error as exc:
        reason = error_line(exc, 300)
        raise TargetSchemaError(f"--pg-url {mask_url(pg_url)}: cannot read the schema {schema!r}: {reason}") from None
    return from_catalog(rows, foreign_keys)
