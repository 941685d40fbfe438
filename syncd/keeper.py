"""Capture kept whole for one file (DESIGN.md, "Living with a source that changes"): the tables planned as the
file is now, triggers healed where a schema change lost or outdated them, a table whose key or existence changed
halted, and a file that is not the one syncd shipped from (replaced, restored, read through a lost WAL index)
adopted: syncd's tables installed if the copy predates `install`, what was acked of the old file forgotten, and
every table reconciled.

What it promises: nothing is claimed from, or flushed into, a file that is not the one syncd shipped from until it
is adopted (`replaced` is set from the moment that is noticed); adopting happens only under the lease (the loop
calls `keep_whole` after `Lease.keep`); a key is never guessed (a changed key halts its table).
"""

from __future__ import annotations

from syncd import capture, outbox, state
from syncd.flush import Flush
from syncd.halts import Halt, Halts
from syncd.mapping import TableMapping
from syncd.observer import Observer
from syncd.plan import Plan, plan_columns
from syncd.reconcile import Reconciler
from syncd.schema_halts import SchemaHalts
from syncd.settings import Settings
from syncd.source import Source
from syncd.sqlite import SchemaMoved, immediate, schema_version
from syncd.window import Window

__all__ = ["CaptureKeeper"]

PLAN_ATTEMPTS = 3  # planning passes in a row before giving the step up to an app that keeps changing its schema


class CaptureKeeper:
    """Keeps one file's capture and plan in step with the file. `prepared`: the tables are planned for the file
    as it is now; `replaced`: why the file is not the one shipped from (adopting it is due), or None. Writes the
    plan into `plan`, the halts it finds into `halts`; hands the tables marked for a reconcile to `reconciler`
    (None: only marked, as in unit tests)."""

    def __init__(self, source: Source, settings: Settings, observer: Observer, plan: Plan, halts: Halts,
                 flush: Flush, window: Window, reconciler: Reconciler | None = None) -> None:
        self.source = source
        self.settings = settings
        self.observer = observer
        self.plan = plan
        self.halts = halts
        self.flush = flush
        self.window = window
        self.schema_halts = SchemaHalts(plan, halts, settings)
        self.reconciler = reconciler
        self.prepared = False
        self.replaced: str | None = None

    def keep_whole(self) -> None:
        """Under the lease: adopt a replaced file, plan again after a schema change, and resume the tables whose
        schema mismatch the secondary has fixed."""
        self.source.configure()
        self.look_for_discontinuity()
        if self.replaced:
            self.adopt_replaced_file()
        elif not self.prepared:
            self.prepare()
        self.schema_halts.recheck()

    def look_for_discontinuity(self, *, thorough: bool = False) -> None:
        """Whether the file is still the one syncd last shipped from (`Source.discontinuity`); when not, adopting it
        is due."""
        if self.replaced is None and (reason := self.source.discontinuity(thorough=thorough)) is not None:
            self.discontinued(reason)

    def discontinued(self, reason: str) -> None:
        """The file is not the one syncd shipped from (`reason` says why): nothing is flushed into it, nothing
        claimed from it, until it is adopted under the lease (`adopt_replaced_file`)."""
        self.replaced = reason
        self.prepared = False
        self.halts.forget_record()
        self.window.reset_floor()

    def adopt_replaced_file(self) -> None:
        """The file is not the one syncd shipped from: install syncd's tables if the copy predates `install`, forget
        what was acked of the old file, plan and heal capture, then reconcile every table (the file is the source of
        truth), or halt them all when the operator asked to (`[worker] on_source_replaced = "halt"`); then remember
        the file as the one syncd ships from."""
        conn, config = self.source.conn, self.settings.config
        installed_now = not outbox.installed(conn)
        if installed_now:  # a copy older than `syncd install`
            with immediate(conn):
                outbox.create(conn)
        self.observer.source_replaced(str(self.source.path), installed_now, self.replaced or "")
        outbox.forget_acked(conn)  # they were the old file's entries; the new file's ship as they are
        self.flush.forget()
        reason = f"{self.replaced}: the secondary may hold rows the file does not, or other values"
        with immediate(conn):
            for table in config.tables:
                outbox.request_reconcile(conn, table.name, reason)
        if config.worker.on_source_replaced == "halt":
            for table in config.tables:
                self.halts.halt(table.name, Halt("replaced", "the database file was replaced (a restore?); halted "
                                                             "as [worker] on_source_replaced = \"halt\" asks"))
        # A new generation: the file's history forks here, so that no copy from before the restore (nor one of
        # another branch restored from the same backup) ever carries the position syncd records from now on.
        self.source.remember(outbox.fork_position(conn))
        self.replaced = None
        self.prepare()

    def prepare(self) -> None:
        """Plan every configured table as its schema is now (the key, the columns shipped follow the table), heal
        capture where triggers were lost or outdated but the key is the same, and halt a table whose key or
        existence changed (never guess a key). Raises CaptureError when syncd is not installed in the file."""
        self.source.configure()
        conn = self.source.conn
        if not outbox.installed(conn):
            raise capture.CaptureError(f"syncd is not installed in {self.source.path}; run: syncd install")
        if outbox.migrate(conn):
            self.observer.log.info("moved the journal, the lease and the daemon's state from the database file to "
                                   "the state file", state_file=str(state.path_for(self.source.path)))
        for _ in range(PLAN_ATTEMPTS):
            try:
                self.plan_tables()
            except SchemaMoved:
                continue  # the app changed its schema while syncd planned (nothing written): plan again
            self.prepared = True
            self.request_reconciles()
            return
        # Still moving: `prepared` stays False, so nothing is claimed through a stale plan; the next step plans again.

    def plan_tables(self) -> None:
        """One planning pass over the schema as it is now; `plan.schema_version` says at which schema cookie. Raises
        SchemaMoved when the app changed the schema before triggers could be healed (nothing written)."""
        conn, config = self.source.conn, self.settings.config
        # Read first: a change the app makes while this pass plans shows at the next claim.
        examined_at: int | None = schema_version(conn)
        current = capture.existing_triggers(conn)
        health = [capture.examine(conn, table, current) for table in config.tables]
        mappings = {h.plan.table.name: TableMapping.from_config(table, h.plan.key)
                    for h, table in zip(health, config.tables, strict=True)
                    if h.plan is not None and not h.key_changed}
        self.plan.mappings = mappings
        for h in health:
            if h.problem and not h.repairable:
                self.halts.halt(h.table, Halt("capture", h.problem))
            elif self.halts.kind(h.table) == "capture":
                self.halts.unhalt([h.table], "its capture is whole again")
        repair = [(h, h.plan) for h in health if h.repairable and h.plan is not None]
        if repair:
            what = "triggers were lost or outdated by a schema change; reinstalled for the table as it now is"
            examined_at = capture.reinstall(conn, [p for _, p in repair], what, examined_at).schema_version
            for h, _ in repair:
                self.observer.capture_repaired(h.table, h.finding or f"{h.triggers}: {h.problem}")
        self.plan.relate(conn, config)
        self.halts.hold_dependents()
        self.plan.shipped = plan_columns(conn, mappings)
        self.schema_halts.halt_mismatches()
        self.record_halts()
        self.plan.schema_version = examined_at

    def request_reconciles(self) -> None:
        """Hand every table marked for a reconcile (and shipping) to the reconciler."""
        if self.reconciler is None:
            return
        for table, reason in outbox.tables_to_reconcile(self.source.conn).items():
            if table in self.plan.mappings and self.halts.kind(table) not in ("capture", "replaced"):
                self.reconciler.request(table, reason)

    def record_halts(self) -> None:
        """Make the halts recorded in the file (for `status`) those in force (see `Halts.record`)."""
        self.halts.record(self.source.conn, [t.name for t in self.settings.config.tables])
