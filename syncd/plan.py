"""The tables as planned for shipping: each table's mapping, the columns it ships, and how the tables relate by
foreign keys (the order parents ship in, and who waits for whom). Planned at start and again after every schema
change (`CaptureKeeper.prepare`); read by the claim, the shipping threads and the halts, never changed by them.

The relations are SQLite's declared foreign keys (`PRAGMA foreign_key_list`,
https://sqlite.org/pragma.html#pragma_foreign_key_list) plus each table's `after` list of the configuration.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass, field

import apsw

from syncd import outbox, schema
from syncd.config import Config
from syncd.logs import get_logger
from syncd.mapping import TableMapping
from syncd.sqlite import quote_ident

__all__ = ["Plan", "closure", "lineage", "plan_columns", "relatives", "ship_order"]


@dataclass
class Plan:
    """What each table ships and in which order. `mappings` holds only the tables that can ship (a table whose key
    changed is left out, and halted); the graphs hold the tables of `mappings`."""

    mappings: dict[str, TableMapping] = field(default_factory=dict)
    shipped: dict[str, schema.Shipped] = field(default_factory=dict)  # table -> the columns it ships
    order: list[str] = field(default_factory=list)  # parents before children
    relatives: dict[str, set[str]] = field(default_factory=dict)  # table -> its foreign-key ancestors and descendants
    ancestors: dict[str, set[str]] = field(default_factory=dict)  # table -> its parents, theirs, and so on
    descendants: dict[str, set[str]] = field(default_factory=dict)  # table -> its children, theirs, and so on
    schema_version: int | None = None  # the file's schema cookie when it was planned (claims check it)

    def relate(self, conn: apsw.Connection, config: Config) -> None:
        """Relate the tables of `mappings` as the file's schema does now (each graph replaced at once: the shipping
        threads read them meanwhile)."""
        tables = list(self.mappings)
        self.order = ship_order(conn, config, tables)
        self.relatives = relatives(conn, config, tables)
        self.ancestors, self.descendants = lineage(conn, config, tables)


def plan_columns(conn: apsw.Connection, mappings: dict[str, TableMapping]) -> dict[str, schema.Shipped]:
    """The columns each table ships as its schema is now. A table that gained columns since it was last planned
    (an ALTER TABLE ADD COLUMN) is marked for a reconcile: SQLite gives the rows already there the column's
    DEFAULT, which the secondary, adding the column on its side, may not hold. What was planned is kept in the
    table's state, so that a column added while syncd was stopped, killed or standing by counts too."""
    shipped = {t: schema.shipped_columns(conn, m) for t, m in mappings.items()}
    updates: dict[str, dict[str, object]] = {}
    for table, columns in shipped.items():
        before = outbox.table_state(conn, table).get("columns")
        if before == columns.names:
            continue
        updates[table] = {"columns": columns.names}
        added = [c for c in columns.names if c not in before] if isinstance(before, list) else []
        if added:
            updates[table]["reconcile"] = (
                f"column(s) {', '.join(map(repr, added))} added: the rows already there took their default in "
                "SQLite, which the secondary may not hold")
    outbox.record_table_states(conn, updates)
    return shipped


def ship_order(conn: apsw.Connection, config: Config, tables: list[str]) -> list[str]:
    """Parents before children: SQLite's declared foreign keys plus each table's `after` list."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for table in tables:
        sorter.add(table, *sorted(declared_parents(conn, config, tables, table)))
    try:
        return list(sorter.static_order())
    except graphlib.CycleError:
        get_logger().warning("foreign keys form a cycle: shipping in configuration order", tables=tables)
        return tables


def lineage(conn: apsw.Connection, config: Config, tables: list[str]
            ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({table: its ancestors}, {table: its descendants}) by SQLite's declared foreign keys and each table's `after`
    list, followed through every generation."""
    parents = {table: declared_parents(conn, config, tables, table) for table in tables}
    children: dict[str, set[str]] = {table: set() for table in tables}
    for table, its_parents in parents.items():
        for parent in its_parents:
            children[parent].add(table)
    return closure(parents), closure(children)


def relatives(conn: apsw.Connection, config: Config, tables: list[str]) -> dict[str, set[str]]:
    """{table: every table it is a parent or child of, directly or not} by SQLite's declared foreign keys and each
    table's `after` list: batches holding related tables are not in flight together."""
    edges: dict[str, set[str]] = {t: set() for t in tables}
    for table in tables:
        for parent in declared_parents(conn, config, tables, table):
            edges[table].add(parent)
            edges[parent].add(table)
    return closure(edges)


def declared_parents(conn: apsw.Connection, config: Config, tables: list[str], table: str) -> set[str]:
    """The tables among `tables` that `table` references by a foreign key SQLite declares, or names in `after`."""
    known = {t.lower(): t for t in tables}
    parents = {known[r[2].lower()] for r in conn.execute(f"PRAGMA foreign_key_list({quote_ident(table)})")
               if r[2].lower() in known and known[r[2].lower()] != table}
    table_config = config.table(table)
    return parents | {known[a.lower()] for a in (table_config.after if table_config else []) if a.lower() in known}


def closure(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """{node: every node reachable from it along `edges`, itself left out}."""
    reached: dict[str, set[str]] = {}
    for start in edges:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for other in edges.get(todo.pop(), ()):
                if other not in seen and other != start:
                    seen.add(other)
                    todo.append(other)
        reached[start] = seen
    return reached
