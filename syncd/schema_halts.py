"""Halts for the secondary's schema: a table whose shipped columns the secondary lacks (PostgREST's OpenAPI
description, or a schema error it answered) halts before one of its rows is refused, with the exact fix, and
resumes by itself once the description matches, read again every `schema_recheck_interval` seconds. A NOT NULL
column without a default that syncd does not send (PostgreSQL's 23502) halts its table the same way: PostgreSQL
checks NOT NULL on the INSERT half of an upsert, before ON CONFLICT, so every upsert would be refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence

from syncd import schema
from syncd.halts import Halt, Halts
from syncd.plan import Plan
from syncd.settings import Settings
from syncd.sqlite import quote_ident
from syncd.target import TargetError

__all__ = ["REQUIRED_RETRY", "SchemaHalts"]

REQUIRED_RETRY = 300.0  # seconds before a table halted for a NOT NULL column is tried again whatever PostgREST says
NOT_NULL_COLUMN = re.compile(r'null value in column "(.*?)"(?: of relation| violates)')  # PostgreSQL's 23502


class SchemaHalts:
    """Decides the schema halts of `halts` and when they are rechecked (`next_schema_check`, monotonic seconds)."""

    def __init__(self, plan: Plan, halts: Halts, settings: Settings) -> None:
        self.plan = plan
        self.halts = halts
        self.settings = settings
        self.next_schema_check = 0.0

    def halt_until_recheck(self, table: str, halt: Halt, error: TargetError | None = None) -> None:
        """Halt `table` and read the secondary's schema again in `schema_recheck_interval` seconds."""
        with self.halts.lock:
            self.halts.halt(table, halt, error)
            self.next_schema_check = time.monotonic() + self.settings.config.worker.schema_recheck_interval

    def describe_secondary(self) -> dict[str, object] | None:
        """PostgREST's OpenAPI description of the secondary; None when it cannot be read (it is down)."""
        try:
            return self.settings.target.describe()
        except TargetError:
            return None

    def mismatches(self, tables: Sequence[str], spec: Mapping[str, object] | None = None
                   ) -> dict[str, schema.Mismatch] | None:
        """What the secondary's schema (PostgREST's OpenAPI description, `spec` or read now) lacks for each of
        `tables` that lacks something; None when the description cannot be read (the secondary is down: the sends
        will tell)."""
        spec = spec if spec is not None else self.describe_secondary()
        if spec is None:
            return None
        found = {}
        for table in tables:
            mismatch = schema.compare(spec, self.plan.mappings[table], self.plan.shipped[table],
                                      self.settings.config.target.schema_name)
            if mismatch is not None:
                found[table] = mismatch
        return found

    def halt_mismatches(self) -> None:
        """Before the first request (and whenever the tables are planned again): halt each table whose shipped
        columns the secondary lacks, with the exact fix, so that not one of its rows is sent to be refused."""
        found = self.mismatches([t for t in self.plan.mappings if t not in self.halts.halted]) or {}
        for table, mismatch in found.items():
            denied = self.denied(table) if mismatch.missing_table else None
            self.halts.halt(table, denied or Halt("schema", mismatch.describe()))
        if found:
            self.next_schema_check = time.monotonic() + self.settings.config.worker.schema_recheck_interval

    def denied(self, table: str) -> Halt | None:
        """For a table missing from PostgREST's description: the halt for a key whose role may not use it, when a
        read of it says so (PostgREST describes only the tables the request's role may use, so a table out of a
        key's reach looks missing); None when it is missing indeed (or the read says nothing more)."""
        try:
            self.settings.target.ping(self.plan.mappings[table].target)
        except TargetError as error:
            if error.kind == "config":
                return Halt("config", error.message)
        return None

    def unfed_column(self, table: str, error: TargetError) -> str | None:
        """The column a 23502 (not-null violation) names when syncd does not send it: the secondary requires a
        column the mapping never fills, so PostgreSQL refuses every upsert (it checks NOT NULL on the INSERT half of
        INSERT ... ON CONFLICT before the conflict, an update of a row that holds a value included). None for a
        23502 on a column syncd sends (that row's NULL: a row error)."""
        if error.code != "23502":
            return None
        named = NOT_NULL_COLUMN.search(error.message)
        if named is None or named[1] in self.plan.shipped[table].names:
            return None
        return named[1]

    def required_halt(self, table: str, column: str) -> Halt:
        """The halt for the secondary's NOT NULL `column` that syncd does not send, with the fixes."""
        mapping = self.plan.mappings[table]
        target = f"{quote_ident(self.settings.config.target.schema_name)}.{quote_ident(mapping.target)}"
        excluded = [c for c, name in ((c, mapping.renames.get(c, c)) for c in mapping.exclude) if name == column]
        why = (f"[table] exclude leaves out {excluded[0]!r}" if excluded else
               f"the SQLite table {mapping.source!r} has no column that maps to it")
        return Halt("schema", (
            f"the secondary's column {column!r} of {mapping.target!r} is NOT NULL without a default, and syncd does "
            f"not send it ({why}): PostgreSQL refuses every upsert with 23502, also of rows that hold a value (NOT "
            f"NULL is checked on the INSERT half of an upsert, before ON CONFLICT); give it a default there (ALTER "
            f"TABLE {target} ALTER COLUMN {quote_ident(column)} SET DEFAULT ...; NOTIFY pgrst, 'reload schema'), or "
            f"drop its NOT NULL, or send it (a source column renamed to it, then SIGHUP)"), required=(column,))

    def schema_halt(self, table: str, error: TargetError) -> Halt:
        """The halt for a schema error the secondary answered: the exact mismatch (columns and DDL) when its
        description shows one, else what it said."""
        found = self.mismatches([table])
        if found and table in found:
            return Halt("schema", f"{found[table].describe()} [the secondary said: {error.message}]")
        return Halt("schema", error.message)

    def recheck(self) -> None:
        """While a table is halted for a schema mismatch, read the secondary's schema every
        `schema_recheck_interval` seconds and resume the tables whose columns it now has."""
        waiting = [t for t, h in self.halts.halted.items() if h.kind == "schema" and t in self.plan.mappings]
        now = time.monotonic()
        if not waiting or now < self.next_schema_check:
            return
        self.next_schema_check = now + self.settings.config.worker.schema_recheck_interval
        spec = self.describe_secondary()
        if spec is None:
            return  # the secondary is unreachable: the halt stays, the next check comes
        found = self.mismatches(waiting, spec) or {}
        matching = [t for t in waiting if t not in found and self.fillable(t, spec, now)]
        if matching:
            self.halts.unhalt(matching, "the secondary's schema matches again")

    def fillable(self, table: str, spec: Mapping[str, object], now: float) -> bool:
        """Whether the NOT NULL columns a table was halted for (if any) can be left to the secondary now: gone,
        nullable, or with a default in its description. PostgREST's description leaves out the defaults it does not
        show (a sequence's nextval, a generated column: measured on 12.2.12), so every REQUIRED_RETRY seconds the
        table is resumed anyway, and the next upsert tells."""
        halt = self.halts.halted.get(table)
        if halt is None or not halt.required:
            return True
        if now - self.halts.halted_at.get(table, now) >= REQUIRED_RETRY:
            return True
        definitions = spec.get("definitions")
        definition = definitions.get(self.plan.mappings[table].target) if isinstance(definitions, dict) else None
        if not isinstance(definition, dict):
            return True  # the table is gone there: its own mismatch says so
        properties = definition.get("properties") or {}
        required = definition.get("required") or []
        return all(column not in properties or column not in required or "default" in properties[column]
                   for column in halt.required)
