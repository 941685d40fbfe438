"""The secondary's schema against what syncd ships: for each table, the columns its mapping sends (SQLite's
columns as the table is now, renamed, exclusions left out) compared with the table's columns in PostgREST's
OpenAPI description (`GET /`, Swagger 2.0: `definitions.<table>.properties`). A mismatch is the table's
problem, not its rows': the table halts until the secondary matches again (DESIGN.md, "Failure model").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import apsw

from syncd.mapping import TableMapping
from syncd.sqlite import quote_ident

__all__ = ["Mismatch", "compare", "shipped_columns"]


@dataclass
class Mismatch:
    """What the secondary lacks for one table: the table itself, or these columns (as named in the target)."""

    table: str
    target: str
    missing_table: bool = False
    missing_columns: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """The operator message: what is missing and the fix."""
        if self.missing_table:
            return (f"the table {self.target!r} does not exist in the secondary (or is not exposed); create it (run "
                    "the migrations), then NOTIFY pgrst, 'reload schema'; shipping resumes by itself")
        columns = ", ".join(map(repr, self.missing_columns))
        return (f"column(s) {columns} of {self.table!r} do not exist in {self.target!r} of the secondary; add them "
                f"there (ALTER TABLE {quote_ident(self.target)} ADD COLUMN ...), then NOTIFY pgrst, 'reload schema', "
                f"or leave them out (exclude = [...] in its [[table]] section); shipping resumes by itself")


def shipped_columns(conn: apsw.Connection, mapping: TableMapping) -> list[str]:
    """The target column names syncd sends for `mapping`'s table as its SQLite schema is now."""
    columns = [row[1] for row in conn.execute(f"PRAGMA table_info({quote_ident(mapping.source)})")]
    return [mapping.renames.get(column, column) for column in columns if column not in mapping.exclude]


def compare(spec: Mapping[str, object], mapping: TableMapping, shipped: list[str]) -> Mismatch | None:
    """The mismatch between the columns syncd ships (`shipped`, target names) and the OpenAPI description `spec`
    of the secondary; None when the secondary has the table and every column."""
    definitions = spec.get("definitions")
    definition = definitions.get(mapping.target) if isinstance(definitions, dict) else None
    if not isinstance(definition, dict):
        return Mismatch(mapping.source, mapping.target, missing_table=True)
    properties = definition.get("properties")
    known = set(properties) if isinstance(properties, dict) else set()
    missing = [column for column in shipped if column not in known]
    return Mismatch(mapping.source, mapping.target, missing_columns=missing) if missing else None
