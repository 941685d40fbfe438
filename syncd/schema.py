"""The secondary's schema against what syncd ships: for each table, the columns its mapping sends (SQLite's
columns as the table is now, renamed, exclusions left out) compared with the table's columns in PostgREST's
OpenAPI description (`GET /`, Swagger 2.0: `definitions.<table>.properties`). A mismatch is the table's
problem, not its rows': the table halts until the secondary matches again (DESIGN.md, "Failure model").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import apsw

from syncd import casting
from syncd.mapping import TableMapping
from syncd.sqlite import quote_ident

__all__ = ["Mismatch", "Shipped", "compare", "shipped_columns"]



@dataclass
class Mismatch:
    """What the secondary lacks for one table: the table itself, or these columns (as named in the target);
    `types`: the PostgreSQL type of each missing column, from SQLite's declared type and the casting table that
    `syncd init` uses (syncd.casting)."""

    table: str
    target: str
    missing_table: bool = False
    missing_columns: list[str] = field(default_factory=list)
    types: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # target column -> SQLite column
    schema: str = "public"  # the secondary's schema the table lives in
    transforms: dict[str, str] = field(default_factory=dict)  # SQLite column -> the transform its type wants

    def describe(self) -> str:
        """The operator message: what is missing and the exact fix."""
        if self.missing_table:
            return (f"the table {self.target!r} does not exist in the secondary (or is not exposed); create it (run "
                    "the migrations, or the SQL of syncd init), then NOTIFY pgrst, 'reload schema'")
        columns = ", ".join(map(repr, self.missing_columns))
        excluded = ", ".join(f'"{self.sources.get(c, c)}"' for c in self.missing_columns)
        transforms = "".join(f"; and set [table.columns.{name}] transform = \"{transform}\" in the config (then "
                             "SIGHUP), or it ships as text" for name, transform in self.transforms.items())
        return (f"column(s) {columns} of {self.table!r} do not exist in {self.target!r} of the secondary; add them "
                f"there ({self.ddl()}; NOTIFY pgrst, 'reload schema'{transforms}), or leave them out "
                f"(exclude = [{excluded}] in its [[table]] section, then SIGHUP)")

    def ddl(self) -> str:
        """`ALTER TABLE "t" ADD COLUMN "c" text, ADD COLUMN ...` for the missing columns."""
        adds = ", ".join(f"ADD COLUMN {quote_ident(c)} {self.types.get(c, 'text')}" for c in self.missing_columns)
        return f"ALTER TABLE {quote_ident(self.schema)}.{quote_ident(self.target)} {adds}"


@dataclass
class Shipped:
    """The columns syncd sends for a table as its SQLite schema is now: target names in order, and for each its
    SQLite column and declared type."""

    names: list[str]
    sources: dict[str, str]
    declared: dict[str, str]


def shipped_columns(conn: apsw.Connection, mapping: TableMapping) -> Shipped:
    """The target columns syncd sends for `mapping`'s table as its SQLite schema is now."""
    shipped = Shipped([], {}, {})
    for row in conn.execute(f"PRAGMA table_info({quote_ident(mapping.source)})"):
        column, declared = row[1], row[2] or ""
        if column in mapping.exclude:
            continue
        name = mapping.renames.get(column, column)
        shipped.names.append(name)
        shipped.sources[name] = column
        shipped.declared[name] = declared
    return shipped


def compare(spec: Mapping[str, object], mapping: TableMapping, shipped: Shipped,
            schema: str = "public") -> Mismatch | None:
    """The mismatch between the columns syncd ships (`shipped`) and the OpenAPI description `spec` of the secondary;
    None when the secondary has the table and every column."""
    definitions = spec.get("definitions")
    definition = definitions.get(mapping.target) if isinstance(definitions, dict) else None
    if not isinstance(definition, dict):
        return Mismatch(mapping.source, mapping.target, missing_table=True, schema=schema)
    properties = definition.get("properties")
    known = set(properties) if isinstance(properties, dict) else set()
    missing = [column for column in shipped.names if column not in known]
    if not missing:
        return None
    types = {c: casting.column_type(shipped.declared[c], mapping.transforms.get(shipped.sources[c])) for c in missing}
    transforms = {source: wanted for c in missing if not mapping.transforms.get(source := shipped.sources[c])
                  and (wanted := casting.transform_for(shipped.declared[c]))}
    return Mismatch(mapping.source, mapping.target, missing_columns=missing, types=types,
                    sources={c: shipped.sources[c] for c in missing}, schema=schema, transforms=transforms)
