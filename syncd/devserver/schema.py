"""The schema cache: which tables, columns and functions the API exposes, read from pg_catalog.

Like PostgREST, the dev server loads it once at start and again on `NOTIFY pgrst, 'reload schema'`;
a table created in between answers 404 until then, which is exactly what a client sees right after a
migration on a real installation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from syncd.devserver.rpc import Routines
from syncd.devserver.rpc import load as load_routines
from syncd.devserver.sqltext import ident

COLUMNS_SQL = """
SELECT n.nspname, c.relname, c.relkind, obj_description(c.oid, 'pg_class'),
       a.attname, a.attnotnull, CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
       col_description(c.oid, a.attnum),
       CASE WHEN et.oid IS NOT NULL THEN
              (CASE WHEN etn.nspname = 'pg_catalog' THEN format_type(et.oid, NULL)
                    ELSE etn.nspname || '.' || et.typname END) || '[]'
            WHEN tn.nspname = 'pg_catalog' THEN format_type(t.oid, NULL)
            ELSE tn.nspname || '.' || t.typname END,
       t.typcategory, CASE WHEN a.atttypmod > 4 AND t.typcategory = 'S' THEN a.atttypmod - 4 END
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'v', 'm', 'f', 'p')
ORDER BY n.nspname, c.relname, a.attnum
"""

CONSTRAINTS_SQL = """
SELECT n.nspname, c.relname, k.contype, a.attname, rc.relname, ra.attname
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL unnest(k.conkey) WITH ORDINALITY AS u(attnum, ord)
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = u.attnum
LEFT JOIN pg_class rc ON rc.oid = k.confrelid
LEFT JOIN pg_attribute ra ON ra.attrelid = k.confrelid AND ra.attnum = k.confkey[u.ord]
WHERE n.nspname = ANY(%s) AND k.contype IN ('p', 'f')
ORDER BY n.nspname, c.relname, k.conname, u.ord
"""


@dataclass
class Column:
    """One column as the schema cache knows it."""

    name: str
    type: str  # PostgREST's "format": the type name without modifiers, schema-qualified outside pg_catalog
    category: str  # pg_type.typcategory: N numeric, B boolean, S string, A array, U user-defined...
    nullable: bool
    default: str | None
    description: str | None
    max_length: int | None = None
    primary_key: bool = False
    references: tuple[str, str] | None = None  # (table, column) of a single-column foreign key


@dataclass
class Table:
    """One relation of an exposed schema: `kind` is its pg_class.relkind (r table, v view, m materialized view,
    f foreign table, p partitioned table)."""

    schema: str
    name: str
    kind: str
    description: str | None
    columns: dict[str, Column] = field(default_factory=dict)

    @property
    def primary_key(self) -> list[str]:
        """The primary key columns, in the table's column order."""
        return [c.name for c in self.columns.values() if c.primary_key]

    @property
    def qualified(self) -> str:
        """`"schema"."name"`, quoted for SQL sent through psycopg."""
        return f"{ident(self.schema)}.{ident(self.name)}"


@dataclass
class SchemaCache:
    """The tables of the exposed schemas by (schema, name), as loaded at start or at the last reload."""

    schemas: list[str]
    tables: dict[tuple[str, str], Table] = field(default_factory=dict)
    routines: Routines = field(default_factory=dict)  # the callable functions, overloads together (rpc.py)

    def table(self, schema: str, name: str) -> Table | None:
        """Table `name` of `schema`, or None when the cache does not have it."""
        return self.tables.get((schema, name))

    def in_schema(self, schema: str) -> list[Table]:
        """The tables of `schema`, by name."""
        return sorted((t for (s, _), t in self.tables.items() if s == schema), key=lambda t: t.name)


async def load(conn: psycopg.AsyncConnection, schemas: list[str]) -> SchemaCache:
    """Read every table, view and column of the exposed schemas, with keys and foreign keys, and their functions, from
    one snapshot (a REPEATABLE READ transaction: DDL committed between the queries must not make them disagree)."""
    cache = SchemaCache(schemas)
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        rows = await (await conn.execute(COLUMNS_SQL, [schemas])).fetchall()
        constraints = await (await conn.execute(CONSTRAINTS_SQL, [schemas])).fetchall()
        cache.routines = await load_routines(conn, schemas)
    for schema, name, kind, table_doc, col, notnull, default, col_doc, typ, category, max_len in rows:
        table = cache.tables.setdefault((schema, name), Table(schema, name, kind, table_doc))
        table.columns[col] = Column(col, typ, category, not notnull, default, col_doc, max_len)
    for schema, name, contype, col, ref_table, ref_col in constraints:
        column = cache.tables[(schema, name)].columns[col]
        if contype == "p":
            column.primary_key = True
        elif ref_table is not None:
            column.references = (ref_table, ref_col)
    return cache
