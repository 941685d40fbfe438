"""The drain loop (DESIGN.md, "The drain loop, as a story"): wait, claim, map, ship, classify, acknowledge,
observe.

`drain_once` does one batch and returns what it did; `run` repeats it with the lease held, backs off
when the secondary fails as a whole, and sleeps until the database changes. Row failures are carried by
the rows (bisected down to the bad ones and dead-lettered); failures of the secondary are carried by the
loop (no row is blamed). Only claimed entries are ever acknowledged, and only after a 2xx, in one short
write transaction together with the dead letters and the journal. What happened is announced to the
`Observer` (metrics, health, logs); failures arrive already classified by `syncd.target`.
"""

from __future__ import annotations

import graphlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import apsw

from syncd import backoff, capture, outbox
from syncd.config import Config
from syncd.lease import Lease, LeaseHeld
from syncd.logs import get_logger
from syncd.mapping import RowError, TableMapping
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.outbox import Change, DeadLetter
from syncd.sqlite import quote_ident
from syncd.target import TargetError

HOUSEKEEPING_EVERY = 2.0
JOURNAL_EXPIRY_EVERY = 300.0
REGROW_AFTER = 20  # clean batches before a batch size halved by a statement timeout doubles again
PROBE_EVERY = 30.0  # seconds without an exchange before an idle daemon checks that the secondary answers
PROBE_RETRY = 5.0  # ... and while it does not
BUSY_BACKOFF_FAILURES = 2  # the backoff step used while the app holds the write lock


class Target(Protocol):
    """A secondary that can upsert rows and delete keys (`syncd.target.PostgrestTarget` is the real one).
    Every failure is a TargetError, already classified; an expired token is renewed inside."""

    def upsert(self, table: str, key: Sequence[str], rows: Sequence[dict[str, object]]) -> None:
        """Insert or update `rows` ({column: value}) of `table` by its `key` columns, all or none."""
        ...

    def delete(self, table: str, key: Sequence[str], keys: Sequence[dict[str, object]]) -> int:
        """Delete the rows of `table` whose `key` columns hold these values ({key column: value} each); the
        number of requests it took."""
        ...

    def ping(self, table: str) -> None:
        """Read no rows of `table`: returns when the secondary answers, raises TargetError when not."""
        ...


class Interrupted(Exception):
    """The secondary failed as a whole (transient): the batch stops, what shipped is acknowledged."""

    def __init__(self, table: str, error: TargetError) -> None:
        super().__init__(f"{table}: {error.message}")
        self.table = table
        self.error = error


@dataclass
class Batch:
    """What shipping one batch decided, key by key: acknowledged, dead-lettered, requeued; tables halted."""

    shipped: list[Change] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    requeued: list[Change] = field(default_factory=list)
    upserted: Counter[str] = field(default_factory=Counter)
    deleted: Counter[str] = field(default_factory=Counter)
    halts: list[tuple[str, str]] = field(default_factory=list)  # (table, reason)


@dataclass
class Shipment:
    """One batch on its way: claimed on the loop's thread, shipped (maybe on another), finished back."""

    changes: list[Change]
    claimed: int
    started: float = field(default_factory=time.monotonic)
    batch: Batch = field(default_factory=Batch)
    interrupted: Interrupted | None = None


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


class Worker:
    """Drains one database file's outbox to one secondary, announcing what happens to `observer`.
    Raises CaptureError when a configured table cannot be captured."""

    def __init__(self, conn: apsw.Connection, config: Config, target: Target, observer: Observer) -> None:
        self.conn = conn
        self.config = config
        self.target = target
        self.observer = observer
        self.mappings = {}
        for table_config in config.tables:
            planned = capture.plan_table(conn, table_config)
            self.mappings[planned.table.name] = TableMapping.from_config(table_config, planned.key)
        self.order = ship_order(conn, config, list(self.mappings))
        self.lease = Lease(conn, config.worker.lease_seconds)
        self.batch_size = config.worker.batch_size
        self.halted: dict[str, str] = {}
        self.fk_attempts: Counter[tuple[str, str | bytes]] = Counter()
        self.clean_batches = 0
        self.next_housekeeping = 0.0
        self.next_journal_expiry = 0.0
        self.next_probe = 0.0
        self.resume_requested = threading.Event()
        self.shipper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="syncd-ship")

    @property
    def metrics(self) -> Metrics:
        """The observer's metrics: the registry and the health."""
        return self.observer.metrics

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, wait: WaitFn | None = None, once: bool = False) -> None:
        """Drain while holding the lease until `stop` is set (with `once`: until the outbox is empty)."""
        self.resume()
        failures = 0
        while not stop.is_set():
            self.observer.heartbeat()
            self.resume_if_requested()
            try:
                if not self.hold_lease(stop):
                    continue
                result = self.drain(stop, between=lambda: self.between_batches(stop))
            except Interrupted as exc:
                failures += 1
                self.back_off(exc, failures, stop)
                continue
            except apsw.BusyError:
                # The app held the write lock past the busy timeout: what shipped was not acknowledged and
                # ships again (idempotent). Never a reason to stop.
                self.observer.database_busy()
                stop.wait(backoff.delay(BUSY_BACKOFF_FAILURES, cap=self.config.worker.max_backoff))
                continue
            if failures:
                self.observer.secondary_recovered(failures)
                failures = 0
            self.housekeeping()
            if once and result.claimed == 0:
                break
            if once:
                continue
            if result.claimed == 0:
                self.probe_when_idle()
            (wait or wait_on(stop))(self.config.worker.poll_interval, stop)
        self.lease.release()

    def hold_lease(self, stop: threading.Event) -> bool:
        """Keep the lease; while another daemon holds it, stand by (False) for a third of its lifetime."""
        try:
            self.lease.keep()
            return True
        except LeaseHeld as held:
            self.observer.standing_by(held.holder.host if held.holder else None,
                                      held.holder.pid if held.holder else None)
            stop.wait(self.lease.retry_after)
            return False

    def between_batches(self, stop: threading.Event) -> bool:
        """During a long drain: stay alive, keep the lease (or stop draining), refresh the gauges."""
        self.observer.heartbeat()
        self.housekeeping()
        return not stop.is_set() and self.hold_lease(stop)

    def back_off(self, exc: Interrupted, failures: int, stop: threading.Event) -> None:
        """The secondary failed as a whole: wait (capped exponential backoff, full jitter, Retry-After)."""
        pause = backoff.delay(failures, cap=self.config.worker.max_backoff, retry_after=exc.error.retry_after)
        self.observer.secondary_failed(exc.table, exc.error, failures, pause)
        stop.wait(pause)

    # -- the drain step: claim, ship, acknowledge ------------------------------------------------------

    def drain_once(self) -> DrainResult:
        """Claim, ship and acknowledge one batch (raises Interrupted after acknowledging what shipped)."""
        shipment = self.claim()
        if shipment is None:
            return DrainResult()
        return self.finish(self.deliver(shipment))

    def drain(self, stop: threading.Event, between: Callable[[], bool] = lambda: True) -> DrainResult:
        """Ship batches until the outbox is empty, `stop` is set or `between` (called after each batch)
        says no. The next batch is claimed and its rows read while the previous one is in flight: its
        keys are excluded, so no key is ever in two requests at once, and the requests themselves still
        go out one batch after the other (parents-first order holds across batches)."""
        total = DrainResult()
        in_flight: tuple[Shipment, Future[Shipment]] | None = None
        try:
            while True:
                busy = in_flight[0].changes if in_flight else []
                upcoming = None if stop.is_set() else self.claim(busy)
                finished = in_flight is not None
                if in_flight is not None:
                    shipped, in_flight = in_flight[1].result(), None
                    total = total.plus(self.finish(shipped))  # raises Interrupted: `upcoming` is dropped
                    if not between():
                        return total
                if upcoming is None:
                    if finished:
                        continue  # changes may have been committed while that batch was in flight
                    return total
                in_flight = (upcoming, self.shipper.submit(self.deliver, upcoming))
        finally:
            if in_flight is not None:  # left early (busy database): never leave a request running behind us
                in_flight[1].result()

    def claim(self, in_flight: Sequence[Change] = ()) -> Shipment | None:
        """The next batch of the tables that are not halted, its keys' rows read from one snapshot."""
        active = {t: m.key for t, m in self.mappings.items() if t not in self.halted}
        changes = outbox.claim(self.conn, self.batch_size, active, in_flight)
        return Shipment(changes, sum(len(c.entries) for c in changes)) if changes else None

    def deliver(self, shipment: Shipment) -> Shipment:
        """Ship a claimed batch (touches no SQLite: it may run beside the next claim)."""
        try:
            self.ship(shipment.changes, shipment.batch)
        except Interrupted as exc:
            shipment.interrupted = exc
        return shipment

    def finish(self, shipment: Shipment) -> DrainResult:
        """Acknowledge and observe; then re-raise an interruption of the secondary."""
        batch, now = shipment.batch, time.time()
        outbox.acknowledge(self.conn, batch.shipped, batch.dead, batch.requeued, batch.halts, now=now)
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

    # -- ship: map, send, classify ----------------------------------------------------------------------

    def ship(self, changes: list[Change], batch: Batch) -> None:
        """Upserts parents first, then deletes children first, one table at a time."""
        batch.dead += [DeadLetter(c, c.problem) for c in changes if c.problem]
        by_table: dict[str, list[Change]] = {}
        for change in changes:
            if not change.problem:
                by_table.setdefault(change.table, []).append(change)
        for table in self.order:
            present = [c for c in by_table.get(table, []) if c.row is not None]
            if present and table not in self.halted:
                self.ship_upserts(table, present, batch)
        for table in reversed(self.order):
            gone = [c for c in by_table.get(table, []) if c.row is None]
            if gone and table not in self.halted:
                self.ship_deletes(table, gone, batch)

    def ship_upserts(self, table: str, changes: list[Change], batch: Batch) -> None:
        """Map the present rows of `table` and upsert them, one request per set of columns (PostgREST wants the same
        keys in every object of a request); a row the mapping refuses is dead-lettered."""
        mapping = self.mappings[table]
        groups: dict[tuple[str, ...], list[tuple[Change, dict[str, object]]]] = {}
        for change in changes:
            try:
                payload = mapping.map_row(change.row, change.key)  # type: ignore[arg-type]
            except RowError as exc:
                batch.dead.append(DeadLetter(change, str(exc)))
                continue
            groups.setdefault(tuple(payload), []).append((change, payload))  # PostgREST: same keys per request
        for items in groups.values():
            self.send(table, "upsert", items, batch)

    def ship_deletes(self, table: str, changes: list[Change], batch: Batch) -> None:
        """Map the keys of the rows gone from `table` and delete them in the secondary; a key the mapping refuses (a
        NULL in it) is dead-lettered."""
        mapping = self.mappings[table]
        items = []
        for change in changes:
            try:
                items.append((change, mapping.map_key(change.key)))  # type: ignore[arg-type]
            except RowError as exc:
                batch.dead.append(DeadLetter(change, str(exc)))
        if items:
            self.send(table, "delete", items, batch)

    def send(self, table: str, op: str, items: list[tuple[Change, dict[str, object]]], batch: Batch) -> None:
        """Ship items; on a row error bisect until the failing rows are alone, and reject only those."""
        if table in self.halted:
            return
        try:
            self.exchange(table, op, [payload for _, payload in items])
        except TargetError as error:
            if error.kind == "row" and len(items) > 1:
                middle = len(items) // 2
                self.send(table, op, items[:middle], batch)
                self.send(table, op, items[middle:], batch)
            elif error.kind == "row":
                self.reject(table, items[0][0], error, batch)
            elif error.kind in ("config", "auth"):  # auth here: the token could not be renewed
                self.halt(table, error, batch)
            else:
                if error.statement_timeout:
                    self.batch_size = max(1, self.batch_size // 2)
                    self.clean_batches = 0
                    self.observer.batch_size_halved(table, self.batch_size)
                raise Interrupted(table, error) from None
            return
        batch.shipped += [change for change, _ in items]
        (batch.upserted if op == "upsert" else batch.deleted)[table] += len(items)
        for change, _ in items:
            self.fk_attempts.pop((table, change.key_text), None)

    def exchange(self, table: str, op: str, payloads: list[dict[str, object]]) -> None:
        """One request; its failure is announced and raised as the TargetError the target classified."""
        mapping = self.mappings[table]
        try:
            if op == "upsert":
                self.target.upsert(mapping.target, mapping.target_key, payloads)
            else:
                self.target.delete(mapping.target, mapping.target_key, payloads)
        except TargetError as error:
            self.observer.exchange_failed(table, error)
            raise

    def reject(self, table: str, change: Change, error: TargetError, batch: Batch) -> None:
        """A row the secondary refused: requeue it behind its parent (an FK refusal, a bounded number of
        times), else dead-letter it with the reason."""
        attempts = self.fk_attempts[(table, change.key_text)]
        if error.foreign_key and attempts < self.config.worker.fk_retries:
            self.fk_attempts[(table, change.key_text)] += 1
            batch.requeued.append(change)  # behind its parent, which may still be queued
            return
        self.fk_attempts.pop((table, change.key_text), None)
        message = (f"table {table!r} key {change.key!r}: {error.message}; fix the cause, then run: "
                   f"syncd replay --dead-letters --table {table}")
        batch.dead.append(DeadLetter(change, message, error.status, error.code))
        self.observer.row_dead_lettered(table, error)

    def halt(self, table: str, error: TargetError, batch: Batch) -> None:
        """Stop shipping one table (bad key, RLS denial, missing table): capture goes on, nothing is lost."""
        self.halted[table] = error.message
        batch.halts.append((table, error.message))
        self.observer.table_halted(table, error)

    def resume_if_requested(self) -> None:
        """SIGHUP asked for a resume: acted on here, on the thread that owns the connection."""
        if self.resume_requested.is_set():
            self.resume_requested.clear()
            self.resume()

    def resume(self) -> None:
        """Ship halted tables again (SIGHUP, or a restart, after the operator fixed the cause)."""
        self.observer.tables_resumed(list(self.halted))
        self.halted.clear()
        outbox.clear_halts(self.conn, self.mappings)

    # -- when idle ----------------------------------------------------------------------------------------

    def probe_when_idle(self) -> None:
        """An idle daemon still tells whether the secondary answers (/readyz, syncd_target_up): a read of
        no rows when nothing was exchanged for PROBE_EVERY seconds (PROBE_RETRY while it fails)."""
        now = time.monotonic()
        table = next((t for t in self.order if t not in self.halted), None)
        if now < self.next_probe or table is None:
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
        """Measure the backlog and expire old journal rows, now and then (both scan tables)."""
        now = time.time()
        if now >= self.next_housekeeping:
            self.next_housekeeping = now + HOUSEKEEPING_EVERY
            self.observer.backlog(self.mappings, outbox.pending_by_table(self.conn),
                                  outbox.dead_letters_by_table(self.conn), now)
        if now >= self.next_journal_expiry:
            self.next_journal_expiry = now + JOURNAL_EXPIRY_EVERY
            outbox.expire_journal(self.conn, now - self.config.worker.journal_retention_days * 86400)


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
