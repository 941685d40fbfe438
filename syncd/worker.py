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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import apsw

from syncd import backoff, outbox
from syncd.config import Config, ConfigError
from syncd.flush import Flush
from syncd.halts import Halt, Halts
from syncd.keeper import CaptureKeeper
from syncd.lease import Lease, LeaseHeld
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.plan import Plan
from syncd.reconcile import Reconciler
from syncd.settings import Settings, Target
from syncd.shipping import Interrupted, Shipper
from syncd.snapshot import SnapshotRefused, Snapshots
from syncd.source import Source
from syncd.sqlite import FileMoved, SchemaMoved
from syncd.timers import Timers
from syncd.watch import GONE_POLL, SOURCE_FAULTS, Seen, SourceGone, SourceWatch
from syncd.window import Shipment, Window

__all__ = ["RESTART_KEYS", "DrainResult", "Pause", "SourceGone", "WaitFn", "Worker", "wait_on"]

# What a SIGHUP cannot change in a running daemon (a thread may lower its own priority, never raise it again).
RESTART_KEYS = frozenset({"source.path", "worker.metrics_addr", "worker.nice"})


@dataclass(frozen=True)
class Pause:
    """How long the loop waits before its next turn (seconds); `wakeable`: a change of the file or a wake-up
    (SIGUSR1) ends the wait sooner (the idle wait), else only `stop` does (a backoff, standing by)."""

    seconds: float
    wakeable: bool = False


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
    """Drains one database file's outbox to one secondary, announcing what happens to `observer`; keeps capture
    in step with the file as it changes (migrations, restores), and waits out locks and disk faults.

    The unit of one file, composed of its owners: the source and its lease, the tables as planned (`plan`), capture
    kept whole and replaced files adopted (`keeper`, which also owns the schema halts), the halts (`halts`), the
    in-flight window (`window`), the flush of the app's file (`flush`), the source watch (`watch`), the timers
    (`timers`) and the shipping of batches (`shipping`). What it may share with the units of other files: the target
    (in `settings`), the shipping threads (`pool`, kept by `shipping`) and the metrics registry (through
    `observer`).

    `reconciler` reconciles tables whose capture had a gap (None: only marked, as in unit tests); `reload` (SIGHUP)
    reads the configuration and builds a target anew, raising ConfigError when the configuration is bad;
    `among_files`: its thread takes turns among many files (multi-file mode; see Flush's `shared`)."""

    def __init__(self, source: Source, config: Config, target: Target, observer: Observer, *,
                 reconciler: Reconciler | None = None,
                 reload: Callable[[], tuple[Config, Target]] | None = None,
                 pool: ThreadPoolExecutor | None = None, among_files: bool = False) -> None:
        self.source = source
        self.settings = Settings(config, target, reload)
        self.observer = observer
        self.lease = Lease(source.conn, config.worker.lease_seconds, metrics=config.worker.metrics_addr)
        self.plan = Plan()
        self.window = Window()
        self.halts = Halts(self.plan, observer, resumed=self.tables_resumed)
        self.flush = Flush(source, observer, self.window, shared=among_files)
        self.keeper = CaptureKeeper(source, self.settings, observer, self.plan, self.halts, self.flush, self.window,
                                    reconciler)
        self.shipping = Shipper(self.plan, self.halts, self.keeper.schema_halts, self.settings, observer,
                                pool or ThreadPoolExecutor(max_workers=config.worker.max_in_flight,
                                                           thread_name_prefix="syncd-ship"))
        self.snapshots = Snapshots(source, self.plan, self.halts, self.settings, observer, self.shipping,
                                   prepared=self.planned, replan=self.replan, keep_lease=lambda: self.lease.keep())
        self.watch = SourceWatch(source, observer, self.settings)
        self.timers = Timers(self.plan, self.settings, observer)
        self.holding = False  # this daemon held the lease at its last look
        self.failures = 0  # turns in a row the secondary failed as a whole
        self.last_claimed = 0  # outbox entries the last turn claimed
        self.refused: SnapshotRefused | None = None  # why `run --once` gave up: the secondary refused a snapshot

    def planned(self) -> bool:
        """Plan the tables when they are not (False: the app is changing its schema right now)."""
        if not self.keeper.prepared:
            self.keeper.prepare()
        return self.keeper.prepared

    def replan(self) -> None:
        """The app changed its schema since the plan: plan again before the next read."""
        self.keeper.prepared = False

    def tables_resumed(self) -> None:
        """Changes held back may ship again: claims start from the first seq, and reconciles in backoff are tried
        at once (changes may wait for them)."""
        self.window.reset_floor()
        if self.keeper.reconciler is not None:
            self.keeper.reconciler.retry_now()

    @property
    def conn(self) -> apsw.Connection:
        """The connection to the application's file (a new one after the file was replaced)."""
        return self.source.conn

    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def target(self) -> Target:
        return self.settings.target

    @property
    def metrics(self) -> Metrics:
        return self.observer.metrics

    @property
    def halted(self) -> dict[str, Halt]:
        """table -> why it does not ship (see `Halts`)."""
        return self.halts.halted

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, wait: WaitFn | None = None, once: bool = False) -> None:
        """Drain while holding the lease until `stop` is set (with `once`: until the outbox is empty and every
        reconcile done). Raises SourceGone when the file is gone for good; any other exception is a bug."""
        while not stop.is_set():
            pause = self.turn(stop, once)
            if pause is None:
                break
            if pause.wakeable:
                (wait or wait_on(stop))(pause.seconds, stop)
            elif pause.seconds > 0:
                stop.wait(pause.seconds)
        self.close_out()

    def turn(self, stop: threading.Event, once: bool = False, *, slice_seconds: float | None = None) -> Pause | None:
        """One turn of the loop: follow the file, hold the lease, drain (for at most `slice_seconds` when given:
        multi-file mode takes turns among files), flush, keep house. Returns how long to wait before the next turn
        (`Pause.wakeable`: a change of the file or a wake-up may end it sooner), or None when `once` is done (or a
        snapshot was refused). Raises SourceGone when the file is gone for good; any other exception is a bug."""
        self.observer.heartbeat()
        try:
            self.reload_if_requested()
            if not self.follow_source(stop):
                return Pause(0.0)
            if not self.hold_lease(stop):
                return Pause(self.lease.retry_after)
            self.keeper.keep_whole()
            ends = None if slice_seconds is None else time.monotonic() + slice_seconds
            result = self.drain(stop, between=lambda: self.between_batches(stop)
                                and (ends is None or time.monotonic() < ends))
            if self.keeper.replaced:
                return Pause(0.0)  # adopt the file (under the lease) before anything else touches it
            self.flush_when_due(final=once and result.claimed == 0)
            self.keeper.record_halts()
            self.timers.housekeeping(self.conn)
            if result.claimed == 0 and not once:
                self.probe_when_idle()
            self.source_usable()
        except Interrupted as exc:
            self.failures += 1
            if once and isinstance(exc, SnapshotRefused):  # no retry fixes it by itself: say so and end
                self.observer.snapshot_refused(exc.error, self.failures, None)
                self.refused = exc
                return None
            return Pause(self.back_off(exc, self.failures))
        except FileMoved as exc:
            # A commit or checkpoint refused, nothing written: the file was replaced (or its WAL index lost)
            # after this turn's look at it. The next turn notices it and reads the file anew.
            self.observer.log.info("a write to the database file was refused: it is no longer the file syncd "
                                   "has open", detail=str(exc))
            return Pause(GONE_POLL)
        except SOURCE_FAULTS as exc:
            # The app held the write lock past the busy timeout, or the disk refused: nothing shipped since
            # the last acknowledgement is lost (it ships again). Never a reason to stop.
            return Pause(self.watch.fault_pause(exc))
        if self.failures:
            self.observer.secondary_recovered(self.failures)
            self.failures = 0
        self.last_claimed = result.claimed
        if once and result.claimed == 0:
            if self.flush.requeued_keys:  # the final flush put them back at the tail: drain on
                self.flush.requeued_keys = 0
                return Pause(0.0)
            reconciler = self.keeper.reconciler
            if reconciler is None or not reconciler.busy():
                return None
            reconciler.run_pending(stop)
            return Pause(0.0)
        if once or result.more:
            return Pause(0.0)
        return Pause(self.flush.due_in(self.config.worker.poll_interval), wakeable=True)

    def close_out(self) -> None:
        """The loop ends: apply what was acknowledged to the app's file, and give the lease up. A daemon that does not
        hold the lease applies nothing: the acknowledgements in the state file are the holder's, and a flush of them
        behind its back could empty the outbox, after which SQLite hands out seqs the holder's claims have passed."""
        with contextlib.suppress(*SOURCE_FAULTS, FileMoved):
            if not (self.holding and self.lease.ours()):
                return
        self.flush.on_the_way_out(lambda final: self.flush_when_due(final=final))
        with contextlib.suppress(*SOURCE_FAULTS, FileMoved):
            self.lease.release()  # when the file refuses, the lease expires by itself

    def hold_lease(self, stop: threading.Event) -> bool:
        """Keep the lease; False while another daemon holds it (the turn then stands by for a third of its
        lifetime)."""
        self.source.configure()  # the lease lives in the state file
        try:
            self.lease.keep()
        except LeaseHeld as held:
            self.holding = False
            self.observer.standing_by(held.holder.host if held.holder else None,
                                      held.holder.pid if held.holder else None)
            return False
        if not self.holding:  # taken now (at start, or over from another daemon): is this the file it left?
            self.holding = True
            self.keeper.look_for_discontinuity(thorough=True)
        self.observer.holding_lease()
        return True

    def between_batches(self, stop: threading.Event) -> bool:
        """During a long drain: stay alive, refresh the gauges, and stop draining (the loop acts, then drains on)
        when asked to stop, the file or its schema changed, SIGHUP came, or the lease is lost."""
        self.observer.heartbeat()
        self.flush_when_due()
        self.timers.housekeeping(self.conn)
        return (not stop.is_set() and self.follow_source(stop) and self.keeper.prepared
                and not self.keeper.replaced and not self.settings.requested.is_set() and self.hold_lease(stop))

    def back_off(self, exc: Interrupted, failures: int) -> float:
        """The secondary failed as a whole: the seconds to wait (capped exponential backoff, full jitter,
        Retry-After), announced."""
        pause = backoff.delay(failures, cap=self.config.worker.max_backoff, retry_after=exc.error.retry_after)
        if isinstance(exc, SnapshotRefused):
            self.observer.snapshot_refused(exc.error, failures, pause)
        else:
            self.observer.secondary_failed(exc.table, exc.error, failures, pause)
        return pause

    def source_usable(self) -> None:
        """A turn of the loop used the file without a fault (a due flush still refused by the app's lock is one)."""
        self.watch.usable(flush_refused=self.flush.refused_since is not None)

    # -- the application's file: migrations, restores, SIGHUP ---------------------------------------------------

    def follow_source(self, stop: threading.Event) -> bool:
        """Notice what changed in the file since the last turn (`SourceWatch.look`): reopened -> adopting it is due
        (under the lease); schema changed -> plan again. False while there is no usable file; raises SourceGone
        when it has been gone for longer than the grace."""
        look = self.watch.look(stop)
        if look.seen is Seen.WAIT:
            return False
        if look.seen is Seen.REOPENED:
            self.lease = Lease(self.conn, self.config.worker.lease_seconds, holder=self.lease.holder,
                               metrics=self.lease.metrics)
            self.keeper.discontinued(look.reason)
            self.source.configure()  # the state file attached, as at start (raises apsw.BusyError: the loop waits)
            if self.watch.still_stale(stop):
                return False
        if look.seen is Seen.SCHEMA:
            self.keeper.prepared = False
            self.keeper.look_for_discontinuity()  # `sqlite3 .restore` into the open file changes its schema cookie
        return True

    def reload_if_requested(self) -> None:
        """SIGHUP: read the configuration and secrets again, rebuild the target, clear every halt, plan again.
        A configuration that fails to load keeps the old one (every problem logged); halts are cleared anyway."""
        if not self.settings.requested.is_set():
            return
        self.settings.requested.clear()
        self.keeper.prepared = False
        if self.settings.reload is not None:
            try:
                config, target = self.settings.reload()
            except ConfigError as exc:
                self.observer.reload_failed(exc.problems or [str(exc)])
            else:
                changed = self.settings.swap(config, target)
                self.shipping.batch_size = config.worker.batch_size
                self.observer.reloaded(changed, [key for key in changed if key in RESTART_KEYS])
        self.halts.resume()

    # -- the drain step: claim, ship, acknowledge ------------------------------------------------------

    def drain_once(self) -> DrainResult:
        """Claim, ship and acknowledge one batch, and apply it to the app's file at once (raises Interrupted after
        acknowledging what shipped). The loop defers that last step (`flush_when_due`); this is for callers that
        want one whole step."""
        if self.config.worker.consistency == "snapshot":
            try:
                return self.ship_snapshot()
            finally:
                self.flush_when_due(final=True)
        shipment = self.claim()
        if shipment is None:
            return DrainResult()
        try:
            return self.finish(self.deliver(shipment))
        finally:
            self.flush_when_due(final=True)

    def drain(self, stop: threading.Event, between: Callable[[], bool] = lambda: True) -> DrainResult:
        """Ship batches until the outbox is empty, `stop` is set or `between` (called after each acknowledged
        batch) says no. Up to `max_in_flight` batches are on their way at once (`Window`: no key is ever in two
        requests at once, and a batch related by a foreign key to one in flight waits for it, so parents still
        land before children). Each answer is acknowledged for its own batch, in the order the batches were
        claimed. In snapshot mode, whole snapshots one after another instead (`drain_snapshots`)."""
        if self.config.worker.consistency == "snapshot":
            return self.drain_snapshots(stop, between)
        self.snapshots.drop()  # switched to key mode: a snapshot held from before would undo what ships now
        total = DrainResult()
        window = self.window.begin()
        try:
            while True:
                upcoming = None
                if not stop.is_set() and len(window) < self.window.size(self.config.worker.max_in_flight):
                    claiming = time.monotonic()
                    upcoming = self.claim(self.window.in_flight())
                    if upcoming is not None:
                        self.window.claim_took(time.monotonic() - claiming)
                if upcoming is None and not window:
                    return total
                while upcoming is not None and window and self.window.related(upcoming, self.plan.relatives):
                    total = total.plus(self.finish(self.window.arrived(window.popleft()[1].result())))
                    if not between():
                        return total  # `upcoming` is dropped: claimed again later
                if upcoming is not None:
                    window.append((upcoming, self.shipping.pool.submit(self.deliver, upcoming)))
                    continue  # claim more while the window has room
                total = total.plus(self.finish(self.window.arrived(window.popleft()[1].result())))  # or Interrupted
                if not between():
                    return total
        finally:
            for _, future in window:  # left early (an interruption, a busy file): no request runs on behind us
                future.result()

    def drain_snapshots(self, stop: threading.Event, between: Callable[[], bool]) -> DrainResult:
        """Ship snapshots until the outbox is empty, `stop` is set or `between` says no (raises Interrupted)."""
        total = DrainResult()
        while not stop.is_set():
            done = self.ship_snapshot()
            total = total.plus(done)
            if not done.claimed or not between():
                break
        return total

    def ship_snapshot(self) -> DrainResult:
        """Read (or go on with the one interrupted), apply and acknowledge one snapshot (`Snapshots`); raises
        Interrupted (SnapshotRefused) having acknowledged nothing of it."""
        try:
            snapshot = self.snapshots.next()
        except outbox.TableUnreadable as exc:
            self.halt_unreadable(exc)
            return DrainResult()
        if snapshot is None:
            return DrainResult()
        try:
            applied = self.snapshots.ship(snapshot)
        except Interrupted as exc:
            if isinstance(exc, SnapshotRefused):
                snapshot.close()  # the next try reads the file anew: a row fixed in the app meanwhile ships with it
            else:
                self.snapshots.hold(snapshot)
            raise
        except LeaseHeld:  # another daemon took the file over while this one read or staged: it ships from here
            snapshot.close()
            self.holding = False
            return DrainResult()
        except BaseException:
            snapshot.close()
            raise
        try:
            settled = self.snapshots.acknowledge(snapshot, applied)
        finally:
            snapshot.close()
        self.flush.acknowledged(settled, 0)
        self.timers.exchanged()
        return DrainResult(snapshot.entries, snapshot.keys, len(snapshot.dead), 0, more=False)

    def claim(self, in_flight: Sequence[outbox.Change] | outbox.InFlight = ()) -> Shipment | None:
        """The next batch of the tables that are not halted, its keys' rows read from one snapshot, leaving out the
        keys of `in_flight` (the window's)."""
        if not self.keeper.prepared:
            self.keeper.prepare()
            if not self.keeper.prepared:
                return None  # the app is changing its schema right now: nothing is read through a stale plan
        if self.keeper.reconciler is not None:
            self.halts.follow_reconciles(self.keeper.reconciler.pending())
        active = {t: m.key for t, m in self.plan.mappings.items() if t not in self.halts.halted}
        renderers = {t: self.plan.mappings[t].sql_rendering for t in active}
        after, retry = self.window.claim_from()
        try:
            claimed = outbox.claim(self.conn, self.shipping.batch_size, active, in_flight, after=after, retry=retry,
                                   renderers=renderers, planned_at=self.plan.schema_version)
        except SchemaMoved:  # the app changed its schema since the plan (before the watch saw it): plan again
            self.keeper.prepared = False
            return self.claim(in_flight)
        except outbox.TableUnreadable as exc:  # the table's problem: it halts, the others ship on
            self.halt_unreadable(exc)
            return self.claim(in_flight)
        changes = [c for c in claimed.changes
                   if c.problem or not self.halts.holds(c.table, "upsert" if c.present else "delete")]
        return self.window.claimed(claimed, changes)

    def halt_unreadable(self, exc: outbox.TableUnreadable) -> None:
        """syncd's connection cannot read a table's rows: that table halts (in snapshot mode with it, the file)."""
        self.halts.halt(exc.table, Halt("capture", f"syncd cannot read the rows of {exc.table!r}: {exc.problem}; "
                                                   "leave the table out of syncd.toml, or report it (syncd's reads "
                                                   "of a table never compare by the application's collations)"))

    def deliver(self, shipment: Shipment) -> Shipment:
        """Ship a claimed batch (touches no SQLite: it may run beside the next claim)."""
        started = time.monotonic()
        try:
            self.shipping.ship(shipment.changes, shipment.batch)
        except Interrupted as exc:
            shipment.interrupted = exc
        shipment.shipping_seconds = time.monotonic() - started
        return shipment

    def finish(self, shipment: Shipment) -> DrainResult:
        """Acknowledge and observe; then re-raise an interruption of the secondary."""
        batch, now = shipment.batch, time.time()
        outbox.acknowledge(self.conn, batch.shipped, batch.dead, batch.requeued, now=now)
        settled = [*batch.shipped, *(d.change for d in batch.dead), *batch.requeued]
        self.window.settled(settled)
        self.flush.acknowledged(sum(len(c.entries) for c in settled), len(batch.requeued))
        if batch.shipped:
            self.timers.exchanged()
        self.observer.batch_done(
            claimed=shipment.claimed, shipped=len(batch.shipped), dead=len(batch.dead), requeued=len(batch.requeued),
            upserted=batch.upserted, deleted=batch.deleted, seconds=time.monotonic() - shipment.started,
            lags=[max(0.0, now - entry.at) for change in batch.shipped for entry in change.entries],
            interrupted=shipment.interrupted is not None)
        if shipment.interrupted is not None:
            self.window.overloaded(self.config.worker.max_in_flight)
            raise shipment.interrupted
        self.window.recovered(self.config.worker.max_in_flight)
        self.shipping.regrow()
        return DrainResult(shipment.claimed, len(batch.shipped), len(batch.dead), len(batch.requeued),
                           more=shipment.claimed >= self.shipping.batch_size)

    def flush_when_due(self, *, final: bool = False) -> None:
        """Apply what was acknowledged to the app's file when due (`Flush.when_due`); never into a file that is not
        the one those entries were claimed from."""
        if self.keeper.replaced:
            return
        if (reason := self.flush.when_due(final=final)) is not None:
            self.keeper.discontinued(reason)

    def probe_when_idle(self) -> None:
        """An idle daemon still tells whether the secondary answers (/readyz, syncd_target_up): a read of no rows of
        a table that ships, when nothing was exchanged for a while (`Timers.probe`)."""
        if not self.timers.probe_due():
            return
        if not self.keeper.prepared:
            self.keeper.prepare()
        table = next((t for t in self.plan.order if t not in self.halts.halted), None)
        if table is not None:
            self.timers.probe(table)


class WaitFn(Protocol):
    """How the loop sleeps between drains: called with (timeout in seconds, stop), it returns at the timeout or
    earlier, on a change, a wake-up or `stop` (`Waker.wait`, `wait_on`)."""

    def __call__(self, timeout: float, stop: threading.Event, /) -> None: ...


def wait_on(stop: threading.Event) -> WaitFn:
    """A WaitFn that only waits for `stop` or the timeout (no wake-up source)."""

    def wait(timeout: float, _stop: threading.Event) -> None:
        stop.wait(timeout)

    return wait
