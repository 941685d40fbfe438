"""The drain loop (DESIGN.md, "The drain loop, as a story"): wait, claim, map, ship, classify, acknowledge,
observe.

`drain_once` does one batch and returns what it did; `run` repeats it with the lease held, backs off
when the secondary fails as a whole, and sleeps until the database changes. Around it, `run` lives with
a source that changes: a schema change re-plans the tables and heals lost triggers (then a reconcile
makes the writes made meanwhile converge), a replaced file is reopened and reconciled, a table whose key
changed halts, and a busy or failing file is waited out (DESIGN.md, "Living with a source that changes").

Row failures are carried by the rows (bisected down to the bad ones and dead-lettered); failures of the
secondary are carried by the loop (no row is blamed); a schema mismatch halts its table until the secondary
matches. Only claimed entries are ever acknowledged, and only after a 2xx, in one short write transaction
together with the dead letters and the journal. What happened is announced to the `Observer` (metrics,
health, logs); failures arrive already classified by `syncd.target`.
"""

from __future__ import annotations

import contextlib
import graphlib
import json
import math
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import apsw

from syncd import backoff, capture, conflicts, outbox, schema, state
from syncd.config import Config, ConfigError, differences
from syncd.lease import Lease, LeaseHeld
from syncd.logs import get_logger
from syncd.mapping import JsonText, RowError, TableMapping
from syncd.metrics import Metrics
from syncd.observer import Observer, describe_waits
from syncd.outbox import Change, DeadLetter
from syncd.reconcile import Reconciler
from syncd.source import STALE_SETTLE, Source
from syncd.source import Event as SourceEvent
from syncd.sqlite import BUSY_TIMEOUT_MS, FileMoved, SourceFileError, immediate, quote_ident
from syncd.target import TargetError

HOUSEKEEPING_EVERY = 2.0
JOURNAL_EXPIRY_EVERY = 300.0
REGROW_AFTER = 20  # clean batches before a batch size halved by a statement timeout doubles again
REQUIRED_RETRY = 300.0  # seconds before a table halted for a NOT NULL column is tried again whatever PostgREST says
NOT_NULL_COLUMN = re.compile(r'null value in column "(.*?)"(?: of relation| violates)')  # PostgreSQL's 23502
PROBE_EVERY = 30.0  # seconds without an exchange before an idle daemon checks that the secondary answers
PROBE_RETRY = 5.0  # ... and while it does not
FLUSH_AFTER = 0.5  # seconds after an acknowledgement before its entries may be deleted from the app's file
FLUSH_ROWS = 20_000  # ... or once this many wait, whatever their age
FLUSH_DEADLINE = 2.0  # seconds after which they are deleted even while the app stays inside transactions
FLUSH_REFUSAL_REPORT_EVERY = 30.0  # seconds between two warnings while the app's lock keeps a due flush out
FORCE_SEARCH = 0.25  # seconds a due flush still looks for a moment no app transaction is open before it goes ahead
FLUSH_RETRY = 0.01  # seconds between looks for a moment when no other connection is inside a transaction
GAP_WAIT = 0.05  # seconds a due flush waits for the app's next commit (right after it, the app is between two)
GAP_POLL = 0.0002  # seconds between looks at PRAGMA data_version meanwhile
APP_IDLE_AFTER = 0.25  # seconds without an app commit after which the app counts as idle
SOURCE_GONE_GRACE = 60.0  # seconds the database file may be missing (a restore in progress) before syncd exits
GONE_POLL = 0.1  # seconds between looks for a missing file (a restore renames or copies it back)
GONE_LOG_EVERY = 5.0  # seconds between warnings while it is missing
HINT_UNIQUE_HANDOFF = (
    "if another row of SQLite gave this value up in the same transaction, the secondary refuses the hand-over "
    "because it checks the unique constraint row by row: declare it DEFERRABLE INITIALLY DEFERRED there (ALTER TABLE "
    "... DROP CONSTRAINT c, ADD CONSTRAINT c UNIQUE (...) DEFERRABLE INITIALLY DEFERRED), or fix the clash")


class Target(Protocol):
    """A secondary that can upsert rows and delete keys (`syncd.target.PostgrestTarget` is the real one).
    Every failure is a TargetError, already classified; an expired token is renewed inside."""

    def upsert(self, table: str, key: Sequence[str], rows: Sequence[dict[str, object] | str]) -> None:
        """Insert or update `rows` ({column: value}, or a JSON object's text) of `table` by its `key` columns, all
        or none."""
        ...

    def delete(self, table: str, key: Sequence[str], keys: Sequence[dict[str, object]]) -> int:
        """Delete the rows of `table` whose `key` columns hold these values ({key column: value} each); the
        number of requests it took."""
        ...

    def ping(self, table: str) -> None:
        """Read no rows of `table`: returns when the secondary answers, raises TargetError when not."""
        ...

    def describe(self) -> dict[str, object]:
        """The secondary's schema (PostgREST's OpenAPI document); raises TargetError."""
        ...


Held = tuple[Change, "dict[str, object] | str", TargetError]  # a row refused for a unique value, to send again


class Interrupted(Exception):
    """The secondary failed as a whole (transient): the batch stops, what shipped is acknowledged."""

    def __init__(self, table: str, error: TargetError) -> None:
        super().__init__(f"{table}: {error.message}")
        self.table = table
        self.error = error


ONE_KEY_TWICE = "21000"  # "ON CONFLICT DO UPDATE command cannot affect row a second time" (PostgreSQL, INSERT)


@dataclass
class Batch:
    """What shipping one batch decided, key by key: acknowledged, dead-lettered, requeued; tables halted."""

    shipped: list[Change] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    requeued: list[Change] = field(default_factory=list)
    upserted: Counter[str] = field(default_factory=Counter)
    deleted: Counter[str] = field(default_factory=Counter)
    # per table, the pairs of keys PostgreSQL found to be one key of the secondary (21000) that the collapse missed
    collided: dict[str, list[tuple[object, object]]] = field(default_factory=dict)


@dataclass
class Shipment:
    """One batch on its way: claimed on the loop's thread, shipped (maybe on another), finished back."""

    changes: list[Change]
    claimed: int
    started: float = field(default_factory=time.monotonic)
    batch: Batch = field(default_factory=Batch)
    interrupted: Interrupted | None = None
    shipping_seconds: float = 0.0  # how long its requests took


@dataclass
class DrainResult:
    """What draining did: outbox entries claimed, keys shipped, dead-lettered and requeued, and whether more is
    probably waiting."""

    claimed: int = 0  # outbox entries read
    shipped: int = 0  # keys acknowledged by the secondary
    dead: int = 0  # keys dead-lettered
    requeued: int = 0  # keys moved to the tail (a foreign key refused them)
    more: bool = False  # the batch was full: more is probably waiting

    def plus(self, other: DrainResult) -> DrainResult:
        """Both results added up; `more` is the later one's."""
        return DrainResult(self.claimed + other.claimed, self.shipped + other.shipped, self.dead + other.dead,
                           self.requeued + other.requeued, other.more)


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
RESTART_KEYS = frozenset({"source.path", "worker.metrics_addr"})  # what a SIGHUP cannot change in a running daemon


class SourceGone(Exception):
    """The application's file has been gone longer than SOURCE_GONE_GRACE seconds: nothing left to drain."""


class Worker:
    """Drains one database file's outbox to one secondary, announcing what happens to `observer`; keeps capture
    in step with the file as it changes (migrations, restores), and waits out locks and disk faults.

    `reconciler` reconciles tables whose capture had a gap (None: only marked, as in unit tests); `reload` (SIGHUP)
    reads the configuration and builds a target anew, raising ConfigError when the configuration is bad."""

    def __init__(self, source: Source, config: Config, target: Target, observer: Observer, *,
                 reconciler: Reconciler | None = None,
                 reload: Callable[[], tuple[Config, Target]] | None = None) -> None:
        self.source = source
        self.config = config
        self.target = target
        self.observer = observer
        self.reconciler = reconciler
        self.reload = reload
        self.mappings: dict[str, TableMapping] = {}
        self.shipped: dict[str, schema.Shipped] = {}  # table -> the columns it ships, as planned
        self.order: list[str] = []
        self.prepared = False
        self.lease = Lease(source.conn, config.worker.lease_seconds, metrics=config.worker.metrics_addr)
        self.batch_size = config.worker.batch_size
        self.halted: dict[str, Halt] = {}
        self.halted_at: dict[str, float] = {}  # table -> when its halt began (monotonic seconds)
        self.fk_attempts: Counter[tuple[str, str | bytes]] = Counter()
        self.clean_batches = 0
        self.next_housekeeping = 0.0
        self.next_journal_expiry = 0.0
        self.next_probe = 0.0
        self.next_schema_check = 0.0
        self.fault_since: float | None = None  # monotonic seconds when the current fault of the file began
        self.faults = 0
        self.gone_since: float | None = None  # monotonic seconds since the file is gone
        self.gone_logged = 0.0
        self.replaced: str | None = None  # why the file is not the one shipped from: adopting it (reconcile) is due
        self.holding = False  # this daemon held the lease at its last look
        self.recorded: dict[str, str] | None = None  # the halts as recorded in the file (None: not read yet)
        self.recorded_waits: dict[str, str] | None = None  # likewise, the changes waiting for a halted table
        self.window: deque[tuple[Shipment, Future[Shipment]]] = deque()  # the batches of the drain under way
        self.open_seqs: set[int] = set()  # claimed (or passed over) and not settled: claims start below the lowest
        self.seen_upto = 0  # the highest seq a claim read since the floor was last reset
        self.unflushed = -1  # acked entries not yet deleted from the app's file (-1: not counted yet)
        self.unflushed_since: float | None = None  # monotonic seconds of the oldest of them
        self.next_flush_try = 0.0
        self.flush_refused_since: float | None = None  # since when the app's write lock keeps a due flush out
        self.force_flush_at: float | None = None  # when a due flush stops waiting for a quiet moment
        self.flush_refusal_reported = 0.0
        self.requeued_keys = 0  # keys requeued (a foreign key refused them) by the last flushes
        self.app_version: int | None = None  # PRAGMA data_version when last read: it changes when the app commits
        self.app_committed_at = 0.0  # monotonic seconds when an app commit was last seen
        self.reload_requested = threading.Event()
        self.shipper = ThreadPoolExecutor(max_workers=config.worker.max_in_flight, thread_name_prefix="syncd-ship")
        self.relatives: dict[str, set[str]] = {}  # table -> the tables it is a foreign-key ancestor or descendant of
        self.ancestors: dict[str, set[str]] = {}  # table -> its foreign-key parents, theirs, and so on
        self.descendants: dict[str, set[str]] = {}  # table -> its foreign-key children, theirs, and so on
        self.waits: dict[str, dict[str, str]] = {}  # table -> op -> the halted table it waits for
        self.lock = threading.RLock()  # what the shipping threads change: halts, foreign-key attempts, the batch size
        self.claim_seconds = 0.0  # moving averages of claiming a batch and of shipping one
        self.shipping_seconds = 0.0

    @property
    def conn(self) -> apsw.Connection:
        """The connection to the application's file (a new one after the file was replaced)."""
        return self.source.conn

    @property
    def metrics(self) -> Metrics:
        return self.observer.metrics

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, wait: WaitFn | None = None, once: bool = False) -> None:
        """Drain while holding the lease until `stop` is set (with `once`: until the outbox is empty and every
        reconcile done). Raises SourceGone when the file is gone for good; any other exception is a bug."""
        failures = 0
        while not stop.is_set():
            self.observer.heartbeat()
            try:
                self.reload_if_requested()
                if not self.follow_source(stop) or not self.hold_lease(stop):
                    continue
                self.keep_capture_whole()
                result = self.drain(stop, between=lambda: self.between_batches(stop))
                if self.replaced:
                    continue  # adopt the file (under the lease) before anything else touches it
                self.flush_when_due(final=once and result.claimed == 0)
                self.record_halts()
                self.housekeeping()
                if result.claimed == 0 and not once:
                    self.probe_when_idle()
                self.source_usable()
            except Interrupted as exc:
                failures += 1
                self.back_off(exc, failures, stop)
                continue
            except FileMoved as exc:
                # A commit or checkpoint refused, nothing written: the file was replaced (or its WAL index lost)
                # after this turn's look at it. The next turn notices it and reads the file anew.
                self.observer.log.info("a write to the database file was refused: it is no longer the file syncd "
                                       "has open", detail=str(exc))
                stop.wait(GONE_POLL)
                continue
            except SOURCE_FAULTS as exc:
                # The app held the write lock past the busy timeout, or the disk refused: nothing shipped since
                # the last acknowledgement is lost (it ships again). Never a reason to stop.
                self.wait_out_fault(exc, stop)
                continue
            if failures:
                self.observer.secondary_recovered(failures)
                failures = 0
            if once and result.claimed == 0:
                if self.requeued_keys:  # the final flush put them back at the tail: drain on
                    self.requeued_keys = 0
                    continue
                if self.reconciler is None or not self.reconciler.busy():
                    break
                self.reconciler.run_pending(stop)
                continue
            if once:
                continue
            (wait or wait_on(stop))(self.until_next_step(), stop)
        self.flush_on_the_way_out()
        self.release_lease()

    def hold_lease(self, stop: threading.Event) -> bool:
        """Keep the lease; while another daemon holds it, stand by (False) for a third of its lifetime."""
        self.source.configure()  # the lease lives in the state file
        try:
            self.lease.keep()
        except LeaseHeld as held:
            self.holding = False
            self.observer.standing_by(held.holder.host if held.holder else None,
                                      held.holder.pid if held.holder else None)
            stop.wait(self.lease.retry_after)
            return False
        if not self.holding:  # taken now (at start, or over from another daemon): is this the file it left?
            self.holding = True
            self.look_for_discontinuity(thorough=True)
        self.observer.holding_lease()
        return True

    def release_lease(self) -> None:
        """Give the lease up at the end; when the file refuses, it expires by itself."""
        with contextlib.suppress(*SOURCE_FAULTS, FileMoved):
            self.lease.release()

    def between_batches(self, stop: threading.Event) -> bool:
        """During a long drain: stay alive, refresh the gauges, and stop draining (the loop acts, then drains on)
        when asked to stop, the file or its schema changed, SIGHUP came, or the lease is lost."""
        self.observer.heartbeat()
        self.flush_when_due()
        self.housekeeping()
        return (not stop.is_set() and self.follow_source(stop) and self.prepared and not self.replaced
                and not self.reload_requested.is_set() and self.hold_lease(stop))

    def back_off(self, exc: Interrupted, failures: int, stop: threading.Event) -> None:
        """The secondary failed as a whole: wait (capped exponential backoff, full jitter, Retry-After)."""
        pause = backoff.delay(failures, cap=self.config.worker.max_backoff, retry_after=exc.error.retry_after)
        self.observer.secondary_failed(exc.table, exc.error, failures, pause)
        stop.wait(pause)

    # -- the application's file: faults, migrations, restores ----------------------------------------------

    def wait_out_fault(self, exc: Exception, stop: threading.Event) -> None:
        """Wait (with backoff) for the app to release the write lock, or the disk to take writes again."""
        kind = fault_kind(exc)
        now = time.monotonic()
        if self.fault_since is None:
            # BUSY arrives after the busy timeout: the app has held the lock at least that long already.
            self.fault_since = now - (BUSY_TIMEOUT_MS / 1000 if kind == "busy" else 0.0)
        self.faults += 1
        pause = backoff.delay(self.faults, base=0.5, cap=self.config.worker.max_backoff, rand=lambda: 1.0)
        lasting = now - self.fault_since
        self.observer.source_fault(kind, fault_problem(kind, exc, lasting), lasting, pause)
        stop.wait(pause)

    def source_usable(self) -> None:
        """A turn of the loop used the file without a fault (a due flush still refused by the app's lock is one)."""
        self.fault_since, self.faults = None, 0
        if self.flush_refused_since is None:
            self.observer.source_ok()

    def follow_source(self, stop: threading.Event) -> bool:
        """Notice what changed in the file since the last turn: replaced -> reopen it (adopting it follows under
        the lease); schema changed -> plan again. False while there is no file; raises SourceGone when it has been
        gone for longer than SOURCE_GONE_GRACE seconds."""
        event = self.source.check()
        if event is SourceEvent.GONE:
            return self.wait_for_file("gone", f"the database file {self.source.path} is gone (a restore in "
                                      "progress?)", stop)
        if event is SourceEvent.REPLACED and (left := self.source.wal_left_behind()):
            wal = f"{self.source.path}-wal"
            return self.wait_for_file("unusable", f"the database file was replaced, but {wal} beside it is still the "
                                      f"old file's ({left} bytes of its changes), which the new file would read as "
                                      f"its own pages: with the app stopped, delete {wal} and {self.source.path}-shm "
                                      "(a backup is whole without them)", stop)
        if event is SourceEvent.STALE and not self.source.settled():
            return self.wait_for_file("stale", "the WAL index (-shm) syncd's connection maps was deleted while syncd "
                                      f"had the file open; reading the file anew in {STALE_SETTLE:.0f} s unless a "
                                      "restore puts another file in place first", stop)
        if event in (SourceEvent.REPLACED, SourceEvent.STALE):
            reason = ("the database file was replaced (a restore?)" if event is SourceEvent.REPLACED else
                      "the WAL index (-shm) syncd's connection maps is no longer the file's: it was deleted while "
                      "syncd had the file open, so syncd's lock on it had been lost; reading the file anew")
            try:
                self.source.reopen(configure=False)
            except SourceFileError as exc:  # a directory, a file that is not SQLite (yet?), not ours to write
                return self.wait_for_file("unusable", f"the database file was replaced by one syncd cannot use: {exc}",
                                          stop)
            self.lease = Lease(self.conn, self.config.worker.lease_seconds, holder=self.lease.holder,
                               metrics=self.lease.metrics)
            self.discontinued(reason)
            self.source.configure()  # the state file attached, as at start (raises apsw.BusyError: the loop waits)
            if self.source.wal_index_lost():  # the reconciler's connection still maps the deleted one: it ends soon
                return self.wait_for_file("stale", "another connection of syncd's still maps the deleted WAL index "
                                          "(-shm) of the database file; reopening once it closes", stop)
        self.gone_since = None
        if event is SourceEvent.SCHEMA:
            self.prepared = False
            self.look_for_discontinuity()  # `sqlite3 .restore` into the open file changes its schema cookie
        return True

    def look_for_discontinuity(self, *, thorough: bool = False) -> None:
        """Whether the file is still the one syncd last shipped from (`Source.discontinuity`); when not, adopting it
        is due."""
        if self.replaced is None and (reason := self.source.discontinuity(thorough=thorough)) is not None:
            self.discontinued(reason)

    def discontinued(self, reason: str) -> None:
        """The file is not the one syncd shipped from (`reason` says why): nothing is flushed into it, nothing
        claimed from it, until it is adopted under the lease (`adopt_replaced_file`)."""
        self.replaced = reason
        self.prepared, self.recorded, self.recorded_waits = False, None, None
        self.reset_floor()

    def keep_capture_whole(self) -> None:
        """Under the lease: adopt a replaced file, plan again after a schema change, and resume the tables whose
        schema mismatch the secondary has fixed."""
        self.source.configure()
        self.look_for_discontinuity()
        if self.replaced:
            self.adopt_replaced_file()
        elif not self.prepared:
            self.prepare()
        self.recheck_schema_halts()

    def wait_for_file(self, kind: str, problem: str, stop: threading.Event) -> bool:
        """No usable file at source.path (`kind`: gone, unusable, stale; `problem` says which): report it every
        GONE_LOG_EVERY seconds and wait GONE_POLL (False: the turn is over); raises SourceGone once it has lasted
        SOURCE_GONE_GRACE seconds."""
        now = time.monotonic()
        if self.gone_since is None or now - self.gone_logged >= GONE_LOG_EVERY:
            self.gone_since = now if self.gone_since is None else self.gone_since
            self.gone_logged = now
            self.observer.source_fault(kind, f"{problem}: waiting for a usable file", now - self.gone_since,
                                       GONE_POLL)
        if now - self.gone_since > SOURCE_GONE_GRACE:
            raise SourceGone(f"{problem}, for more than {SOURCE_GONE_GRACE:.0f} s; restore the file (or fix "
                             "source.path), then start syncd run")
        stop.wait(GONE_POLL)
        return False

    def adopt_replaced_file(self) -> None:
        """The file is not the one syncd shipped from (replaced, restored, or read through a lost WAL index): install
        syncd's tables if the copy predates `install`, forget what was acked of the old file, plan and heal capture,
        then reconcile every table (the file is the source of truth), or halt them all when the operator asked to
        (`[worker] on_source_replaced = "halt"`); then remember the file as the one syncd ships from."""
        installed_now = not outbox.installed(self.conn)
        if installed_now:  # a copy older than `syncd install`
            with immediate(self.conn):
                outbox.create(self.conn)
        self.observer.source_replaced(str(self.source.path), installed_now, self.replaced or "")
        outbox.forget_acked(self.conn)  # they were the old file's entries; the new file's ship as they are
        self.unflushed, self.unflushed_since = 0, None
        reason = f"{self.replaced}: the secondary may hold rows the file does not, or other values"
        with immediate(self.conn):
            for table in self.config.tables:
                outbox.request_reconcile(self.conn, table.name, reason)
        if self.config.worker.on_source_replaced == "halt":
            for table in self.config.tables:
                self.halt(table.name, Halt("replaced", "the database file was replaced (a restore?); halted as "
                                                       "[worker] on_source_replaced = \"halt\" asks"))
        # A new generation: the file's history forks here, so that no copy from before the restore (nor one of
        # another branch restored from the same backup) ever carries the position syncd records from now on.
        self.source.remember(outbox.fork_position(self.conn))
        self.replaced = None
        self.prepare()

    def prepare(self) -> None:
        """Plan every configured table as its schema is now (the key, the columns shipped follow the table), heal
        capture where triggers were lost or outdated but the key is the same, and halt a table whose key or
        existence changed (never guess a key)."""
        self.source.configure()
        if not outbox.installed(self.conn):
            raise capture.CaptureError(f"syncd is not installed in {self.source.path}; run: syncd install")
        if outbox.migrate(self.conn):
            self.observer.log.info("moved the journal, the lease and the daemon's state from the database file to "
                                   "the state file", state_file=str(state.path_for(self.source.path)))
        current = capture.existing_triggers(self.conn)
        health = [capture.examine(self.conn, table, current) for table in self.config.tables]
        self.mappings = {h.plan.table.name: TableMapping.from_config(table, h.plan.key)
                         for h, table in zip(health, self.config.tables, strict=True)
                         if h.plan is not None and not h.key_changed}
        for h in health:
            if h.problem and not h.repairable:
                self.halt(h.table, Halt("capture", h.problem))
            elif self.halted.get(h.table, Halt("", "")).kind == "capture":
                self.unhalt([h.table], "its capture is whole again")
        repair = [h for h in health if h.repairable]
        if repair:
            what = "triggers were lost or outdated by a schema change; reinstalled for the table as it now is"
            capture.reinstall(self.conn, [h.plan for h in repair], what)  # type: ignore[misc]
            for h in repair:
                self.observer.capture_repaired(h.table, h.finding or f"{h.triggers}: {h.problem}")
        self.order = ship_order(self.conn, self.config, list(self.mappings))
        self.relatives = relatives(self.conn, self.config, list(self.mappings))
        self.ancestors, self.descendants = lineage(self.conn, self.config, list(self.mappings))
        self.hold_dependents()
        self.plan_columns()
        self.halt_schema_mismatches()
        self.record_halts()
        self.prepared = True
        self.request_reconciles()

    def request_reconciles(self) -> None:
        """Hand every table marked for a reconcile (and shipping) to the reconciler."""
        if self.reconciler is None:
            return
        for table, reason in outbox.tables_to_reconcile(self.conn).items():
            if table in self.mappings and self.halted.get(table, Halt("", "")).kind not in ("capture", "replaced"):
                self.reconciler.request(table, reason)

    def reload_if_requested(self) -> None:
        """SIGHUP: read the configuration and secrets again, rebuild the target, clear every halt, plan again.
        A configuration that fails to load keeps the old one (every problem logged); halts are cleared anyway."""
        if not self.reload_requested.is_set():
            return
        self.reload_requested.clear()
        self.prepared = False
        if self.reload is not None:
            try:
                config, target = self.reload()
            except ConfigError as exc:
                self.observer.reload_failed(exc.problems or [str(exc)])
            else:
                changed = differences(self.config, config)
                old, self.config, self.target = self.target, config, target
                close = getattr(old, "close", None)
                if close is not None:
                    close()
                self.batch_size = config.worker.batch_size
                self.observer.reloaded(changed, [key for key in changed if key in RESTART_KEYS])
        self.resume()

    # -- the drain step: claim, ship, acknowledge ------------------------------------------------------

    def drain_once(self) -> DrainResult:
        """Claim, ship and acknowledge one batch, and apply it to the app's file at once (raises Interrupted after
        acknowledging what shipped). The loop defers that last step (`flush_when_due`); this is for callers that
        want one whole step."""
        shipment = self.claim()
        if shipment is None:
            return DrainResult()
        try:
            return self.finish(self.deliver(shipment))
        finally:
            self.flush_when_due(final=True)

    def drain(self, stop: threading.Event, between: Callable[[], bool] = lambda: True) -> DrainResult:
        """Ship batches until the outbox is empty, `stop` is set or `between` (called after each acknowledged
        batch) says no. Up to `max_in_flight` batches are on their way at once, each claimed while the others are
        in flight with their keys left out, so no key is ever in two requests at once; a batch holding a table
        related by a foreign key to a table of a batch in flight waits for that batch, so parents still land
        before children. Each answer is acknowledged for its own batch, in the order the batches were claimed."""
        total = DrainResult()
        window: deque[tuple[Shipment, Future[Shipment]]] = deque()
        self.window = window
        try:
            while True:
                upcoming = None
                if not stop.is_set() and len(window) < self.window_size():
                    claiming = time.monotonic()
                    upcoming = self.claim([change for shipment, _ in window for change in shipment.changes])
                    if upcoming is not None:
                        self.claim_seconds = moving_average(self.claim_seconds, time.monotonic() - claiming)
                if upcoming is None and not window:
                    return total
                while upcoming is not None and window and self.related(upcoming, window):
                    total = total.plus(self.finish(self.arrived(window.popleft()[1].result())))  # parents first
                    if not between():
                        return total  # `upcoming` is dropped: claimed again later
                if upcoming is not None:
                    window.append((upcoming, self.shipper.submit(self.deliver, upcoming)))
                    continue  # claim more while the window has room
                total = total.plus(self.finish(self.arrived(window.popleft()[1].result())))  # raises Interrupted
                if not between():
                    return total
        finally:
            for _, future in window:  # left early (an interruption, a busy file): no request runs on behind us
                future.result()

    def window_size(self) -> int:
        """How many batches to keep in flight: enough that claiming the next one takes as long as a batch's requests
        (a remote secondary's round trip is hidden), no more (each one more shares the CPU), at most max_in_flight."""
        if self.claim_seconds <= 0:
            return 1
        return max(1, min(self.config.worker.max_in_flight, math.ceil(self.shipping_seconds / self.claim_seconds)
                          + 1))

    def related(self, upcoming: Shipment, window: deque[tuple[Shipment, Future[Shipment]]]) -> bool:
        """Whether a table of `upcoming` is a foreign-key parent or child of a table in a batch in flight."""
        mine = {change.table for change in upcoming.changes}
        theirs = {change.table for shipment, _ in window for change in shipment.changes}
        return any(self.relatives.get(table, set()) & theirs for table in mine)

    def claim(self, in_flight: Sequence[Change] = ()) -> Shipment | None:
        """The next batch of the tables that are not halted, its keys' rows read from one snapshot."""
        if not self.prepared:
            self.prepare()
        active = {t: m.key for t, m in self.mappings.items() if t not in self.halted}
        floor = min(min(self.open_seqs) - 1, self.seen_upto) if self.open_seqs else self.seen_upto
        renderers = {t: self.mappings[t].sql_rendering for t in active}
        try:
            claimed = outbox.claim(self.conn, self.batch_size, active, in_flight, after=floor, renderers=renderers)
        except outbox.TableUnreadable as exc:  # the table's problem: it halts, the others ship on
            self.halt(exc.table, Halt("capture", f"syncd cannot read the rows of {exc.table!r}: {exc.problem}; "
                                                 "leave the table out of syncd.toml, or report it (syncd's reads "
                                                 "of a table never compare by the application's collations)"))
            return self.claim(in_flight)
        changes = [c for c in claimed.changes
                   if c.problem or not self.holds(c.table, "upsert" if c.present else "delete")]
        if len(changes) < len(claimed.changes):  # held: left in the outbox, claimed again once the halt ends
            shipping = {id(c) for c in changes}
            self.open_seqs.difference_update(e.seq for c in claimed.changes if id(c) not in shipping for e in c.entries)
        self.open_seqs.update(e.seq for c in changes for e in c.entries)
        self.open_seqs.update(claimed.passed_over)
        self.seen_upto = max(self.seen_upto, claimed.last_seq)
        return Shipment(changes, sum(len(c.entries) for c in changes)) if changes else None

    def deliver(self, shipment: Shipment) -> Shipment:
        """Ship a claimed batch (touches no SQLite: it may run beside the next claim)."""
        started = time.monotonic()
        try:
            self.ship(shipment.changes, shipment.batch)
        except Interrupted as exc:
            shipment.interrupted = exc
        shipment.shipping_seconds = time.monotonic() - started
        return shipment

    def arrived(self, shipment: Shipment) -> Shipment:
        """Note how long a batch's requests took (the window follows it)."""
        self.shipping_seconds = moving_average(self.shipping_seconds, shipment.shipping_seconds)
        return shipment

    def finish(self, shipment: Shipment) -> DrainResult:
        """Acknowledge and observe; then re-raise an interruption of the secondary."""
        batch, now = shipment.batch, time.time()
        outbox.acknowledge(self.conn, batch.shipped, batch.dead, batch.requeued, now=now)
        settled = [*batch.shipped, *(d.change for d in batch.dead), *batch.requeued]
        self.open_seqs.difference_update(e.seq for c in settled for e in c.entries)
        self.count_unflushed(sum(len(c.entries) for c in settled))
        self.requeued_keys += len(batch.requeued)
        if batch.shipped:
            self.next_probe = time.monotonic() + PROBE_EVERY
        self.observer.batch_done(
            claimed=shipment.claimed, shipped=len(batch.shipped), dead=len(batch.dead), requeued=len(batch.requeued),
            upserted=batch.upserted, deleted=batch.deleted, seconds=time.monotonic() - shipment.started,
            lags=[max(0.0, now - entry.at) for change in batch.shipped for entry in change.entries],
            interrupted=shipment.interrupted is not None)
        if shipment.interrupted is not None:
            raise shipment.interrupted
        self.regrow_batch()
        return DrainResult(shipment.claimed, len(batch.shipped), len(batch.dead), len(batch.requeued),
                           more=shipment.claimed >= self.batch_size)

    def regrow_batch(self) -> None:
        """After a statement timeout halved the batch, double it again every REGROW_AFTER clean batches."""
        if self.batch_size >= self.config.worker.batch_size:
            return
        self.clean_batches += 1
        if self.clean_batches >= REGROW_AFTER:
            self.clean_batches = 0
            self.batch_size = min(self.config.worker.batch_size, self.batch_size * 2)

    # -- flush: apply what was acknowledged to the app's file, when that cannot make the app fail -------------

    def count_unflushed(self, more: int) -> None:
        """`more` entries were acked; start the clock of the oldest unflushed one."""
        if self.unflushed < 0:
            self.unflushed = outbox.unflushed(self.conn)
        else:
            self.unflushed += more
        if self.unflushed and self.unflushed_since is None:
            self.unflushed_since = time.monotonic()

    def flush_when_due(self, *, final: bool = False) -> None:
        """Delete acked entries from the app's file (and file dead letters, requeue keys) once they are FLUSH_AFTER
        seconds old or FLUSH_ROWS many, at a moment when no other process is inside a transaction on the file, in
        transactions that never wait for its lock; after FLUSH_DEADLINE seconds, or `final`, whatever the app does.
        A commit while an app transaction has read but not yet written would make its write fail at once."""
        if self.replaced:
            return  # the file is not the one those entries were claimed from
        if self.unflushed < 0:
            self.count_unflushed(0)
        if not self.unflushed:
            return
        now = time.monotonic()
        age = now - (self.unflushed_since or now)
        must = final or age >= FLUSH_DEADLINE
        if not must and (now < self.next_flush_try or (age < FLUSH_AFTER and self.unflushed < FLUSH_ROWS)):
            return
        if must and self.force_flush_at is None:  # due: a last FORCE_SEARCH seconds of looking for a quiet moment
            self.force_flush_at = now + FORCE_SEARCH
        forced = final or (self.force_flush_at is not None and now >= self.force_flush_at)
        quiet = (lambda: True) if forced else (lambda: not self.source.others_in_transaction())
        while self.unflushed:
            self.wait_for_a_gap()  # forced too: right after an app commit a commit of ours is least likely to fail one
            if not quiet():
                self.next_flush_try = time.monotonic() + FLUSH_RETRY
                return
            try:
                applied = outbox.flush(self.conn, wait=final, quiet=quiet)
            except outbox.Discontinuity as exc:
                self.discontinued(f"{exc}: a copy restored from a backup into the open file?")
                return
            if applied is None:
                self.next_flush_try = time.monotonic() + FLUSH_RETRY
                if must:
                    self.flush_refused()
                return
            self.flush_refused_since = self.force_flush_at = None
            self.reset_floor()  # deleting the highest seqs lets SQLite hand them out again
            self.unflushed = 0 if applied < outbox.FLUSH_CHUNK else max(0, self.unflushed - applied)
        self.unflushed_since = self.force_flush_at = None
        self.checkpoint()

    def flush_refused(self) -> None:
        """A due flush found the app holding the write lock. The drain goes on (acknowledging writes the state file
        only) and the flush is tried again at every step, never waiting for the lock; once the lock has been held
        past the busy timeout it is reported as a fault of the file (log, /readyz, `syncd_source_ok`) until a flush
        gets through."""
        now = time.monotonic()
        if self.flush_refused_since is None:
            self.flush_refused_since, self.flush_refusal_reported = now, 0.0
        lasting = now - self.flush_refused_since
        if lasting >= BUSY_TIMEOUT_MS / 1000 and now - self.flush_refusal_reported >= FLUSH_REFUSAL_REPORT_EVERY:
            self.flush_refusal_reported = now
            self.observer.source_fault("busy", fault_problem("busy", apsw.BusyError(), lasting), lasting,
                                       FLUSH_RETRY)

    def checkpoint(self) -> None:
        """Copy the WAL into the database file ourselves (PASSIVE: never waits for, never blocks, the app), so that
        the WAL our deletions grew does not make one of the app's commits run the checkpoint (SQLite has the
        connection whose commit crosses wal_autocheckpoint do it: https://sqlite.org/wal.html#ckpt)."""
        if self.source.wal:
            self.source.checkpoint()

    def wait_for_a_gap(self) -> None:
        """While the app is writing, wait (up to GAP_WAIT seconds) for the moment right after it commits: it is then
        between two transactions, where a commit of ours cannot catch one of them between its read and its write.
        An app that has committed nothing for APP_IDLE_AFTER seconds is idle: no wait."""
        conn = self.conn
        version = conn.execute("PRAGMA main.data_version").fetchone()[0]
        now = time.monotonic()
        if version != self.app_version:
            self.app_version, self.app_committed_at = version, now
        if now - self.app_committed_at >= APP_IDLE_AFTER:
            return
        deadline = now + GAP_WAIT
        while time.monotonic() < deadline:
            time.sleep(GAP_POLL)
            if conn.execute("PRAGMA main.data_version").fetchone()[0] != version:
                self.app_version, self.app_committed_at = None, time.monotonic()
                return

    def flush_on_the_way_out(self) -> None:
        """At a clean stop, apply what was acked: at a quiet moment within FLUSH_DEADLINE seconds, else at once
        (left for the next start only when the file refuses)."""
        deadline = time.monotonic() + FLUSH_DEADLINE
        with contextlib.suppress(*SOURCE_FAULTS, FileMoved):
            while self.unflushed and time.monotonic() < deadline:
                self.next_flush_try, self.unflushed_since = 0.0, time.monotonic() - FLUSH_AFTER
                self.flush_when_due()
                if self.unflushed:
                    time.sleep(FLUSH_RETRY)
            self.flush_when_due(final=True)

    def until_next_step(self) -> float:
        """How long an idle loop may wait: the poll interval, or less when a flush falls due sooner."""
        if self.unflushed_since is None:
            return self.config.worker.poll_interval
        due = max(self.unflushed_since + FLUSH_AFTER, self.next_flush_try) - time.monotonic()
        return max(0.0, min(self.config.worker.poll_interval, due))

    def reset_floor(self) -> None:
        """Claims start from the first seq again (tables resumed, entries flushed or requeued, the file replaced).
        The seqs of batches still in flight stay open: one of them may yet be interrupted, and its entries must be
        claimed again (a flush comes between two batches of a drain)."""
        self.seen_upto = 0
        self.open_seqs.intersection_update(e.seq for shipment, _ in self.window for c in shipment.changes
                                           for e in c.entries)

    # -- ship: map, send, classify ----------------------------------------------------------------------

    def ship(self, changes: list[Change], batch: Batch) -> None:
        """Upserts parents first, then deletes children first, one table at a time; then the rows refused for a
        unique value another row held (it may have given it up meanwhile: `hand_off`)."""
        batch.dead += [DeadLetter(c, c.problem) for c in changes if c.problem]
        by_table: dict[str, list[Change]] = {}
        for change in changes:
            if not change.problem:
                by_table.setdefault(change.table, []).append(change)
        plans = {table: self.collapse(table, table_changes, batch) for table, table_changes in by_table.items()}
        held: dict[str, list[Held]] = {}
        for table in self.order:
            plan = plans.get(table)
            if plan and plan.present and not self.holds(table, "upsert"):
                self.ship_upserts(table, plan.present, batch, held.setdefault(table, []))
        for table in reversed(self.order):
            plan = plans.get(table)
            if plan and plan.gone and not self.holds(table, "delete"):
                self.ship_deletes(table, plan.gone, batch)
        for table in self.order:
            if held.get(table) and not self.holds(table, "upsert"):
                self.hand_off(table, held[table], batch)
        for table, pairs in batch.collided.items():
            self.observer.keys_collided(table, pairs)

    def collapse(self, table: str, changes: list[Change], batch: Batch) -> conflicts.Collapsed:
        """One change per key of the secondary (see `conflicts`); the superseded ones are acknowledged."""
        plan = conflicts.collapse([c for c in changes if c.present], [c for c in changes if not c.present],
                                  target_keys(self.mappings[table]))
        if plan.superseded:
            batch.shipped += plan.superseded
            self.observer.keys_collapsed(table, len(plan.superseded), plan.examples)
        if stood_in := [(c.key, c.stand_in) for c in changes if c.stand_in is not None]:
            self.observer.deletes_stood_in(table, stood_in)
        return plan

    def ship_upserts(self, table: str, changes: list[Change], batch: Batch, held: list[Held] | None = None) -> None:
        """Map each present row (a row the mapping refuses is dead-lettered) and send them, grouped by their set
        of columns; rows refused for a unique value go to `held` when given."""
        mapping = self.mappings[table]
        groups: dict[tuple[str, ...], list[tuple[Change, dict[str, object] | str]]] = {}
        rendered = [(change, change.rendered) for change in changes if change.rendered is not None]
        for change in changes:
            if change.rendered is not None:
                continue
            try:
                payload = mapping.map_row(change.row, change.key)  # type: ignore[arg-type]
            except RowError as exc:
                batch.dead.append(DeadLetter(change, str(exc)))
                continue
            groups.setdefault(tuple(payload), []).append((change, payload))  # PostgREST: same keys per request
        if rendered:  # SQLite's JSON of every column: the same keys as map_row's of a row of the same columns
            groups.setdefault(("(rendered)",), []).extend(rendered)  # type: ignore[arg-type]
        for items in groups.values():
            for chunk in by_size(items, self.config.worker.batch_bytes):
                self.send(table, "upsert", chunk, batch, held)

    def ship_deletes(self, table: str, changes: list[Change], batch: Batch) -> None:
        """Map each gone row's key (a key the mapping refuses is dead-lettered) and send the deletes."""
        mapping = self.mappings[table]
        items = []
        for change in changes:
            try:
                items.append((change, mapping.map_key(change.key)))  # type: ignore[arg-type]
            except RowError as exc:
                batch.dead.append(DeadLetter(change, str(exc)))
        if items:
            self.send(table, "delete", items, batch)

    def hand_off(self, table: str, items: list[Held], batch: Batch) -> None:
        """Send again the rows refused for a unique value, now that the rest of the batch is in. Those refused
        again while two or more remain may be a cycle (rows swapping a value: PostgreSQL checks a non-deferrable
        unique constraint row by row, so no order works): they are deleted and inserted again, when no foreign key
        of the secondary points at the table. What is still refused is rejected (requeued a few times, like a
        foreign-key refusal, then dead-lettered)."""
        still: list[Held] = []
        self.send(table, "upsert", [(change, payload) for change, payload, _ in items], batch, still)
        if len(still) > 1 and self.may_reinsert(table):
            self.reinsert(table, still, batch)
            return
        for change, _, error in still:
            self.reject(table, change, error, batch)

    def may_reinsert(self, table: str) -> bool:
        """Whether deleting rows of `table` in the secondary touches nothing else: no foreign key points at it (a
        delete would cascade, set null or be refused). Unknown (the description cannot be read): no."""
        try:
            spec = self.target.describe()
        except TargetError:
            return False
        return self.mappings[table].target not in conflicts.referenced_tables(spec)

    def reinsert(self, table: str, items: list[Held], batch: Batch) -> None:
        """Delete these rows in the secondary, then upsert them: a cycle of unique values applied through a
        moment without them (readers of the secondary may see them missing for that long)."""
        mapping = self.mappings[table]
        removal, kept = Batch(), []
        keys = [(change, mapping.map_key(change.key)) for change, _, _ in items]  # type: ignore[arg-type]
        self.send(table, "delete", keys, removal, kept, holds=lambda error: True)  # type: ignore[arg-type]
        removed = {id(change) for change in removal.shipped}
        refused: list[Held] = []
        self.send(table, "upsert", [(c, p) for c, p, _ in items if id(c) in removed], batch, refused)
        for change, _, error in [*refused, *(held for held in items if id(held[0]) not in removed)]:
            self.reject(table, change, error, batch)  # not deleted (a trigger refused?): the values stay put
        if removed:
            self.observer.unique_cycle(table, len(removed))

    def send(self, table: str, op: str, items: list[tuple[Change, dict[str, object] | str]], batch: Batch,
             held: list[Held] | None = None,
             holds: Callable[[TargetError], bool] = lambda error: error.unique_violation) -> None:
        """Ship items; on a row error bisect until the failing rows are alone, and reject only those (a row refused
        for a reason `holds` goes to `held` when given, to be sent again later)."""
        if self.holds(table, "delete" if op == "delete" else "upsert"):
            return
        try:
            self.exchange(table, op, [payload for _, payload in items])
        except TargetError as error:
            if error.code == ONE_KEY_TWICE:  # PostgreSQL's casts made two keys one (`'1.0'` and `'1'` in numeric)
                pairs = batch.collided.setdefault(table, [])
                if len(items) == 2:
                    pairs.append((items[0][0].key, items[1][0].key))
            if error.kind == "row" and error.foreign_key and op == "upsert" and self.order_problem(table, items):
                with self.lock:  # parents first: the whole batch goes behind them, as it is (no bisection)
                    for change, _ in items:
                        self.fk_attempts[(table, change.key_text)] += 1
                batch.requeued += [change for change, _ in items]
                self.observer.requeued(table, len(items), "foreign key", error)
            elif error.kind == "row" and (required := self.unfed_column(table, error)) is not None:
                with self.lock:  # every row would be refused: the table's problem, not its rows'
                    self.halt(table, self.required_halt(table, required), error)
                    self.next_schema_check = time.monotonic() + self.config.worker.schema_recheck_interval
            elif error.kind == "row" and len(items) > 1:
                middle = len(items) // 2
                self.send(table, op, items[:middle], batch, held, holds)
                self.send(table, op, items[middle:], batch, held, holds)
            elif error.kind == "row" and held is not None and holds(error):
                held.append((items[0][0], items[0][1], error))
            elif error.kind == "row":
                self.reject(table, items[0][0], error, batch)
            elif error.kind in ("config", "auth", "schema"):  # auth here: the token could not be renewed
                halt = self.schema_halt(table, error) if error.kind == "schema" else Halt(error.kind, error.message)
                with self.lock:
                    self.halt(table, halt, error)
                    self.next_schema_check = time.monotonic() + self.config.worker.schema_recheck_interval
            else:
                if error.statement_timeout:
                    with self.lock:
                        self.batch_size = max(1, self.batch_size // 2)
                        self.clean_batches = 0
                    self.observer.batch_size_halved(table, self.batch_size)
                raise Interrupted(table, error) from None
            return
        batch.shipped += [change for change, _ in items]
        (batch.upserted if op == "upsert" else batch.deleted)[table] += len(items)
        if self.fk_attempts:
            with self.lock:
                for change, _ in items:
                    self.fk_attempts.pop((table, change.key_text), None)

    def exchange(self, table: str, op: str, payloads: list[dict[str, object] | str]) -> None:
        """One request; its failure is announced and raised as the TargetError the target classified."""
        mapping = self.mappings[table]
        try:
            if op == "upsert":
                self.target.upsert(mapping.target, mapping.target_key, payloads)
            else:
                self.target.delete(mapping.target, mapping.target_key, payloads)
        except TargetError as error:
            if not error.foreign_key:  # a matter of order until proven otherwise: a requeue, or a dead letter
                self.observer.exchange_failed(table, error)
            raise

    def reject(self, table: str, change: Change, error: TargetError, batch: Batch) -> None:
        """A row the secondary refused: requeue it behind its parent or behind the row that holds its unique value
        (an FK or unique refusal, a bounded number of times), else dead-letter it with the reason."""
        with self.lock:
            attempts = self.fk_attempts[(table, change.key_text)]
            if (error.foreign_key or error.unique_violation) and attempts < self.config.worker.fk_retries:
                self.fk_attempts[(table, change.key_text)] += 1
                batch.requeued.append(change)  # behind its parent, which may still be queued
                self.observer.requeued(table, 1, "foreign key" if error.foreign_key else "unique value", error)
                return
            self.fk_attempts.pop((table, change.key_text), None)
        fix = HINT_UNIQUE_HANDOFF if error.unique_violation else "fix the cause"
        message = (f"table {table!r} key {change.key!r}: {error.message}; {fix}, then run: "
                   f"syncd replay --dead-letters --table {table}")
        batch.dead.append(DeadLetter(change, message, error.status, error.code))
        if error.foreign_key:
            self.observer.exchange_failed(table, error)  # requeues are not failures; a row refused for good is
        self.observer.row_dead_lettered(table, error)

    # -- halts ----------------------------------------------------------------------------------------------

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

    def hold_dependents(self) -> None:
        """The changes that wait on a halted table wait with it and resume with it: the deletes of its foreign-key
        ancestors (a parent's delete needs its children's deletes to land first) and the upserts of its descendants
        (a child's upsert needs its parent's), as SQLite's foreign keys and `after` relate them; shipped now, they
        would be refused (23503) and, after `fk_retries`, dead-lettered though nothing is wrong with them. A held
        change stays in the outbox, unclaimed, until the halt ends (then the claims start over: `reset_floor`)."""
        with self.lock:
            waits: dict[str, dict[str, str]] = {}
            for blocker in sorted(self.halted):
                for op, tables in (("delete", self.ancestors.get(blocker, ())),
                                   ("upsert", self.descendants.get(blocker, ()))):
                    for table in sorted(tables):
                        if table not in self.halted and table in self.mappings:
                            waits.setdefault(table, {}).setdefault(op, blocker)
            before, self.waits = self.waits, waits
        if waits != before:
            self.observer.changes_waiting(waits)
        if any(op not in waits.get(table, {}) for table, ops in before.items() for op in ops):
            self.reset_floor()  # held changes ship again: claim them

    def holds(self, table: str, op: str) -> bool:
        """Whether `op` (upsert, delete) of `table` waits for a halted table (see `hold_dependents`)."""
        return table in self.halted or op in self.waits.get(table, {})

    def unhalt(self, tables: Sequence[str], why: str) -> None:
        """These tables ship again, and what waited for them (the file's record follows at `record_halts`)."""
        with self.lock:
            for table in tables:
                self.halted.pop(table, None)
        self.observer.tables_resumed(list(tables), why)
        if tables:
            self.reset_floor()  # their entries may lie below where the claims start now
        self.hold_dependents()

    def record_halts(self) -> None:
        """Make the halts recorded in the file (for `status`) those in force, writing only what differs. At the
        first turn what a previous run recorded is cleared: a restart resumes every table."""
        if self.recorded is None or self.recorded_waits is None:
            states = {t.name: outbox.table_state(self.conn, t.name) for t in self.config.tables}
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
        outbox.record_table_states(self.conn, updates)
        self.recorded, self.recorded_waits = wanted, waits

    def resume(self) -> None:
        """Ship every halted table again (SIGHUP, after the operator fixed the cause)."""
        self.unhalt(list(self.halted), "SIGHUP")

    def plan_columns(self) -> None:
        """The columns each table ships as its schema is now. A table that gained columns since it was last planned
        (an ALTER TABLE ADD COLUMN) is marked for a reconcile: SQLite gives the rows already there the column's
        DEFAULT, which the secondary, adding the column on its side, may not hold. What was planned is kept in the
        table's state, so that a column added while syncd was stopped, killed or standing by counts too."""
        self.shipped = {t: schema.shipped_columns(self.conn, m) for t, m in self.mappings.items()}
        updates: dict[str, dict[str, object]] = {}
        for table, shipped in self.shipped.items():
            before = outbox.table_state(self.conn, table).get("columns")
            if before == shipped.names:
                continue
            updates[table] = {"columns": shipped.names}
            added = [c for c in shipped.names if c not in before] if isinstance(before, list) else []
            if added:
                updates[table]["reconcile"] = (
                    f"column(s) {', '.join(map(repr, added))} added: the rows already there took their default in "
                    "SQLite, which the secondary may not hold")
        outbox.record_table_states(self.conn, updates)

    def describe_secondary(self) -> dict[str, object] | None:
        """PostgREST's OpenAPI description of the secondary; None when it cannot be read (it is down)."""
        try:
            return self.target.describe()
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
            mismatch = schema.compare(spec, self.mappings[table], self.shipped[table], self.config.target.schema_name)
            if mismatch is not None:
                found[table] = mismatch
        return found

    def halt_schema_mismatches(self) -> None:
        """Before the first request (and whenever the tables are planned again): halt each table whose shipped
        columns the secondary lacks, with the exact fix, so that not one of its rows is sent to be refused."""
        found = self.mismatches([t for t in self.mappings if t not in self.halted]) or {}
        for table, mismatch in found.items():
            denied = self.denied(table) if mismatch.missing_table else None
            self.halt(table, denied or Halt("schema", mismatch.describe()))
        if found:
            self.next_schema_check = time.monotonic() + self.config.worker.schema_recheck_interval

    def denied(self, table: str) -> Halt | None:
        """For a table missing from PostgREST's description: the halt for a key whose role may not use it, when a
        read of it says so (PostgREST describes only the tables the request's role may use, so a table out of a
        key's reach looks missing); None when it is missing indeed (or the read says nothing more)."""
        try:
            self.target.ping(self.mappings[table].target)
        except TargetError as error:
            if error.kind == "config":
                return Halt("config", error.message)
        return None

    def order_problem(self, table: str, items: list[tuple[Change, dict[str, object] | str]]) -> bool:
        """Whether a batch of upserts that a foreign key refused (23503) is most likely early rather than wrong: the
        table has a parent among the synced tables, and none of its keys has used up its `fk_retries` yet. Such a
        batch is requeued whole (its parents, enqueued before it or claimed beside it, land first); once its keys
        have been requeued that often, it is bisected and only the rows whose parent is missing go to the dead
        letters. Decided without SQLite: it may run on a shipping thread."""
        if not self.ancestors.get(table):
            return False
        with self.lock:
            return all(self.fk_attempts[(table, change.key_text)] < self.config.worker.fk_retries
                       for change, _ in items)

    def unfed_column(self, table: str, error: TargetError) -> str | None:
        """The column a 23502 (not-null violation) names when syncd does not send it: the secondary requires a
        column the mapping never fills, so PostgreSQL refuses every upsert (it checks NOT NULL on the INSERT half of
        INSERT ... ON CONFLICT before the conflict, an update of a row that holds a value included). None for a
        23502 on a column syncd sends (that row's NULL: a row error)."""
        if error.code != "23502":
            return None
        named = NOT_NULL_COLUMN.search(error.message)
        if named is None or named[1] in self.shipped[table].names:
            return None
        return named[1]

    def required_halt(self, table: str, column: str) -> Halt:
        """The halt for the secondary's NOT NULL `column` that syncd does not send, with the fixes."""
        mapping = self.mappings[table]
        target = f"{quote_ident(self.config.target.schema_name)}.{quote_ident(mapping.target)}"
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

    def recheck_schema_halts(self) -> None:
        """While a table is halted for a schema mismatch, read the secondary's schema every
        `schema_recheck_interval` seconds and resume the tables whose columns it now has."""
        waiting = [t for t, h in self.halted.items() if h.kind == "schema" and t in self.mappings]
        now = time.monotonic()
        if not waiting or now < self.next_schema_check:
            return
        self.next_schema_check = now + self.config.worker.schema_recheck_interval
        spec = self.describe_secondary()
        if spec is None:
            return  # the secondary is unreachable: the halt stays, the next check comes
        found = self.mismatches(waiting, spec)
        matching = [t for t in waiting if t not in found and self.fillable(t, spec, now)]
        if matching:
            self.unhalt(matching, "the secondary's schema matches again")

    def fillable(self, table: str, spec: Mapping[str, object], now: float) -> bool:
        """Whether the NOT NULL columns a table was halted for (if any) can be left to the secondary now: gone,
        nullable, or with a default in its description. PostgREST's description leaves out the defaults it does not
        show (a sequence's nextval, a generated column: measured on 12.2.12), so every REQUIRED_RETRY seconds the
        table is resumed anyway, and the next upsert tells."""
        halt = self.halted.get(table)
        if halt is None or not halt.required:
            return True
        if now - self.halted_at.get(table, now) >= REQUIRED_RETRY:
            return True
        definitions = spec.get("definitions")
        definition = definitions.get(self.mappings[table].target) if isinstance(definitions, dict) else None
        if not isinstance(definition, dict):
            return True  # the table is gone there: its own mismatch says so
        properties = definition.get("properties") or {}
        required = definition.get("required") or []
        return all(column not in properties or column not in required or "default" in properties[column]
                   for column in halt.required)

    # -- when idle ----------------------------------------------------------------------------------------

    def probe_when_idle(self) -> None:
        """An idle daemon still tells whether the secondary answers (/readyz, syncd_target_up): a read of
        no rows when nothing was exchanged for PROBE_EVERY seconds (PROBE_RETRY while it fails)."""
        now = time.monotonic()
        if now < self.next_probe:
            return
        if not self.prepared:
            self.prepare()
        table = next((t for t in self.order if t not in self.halted), None)
        if table is None:
            return
        try:
            self.target.ping(self.mappings[table].target)
        except TargetError as error:
            self.next_probe = now + PROBE_RETRY
            self.observer.secondary_checked(table, error)
            return
        self.next_probe = now + PROBE_EVERY
        self.observer.secondary_checked(table, None)

    def housekeeping(self) -> None:
        """Measure the backlog and expire old journal rows, now and then (both scan tables: a backlog of millions
        is measured less often, so that counting it never takes more than a tenth of the loop's time)."""
        now = time.time()
        if now >= self.next_housekeeping:
            self.observer.backlog(self.mappings, outbox.pending_by_table(self.conn),
                                  outbox.dead_letters_by_table(self.conn), now)
            took = time.time() - now
            self.next_housekeeping = time.time() + max(HOUSEKEEPING_EVERY, 10 * took)
        if now >= self.next_journal_expiry:
            self.next_journal_expiry = now + JOURNAL_EXPIRY_EVERY
            outbox.expire_journal(self.conn, now - self.config.worker.journal_retention_days * 86400)


SOURCE_FAULTS = (apsw.BusyError, apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CantOpenError)


def fault_kind(exc: Exception) -> str:
    """busy | full | readonly | io: the kind of a fault of the application's file."""
    if isinstance(exc, apsw.BusyError):
        return "busy"
    if isinstance(exc, apsw.FullError):
        return "full"
    if isinstance(exc, apsw.ReadOnlyError):
        return "readonly"
    return "io"


def fault_problem(kind: str, exc: Exception, lasting: float) -> str:
    """The operator message for a fault of the application's file, lasting `lasting` seconds so far."""
    if kind == "busy":
        return (f"the application has held the database's write lock for {lasting:.0f} s: syncd waits (nothing is "
                "lost); a long migration or batch job?")
    if kind == "full":
        return (f"the disk holding the database is full ({lasting:.0f} s): syncd cannot record what it shipped and "
                "retries (nothing is lost); free disk space")
    if kind == "readonly":
        return (f"the database file is read-only for syncd ({lasting:.0f} s): give syncd's user write access to "
                "the file and its directory (syncd retries; nothing is lost)")
    return f"I/O error on the database file ({lasting:.0f} s): {exc}; check the disk (syncd retries)"


class WaitFn(Protocol):
    """How the loop sleeps between drains: called with (timeout in seconds, stop), it returns at the timeout or
    earlier, on a change, a wake-up or `stop` (`Waker.wait`, `wait_on`)."""

    def __call__(self, timeout: float, stop: threading.Event) -> None: ...


def wait_on(stop: threading.Event) -> WaitFn:
    """A WaitFn that only waits for `stop` or the timeout (no wake-up source)."""

    def wait(timeout: float, _stop: threading.Event) -> None:
        stop.wait(timeout)

    return wait


def ship_order(conn: apsw.Connection, config: Config, tables: list[str]) -> list[str]:
    """Parents before children: SQLite's declared foreign keys plus each table's `after` list."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    known = {t.lower(): t for t in tables}
    for table in tables:
        parents = {known[r[2].lower()] for r in conn.execute(f"PRAGMA foreign_key_list({quote_ident(table)})")
                   if r[2].lower() in known and known[r[2].lower()] != table}
        table_config = config.table(table)
        parents |= {known[a.lower()] for a in (table_config.after if table_config else []) if a.lower() in known}
        sorter.add(table, *sorted(parents))
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
        seen, todo = set(), [start]
        while todo:
            for other in edges.get(todo.pop(), ()):
                if other not in seen and other != start:
                    seen.add(other)
                    todo.append(other)
        reached[start] = seen
    return reached


def relatives(conn: apsw.Connection, config: Config, tables: list[str]) -> dict[str, set[str]]:
    """{table: every table it is a parent or child of, directly or not} by SQLite's declared foreign keys and each
    table's `after` list: batches holding related tables are not in flight together."""
    known = {t.lower(): t for t in tables}
    edges: dict[str, set[str]] = {t: set() for t in tables}
    for table in tables:
        parents = {known[r[2].lower()] for r in conn.execute(f"PRAGMA foreign_key_list({quote_ident(table)})")
                   if r[2].lower() in known and known[r[2].lower()] != table}
        table_config = config.table(table)
        parents |= {known[a.lower()] for a in (table_config.after if table_config else []) if a.lower() in known}
        for parent in parents:
            edges[table].add(parent)
            edges[parent].add(table)
    closure: dict[str, set[str]] = {}
    for table in tables:
        seen, todo = set(), [table]
        while todo:
            for other in edges[todo.pop()]:
                if other not in seen and other != table:
                    seen.add(other)
                    todo.append(other)
        closure[table] = seen
    return closure


def moving_average(average: float, sample: float) -> float:
    """An exponential moving average over about 8 samples; the first sample alone when there is none yet."""
    return sample if average <= 0 else average + (sample - average) / 8


def by_size(items: list[tuple[Change, dict[str, object] | str]], limit: int
            ) -> Iterator[list[tuple[Change, dict[str, object] | str]]]:
    """`items` in consecutive chunks whose JSON stays under about `limit` bytes (a row over it goes alone)."""
    chunk: list[tuple[Change, dict[str, object] | str]] = []
    size = 0
    for item in items:
        payload = item[1]
        weight = len(payload) if isinstance(payload, str) else sum(
            len(name) + weigh(value) for name, value in payload.items())
        if chunk and size + weight > limit:
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += weight + 1
    if chunk:
        yield chunk


def weigh(value: object) -> int:
    """About how many bytes of JSON a mapped value takes: exact for text, a JSON document's own length (a `json`
    column may hold megabytes), 24 for a number, a bool or null."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, JsonText):
        return len(value.text)
    if isinstance(value, dict | list):
        return len(json.dumps(value, default=str))
    return 24


def target_keys(mapping: TableMapping) -> Callable[[Change], tuple[object, ...] | None]:
    """The function giving the key a change has in the secondary, as it will be sent (None when it cannot be
    mapped): its SQLite key as it is, unless a key column has a transform (decided once per batch, not per row)."""
    def transformed(change: Change) -> tuple[object, ...] | None:
        try:
            return tuple(mapping.map_key(change.key).values()) if change.key is not None else None
        except (RowError, ValueError):
            return None

    if any(column in mapping.transforms for column in mapping.key):
        return transformed
    return lambda change: change.key
