"""The halts: which tables do not ship, why, since when, and what waits with them (DESIGN.md, "Halts"). A halted
table's changes stay in the outbox (capture goes on, nothing is lost) and ship once it resumes; how it resumes
depends on the kind of its halt (HALT_HINTS). The changes that depend on a halted table by a foreign key wait with
it. What is in force is recorded in the app's file for `syncd status`, writing only what changed.

Shipping threads halt tables too (a 401 or a schema error answered to a request): every change of this state
holds `lock`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import apsw

from syncd import outbox
from syncd.observer import Observer, describe_waits
from syncd.plan import Plan
from syncd.target import TargetError

__all__ = ["HALT_HINTS", "Halt", "Halts"]


@dataclass(frozen=True)
class Halt:
    """Why a table does not ship: `kind` decides how it resumes (HALT_HINTS), `reason` says what is wrong."""

    kind: str  # config | auth | schema | capture | replaced
    reason: str
    # A schema halt for the secondary's NOT NULL columns without a default that syncd does not send (23502 named
    # them): it resumes once the secondary's description shows them fillable, or at the next periodic try.
    required: tuple[str, ...] = ()

    @property
    def hint(self) -> str:
        """How the table resumes."""
        return HALT_HINTS[self.kind]

    def describe(self) -> str:
        """The reason and how it resumes, as `status` and /readyz show it."""
        return f"{self.reason} ({self.hint})"


HALT_HINTS = {
    "config": "fix the key or the policy, then send SIGHUP to syncd run (or restart it)",
    "auth": "put a valid key in place (service_key_file, or the JWT secret), then send SIGHUP to syncd run",
    "schema": "resumes by itself as soon as the secondary's schema matches (read again every few seconds)",
    "capture": "fix the mapping or the table (syncd status says how), run syncd install, then send SIGHUP",
    "replaced": "check the restored file, then send SIGHUP to syncd run: every table is reconciled and ships again",
}


class Halts:
    """The tables halted (`halted`: table -> Halt, `halted_at`: since when, monotonic seconds) and the changes
    waiting for them (`waits`: table -> op -> the halted table). `resumed` is called whenever changes held back
    may ship again (the claims must start from the first seq again)."""

    def __init__(self, plan: Plan, observer: Observer, resumed: Callable[[], None]) -> None:
        self.plan = plan
        self.observer = observer
        self.resumed = resumed
        self.halted: dict[str, Halt] = {}
        self.halted_at: dict[str, float] = {}
        self.waits: dict[str, dict[str, str]] = {}
        self.recorded: dict[str, str] | None = None  # the halts as recorded in the file (None: not read yet)
        self.recorded_waits: dict[str, str] | None = None  # likewise, the changes waiting for a halted table
        self.reconciling: frozenset[str] = frozenset()  # tables whose reconcile is waiting or running
        self.reconcile_waits: dict[str, set[str]] = {}  # table -> the ops that wait for those reconciles
        self.lock = threading.RLock()

    def halt(self, table: str, halt: Halt, error: TargetError | None = None) -> None:
        """Stop shipping one table: capture goes on, nothing is lost; `halt.kind` decides how it resumes. What waits
        on it in the tables related by foreign keys waits with it (`hold_dependents`)."""
        with self.lock:
            if self.halted.get(table) == halt:
                return
            self.halted[table] = halt
            self.halted_at[table] = time.monotonic()
            self.observer.table_halted(table, halt.describe(), halt.hint, error)
            self.hold_dependents()

    def kind(self, table: str) -> str | None:
        """The kind of the table's halt; None when it ships."""
        halt = self.halted.get(table)
        return halt.kind if halt is not None else None

    def hold_dependents(self) -> None:
        """The changes that wait on a halted table wait with it and resume with it: the deletes of its foreign-key
        ancestors (a parent's delete needs its children's deletes to land first) and the upserts of its descendants
        (a child's upsert needs its parent's), as SQLite's foreign keys and `after` relate them; shipped now, they
        would be refused (23503) and, after `fk_retries`, dead-lettered though nothing is wrong with them. A held
        change stays in the outbox, unclaimed, until the halt ends (then the claims start over)."""
        with self.lock:
            waits: dict[str, dict[str, str]] = {}
            for blocker in sorted(self.halted):
                for op, tables in (("delete", self.plan.ancestors.get(blocker, ())),
                                   ("upsert", self.plan.descendants.get(blocker, ()))):
                    for table in sorted(tables):
                        if table not in self.halted and table in self.plan.mappings:
                            waits.setdefault(table, {}).setdefault(op, blocker)
            before, self.waits = self.waits, waits
        if waits != before:
            self.observer.changes_waiting(waits)
        if any(op not in waits.get(table, {}) for table, ops in before.items() for op in ops):
            self.resumed()  # held changes ship again: claim them

    def holds(self, table: str, op: str) -> bool:
        """Whether `op` (upsert, delete) of `table` waits for a halted table (see `hold_dependents`) or for a
        reconcile (see `follow_reconciles`)."""
        return table in self.halted or op in self.waits.get(table, {}) or op in self.reconcile_waits.get(table, ())

    def follow_reconciles(self, reconciling: frozenset[str]) -> None:
        """`reconciling`: the tables whose reconcile is waiting or running. Until it has put the keys that differ
        into the outbox, the changes it may have to precede wait, as for a halt: the upserts of its descendants (a
        child may need a parent row only the reconcile sends) and the deletes of every ancestor of it and of them (a
        parent's delete needs its children's deletes, and a child moving to another parent needs that parent's row,
        first). Shipped now, they would be refused (23503) again and again while the reconcile runs, and
        dead-lettered after `fk_retries` though nothing is wrong with them."""
        with self.lock:
            if reconciling == self.reconciling:
                return
            waits: dict[str, set[str]] = {}
            for table in reconciling:
                descendants = self.plan.descendants.get(table, set())
                for child in descendants:
                    waits.setdefault(child, set()).add("upsert")
                for owner in (table, *descendants):
                    for parent in self.plan.ancestors.get(owner, set()):
                        waits.setdefault(parent, set()).add("delete")
            waits = {t: ops for t, ops in waits.items() if t in self.plan.mappings}
            before, self.reconciling, self.reconcile_waits = self.reconcile_waits, reconciling, waits
        if waits != before:
            self.observer.changes_wait_for_reconciles(waits)
        if any(not ops <= waits.get(table, set()) for table, ops in before.items()):
            self.resumed()  # held changes ship again: claim them

    def unhalt(self, tables: Sequence[str], why: str) -> None:
        """These tables ship again, and what waited for them (the file's record follows at `record`)."""
        with self.lock:
            for table in tables:
                self.halted.pop(table, None)
        self.observer.tables_resumed(list(tables), why)
        if tables:
            self.resumed()  # their entries may lie below where the claims start now
        self.hold_dependents()

    def resume(self) -> None:
        """Ship every halted table again (SIGHUP, after the operator fixed the cause)."""
        self.unhalt(list(self.halted), "SIGHUP")

    def forget_record(self) -> None:
        """The file's record is to be read again before the next `record` (the file was replaced)."""
        self.recorded, self.recorded_waits = None, None

    def record(self, conn: apsw.Connection, tables: Sequence[str]) -> None:
        """Make the halts recorded in the file (for `status`) those in force, writing only what differs. At the
        first turn what a previous run recorded is cleared: a restart resumes every table."""
        if self.recorded is None or self.recorded_waits is None:
            states = {table: outbox.table_state(conn, table) for table in tables}
            self.recorded = {t: str(state.get("last_error")) for t, state in states.items() if state.get("halted")}
            self.recorded_waits = {t: str(state["waiting"]) for t, state in states.items() if state.get("waiting")}
        wanted = {table: halt.describe() for table, halt in self.halted.items()}
        waits = describe_waits(self.waits)
        if wanted == self.recorded and waits == self.recorded_waits:
            return
        updates: dict[str, dict[str, object]] = {
            table: {"halted": True, "last_error": reason} for table, reason in wanted.items()
            if self.recorded.get(table) != reason}
        # resumed: the halt's reason is no longer true (status would show it as the table's last error)
        updates |= {table: {"halted": False, "last_error": None} for table in self.recorded.keys() - wanted.keys()}
        for table in waits.keys() | self.recorded_waits.keys():
            if waits.get(table) != self.recorded_waits.get(table):
                updates.setdefault(table, {})["waiting"] = waits.get(table)
        outbox.record_table_states(conn, updates)
        self.recorded, self.recorded_waits = wanted, waits
