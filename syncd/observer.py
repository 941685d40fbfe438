"""Observation: what the drain loop announces (a batch done, the secondary failed or recovered, a table halted
or resumed, the backlog measured) turned into metrics, health (/healthz, /readyz) and log lines, in one place.

The worker only says what happened; this listener decides what an operator sees of it (as dramatiq's
Prometheus middleware listens to a worker's events). Every condition that stops progress shows here in a
metric, in `/readyz` and in a log line with the fix.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import structlog

from syncd.logs import get_logger
from syncd.metrics import Metrics
from syncd.outbox import Pending
from syncd.target import TargetError

__all__ = ["Observer"]

BATCH_LOG_EVERY = 1.0  # seconds: at most one "batch" line per second for batches that went well
ONE_SPELLING = "make the key column's values one spelling in SQLite (a type, a transform, a CHECK)"


class Observer:
    """The one listener of the worker's events; `metrics` holds the registry and the health it updates."""

    def __init__(self, metrics: Metrics, log: structlog.typing.FilteringBoundLogger | None = None) -> None:
        self.metrics = metrics
        self.log = log or get_logger()
        self.unlogged: Counter[str] = Counter()  # batches since the last "batch" line, and their counts
        self.next_batch_log = 0.0
        self.unlogged_requeues: Counter[tuple[str, str]] = Counter()  # (table, reason) -> keys not yet logged
        self.next_requeue_log: dict[tuple[str, str], float] = {}
        self.snapshot_held_by: tuple[str, ...] = ()  # the halted tables last said to hold a file's snapshots

    # -- the loop -------------------------------------------------------------------------------------------

    def heartbeat(self) -> None:
        """The loop is alive (/healthz)."""
        self.metrics.health.heartbeat = time.time()

    def standing_by(self, host: str | None, pid: int | None) -> None:
        """Another daemon holds the lease; this one waits."""
        where = f" ({host} pid {pid})" if host else ""
        self.metrics.health.standby = f"standing by: another daemon holds the lease{where}"
        self.log.info("another daemon holds the lease: standing by", host=host, pid=pid)

    def holding_lease(self) -> None:
        """This daemon holds the lease (again)."""
        if self.metrics.health.standby is not None:
            self.metrics.health.standby = None
            self.log.info("lease taken: draining")

    def died(self, error: BaseException) -> None:
        """The drain loop ended with an unexpected error: /healthz turns 503, the process exits non-zero."""
        self.metrics.health.failed = f"{type(error).__name__}: {error}"
        self.log.error("the drain loop stopped on an unexpected error; exiting non-zero so that the supervisor "
                       "restarts syncd (nothing is lost: unacknowledged changes ship again)", exc_info=error)

    # -- the application's file -----------------------------------------------------------------------------

    def source_fault(self, kind: str, problem: str, since: float, retry_in: float) -> None:
        """A step on the application's file failed (`kind`: busy, full, readonly, io, gone, unusable, stale); retried in
        `retry_in` seconds. `since`: seconds the fault has lasted."""
        self.metrics.source_ok.set(0)
        self.metrics.source_errors.labels(kind=kind).inc()
        self.metrics.health.source_problem = problem
        self.log.warning(problem, fault=kind, lasting_s=round(since, 1), retry_in_s=round(retry_in, 3))

    def source_ok(self) -> None:
        """A step on the application's file succeeded (after a fault: it is over)."""
        self.metrics.source_ok.set(1)
        if self.metrics.health.source_problem is not None:
            self.log.info("the application's file is usable again", was=self.metrics.health.source_problem)
            self.metrics.health.source_problem = None

    def source_replaced(self, path: str, installed: bool, reason: str = "") -> None:
        """The file is not the one syncd shipped from (`reason`: replaced, restored, a lost WAL index); `installed`:
        syncd had to install itself in it."""
        self.metrics.source_replaced.inc()
        self.log.warning("the database file was replaced (or restored: it is not the one syncd last shipped from): "
                         "every table is reconciled with the secondary (the file is the source of truth)",
                         database=path, reason=reason, installed_now=installed)

    def capture_repaired(self, table: str, what: str) -> None:
        """The daemon reinstalled a table's triggers (`what` says why); a reconcile follows."""
        self.metrics.capture_repairs.labels(table=table).inc()
        self.log.warning("capture repaired: triggers reinstalled for the table as it now is; reconciling it with the "
                         "secondary so changes made meanwhile converge", table=table, what=what)

    def reconciled(self, table: str, keys: int, seconds: float, answered: str | None = None,
                   cleared: bool = False) -> None:
        """A reconcile of `table` finished: `keys` found different and enqueued, in `seconds`; it answered the mark
        `answered` (why it was asked for) and `cleared` it, or left a newer one for the next reconcile."""
        self.metrics.reconciles.labels(table=table, outcome="done").inc()
        self.metrics.reconciled_keys.labels(table=table).inc(keys)
        self.log.info("reconciled with the secondary", table=table, keys_enqueued=keys, duration_s=round(seconds, 2),
                      answered=answered, mark_cleared=cleared)

    def reconcile_queued(self, table: str, reason: str, behind_running: bool) -> None:
        """A reconcile of `table` was asked for (`reason`); `behind_running`: one of that table is running now, and
        this one follows it (what it read may predate the gap)."""
        self.log.info("reconcile queued", table=table, reason=reason, behind_running=behind_running)

    def changes_wait_for_reconciles(self, waits: Mapping[str, Iterable[str]]) -> None:
        """Which changes wait for a running or pending reconcile ({table: ops}, empty: none wait any more)."""
        if waits:
            self.log.info("changes wait for a reconcile of a table related by a foreign key: they ship once it has "
                          "put its keys into the outbox", waiting={t: sorted(ops) for t, ops in waits.items()})
        else:
            self.log.info("no change waits for a reconcile any more")

    def reconcile_failed(self, table: str, reason: str, retry_in: float) -> None:
        """A reconcile of `table` could not finish (`reason`); it is tried again in `retry_in` seconds."""
        self.metrics.reconciles.labels(table=table, outcome="failed").inc()
        self.log.warning("reconcile failed: will retry", table=table, reason=reason, retry_in_s=round(retry_in, 1))

    # -- configuration --------------------------------------------------------------------------------------

    def yielding_cpu(self, wanted: int, nice: int, refused: str | None) -> None:
        """The daemon runs at nice value `nice` (`syncd.priority`; `wanted` is worker.nice); `refused`: the system
        would not lower it. Nothing asked (0), nothing said."""
        if wanted == 0:
            return
        if refused is None:
            self.log.info("running at a lower CPU priority than the app's (worker.nice)", nice=nice)
        else:
            self.log.warning("the system refused to lower syncd's CPU priority: it runs at the app's, and a catch-up "
                             "competes with the app for the CPU; start syncd with a nice value instead (nice -n 10, "
                             "or Nice=10 in a systemd unit)", nice=nice, wanted=wanted, problem=refused)

    def reloaded(self, changed: Sequence[str], restart_needed: Sequence[str]) -> None:
        """SIGHUP: the configuration and secrets were read again; `changed` names the keys that differ (never
        their values); `restart_needed` those that take effect only at the next start."""
        self.log.info("configuration reloaded (SIGHUP): halts cleared", changed=list(changed))
        if restart_needed:
            self.log.warning("these keys take effect at the next start of syncd run", keys=list(restart_needed))

    def reload_failed(self, problems: Sequence[str]) -> None:
        """SIGHUP: the configuration could not be loaded; the old one keeps running."""
        self.log.error("configuration NOT reloaded (SIGHUP): the old one keeps running; fix these, then send SIGHUP "
                       "again", problems=list(problems))

    # -- batches --------------------------------------------------------------------------------------------

    def batch_done(self, *, claimed: int, shipped: int, dead: int, requeued: int, upserted: Mapping[str, int],
                   deleted: Mapping[str, int], lags: Iterable[float], seconds: float, interrupted: bool) -> None:
        """One batch acknowledged: `claimed` outbox entries, `shipped` keys acknowledged, `lags` the seconds
        from each shipped entry's commit to now, `seconds` from claim to acknowledgement; `interrupted` when
        the secondary failed as a whole part way (what shipped before is acknowledged, the rest retried)."""
        m = self.metrics
        m.batch_duration.observe(seconds)
        for table, n in upserted.items():
            m.shipped.labels(table=table, op="upsert").inc(n)
        for table, n in deleted.items():
            m.shipped.labels(table=table, op="delete").inc(n)
        m.lag.observe_many(lags)
        if shipped:
            m.last_success.set(time.time())
            self.target_answered()
        outcome = "interrupted" if interrupted else "ok" if not (dead or requeued) else "partial"
        totals = self.unlogged
        totals["batches"] += 1
        for name, value in (("claimed", claimed), ("shipped", shipped), ("dead_lettered", dead),
                            ("requeued", requeued)):
            totals[name] += value
        now = time.monotonic()
        if outcome == "ok" and now < self.next_batch_log:
            return  # at most a line a second for batches that went well: a busy daemon ships hundreds a second
        self.next_batch_log = now + BATCH_LOG_EVERY
        self.unlogged = Counter()
        self.log.info("batch", claimed=claimed, shipped=shipped, dead_lettered=dead, requeued=requeued,
                      duration_ms=round(seconds * 1000, 1), outcome=outcome,
                      **({"since_last_line": dict(totals)} if totals["batches"] > 1 else {}))

    def exchange_failed(self, table: str, error: TargetError) -> None:
        """One request to the secondary failed (before any retry)."""
        self.metrics.failures.labels(table=table, **{"class": error.kind}).inc()
        self.metrics.target_up.set(0 if error.kind == "transient" else 1)

    def requeued(self, table: str, keys: int, reason: str, error: TargetError) -> None:
        """`keys` changes of `table` went to the tail of the outbox (`reason`: foreign key, their parent has not
        landed yet; unique value, the row that holds it has not moved yet): counted in syncd_requeued_total apart
        from failures, and logged at most once a second per table and reason with the counts since."""
        self.metrics.requeued.labels(table=table, reason=reason).inc(keys)
        now = time.monotonic()
        pending = self.unlogged_requeues
        pending[(table, reason)] += keys
        if now < self.next_requeue_log.get((table, reason), 0.0):
            return
        self.next_requeue_log[(table, reason)] = now + BATCH_LOG_EVERY
        self.log.info("requeued behind what they depend on", table=table, reason=reason,
                      keys=pending.pop((table, reason)), code=error.code,
                      why=("the secondary refused them for a foreign key (23503): their parent rows have not landed "
                           "yet (a first copy sending children early?); they ship after them, and only a row whose "
                           "parent never comes goes to the dead letters" if reason == "foreign key" else
                           "another row still holds their unique value; they ship after it moves"))

    def token_renewed(self, table: str, error: TargetError) -> None:
        """The token had expired; it was renewed and the request to `table` sent again."""
        self.exchange_failed(table, error)
        self.metrics.retries.labels(table=table).inc()
        self.log.info("token expired: renewed, retrying", table=table)

    def row_dead_lettered(self, table: str, error: TargetError) -> None:
        """The secondary refused one row for good: it went to the dead letters (logged with the replay command; the
        gauge follows at the next backlog measure)."""
        self.log.error("row dead-lettered", table=table, status=error.status, code=error.code,
                       reason=error.message, hint=f"syncd replay --dead-letters --table {table}")

    def keys_collapsed(self, table: str, count: int, examples: list[tuple[object, object]]) -> None:
        """`count` changes of a batch had a target key that a newer change of the batch has too (two SQLite keys that
        are one key in the secondary): only the newest was sent. `examples`: (older key, newer key) pairs."""
        self.log.warning("two keys of SQLite are one key in the secondary: the newest row was sent for both",
                         table=table, count=count, examples=key_pairs(examples), hint=ONE_SPELLING)

    def keys_collided(self, table: str, pairs: list[tuple[object, object]]) -> None:
        """PostgreSQL refused a request naming one of its keys twice (21000): keys distinct in SQLite that its casts
        make one (`'1.0'` and `'1'` into numeric, two spellings of one instant or UUID). The rows were sent apart,
        in order, so the newest holds the key. `pairs`: the (older, newer) SQLite keys found alone together."""
        self.log.warning("two keys of SQLite are one key in the secondary (PostgreSQL answered 21000): the rows were "
                         "sent apart and the newest holds it", table=table, examples=key_pairs(pairs),
                         hint=ONE_SPELLING)

    def deletes_stood_in(self, table: str, examples: list[tuple[object, object]]) -> None:
        """Keys deleted in SQLite whose key in the secondary another row of the file still has (`'1'` gone, `1`
        there): that row was sent instead of the delete. `examples`: (deleted key, the row's key) pairs."""
        self.log.warning("a deleted key of SQLite is one key in the secondary with a row still in the file: that row "
                         "was sent instead of the delete", table=table, count=len(examples),
                         examples=key_pairs(examples), hint=ONE_SPELLING)

    def unique_cycle(self, table: str, count: int) -> None:
        """`count` rows swapping unique values were deleted and inserted again in the secondary (no order of
        upserts could apply the swap)."""
        self.log.info("rows swapping unique values were deleted and inserted again", table=table, count=count)

    def batch_size_halved(self, table: str, batch_size: int) -> None:
        """A statement timeout in the secondary halved the batch to `batch_size` outbox entries."""
        self.log.warning("statement timeout in the secondary: smaller batches", table=table, batch_size=batch_size)

    # -- the secondary as a whole ---------------------------------------------------------------------------

    def secondary_failed(self, table: str, error: TargetError, attempt: int, retry_in: float) -> None:
        """The secondary failed as a whole (transient); the loop retries after `retry_in` seconds."""
        self.metrics.retries.labels(table=table).inc()
        self.target_failed(error.message)
        self.log.warning("secondary unavailable: will retry", table=table, reason=error.message, attempt=attempt,
                         retry_in_s=round(retry_in, 3))

    def snapshot_refused(self, error: TargetError, attempt: int, retry_in: float | None) -> None:
        """The secondary refused a snapshot (snapshot mode): nothing of it applied; tried again after `retry_in`
        seconds (None: not again, `run --once` ends)."""
        self.metrics.snapshots.labels(outcome="refused").inc()
        self.metrics.target_up.set(1 if error.status is not None else 0)
        self.metrics.health.target_ok, self.metrics.health.reason = False, error.message
        if retry_in is None:
            self.log.error("snapshot refused", reason=error.message, status=error.status, code=error.code)
            return
        self.log.error("snapshot refused: will retry", reason=error.message, status=error.status, code=error.code,
                       attempt=attempt, retry_in_s=round(retry_in, 3))

    def snapshot_applied(self, *, entries: int, keys: int, chunks: int, dead: int, applied: bool) -> None:
        """A snapshot of `entries` outbox entries (`keys` keys, `chunks` requests' worth) is in the secondary;
        `applied` False when it was a retry of one applied before (the secondary changed nothing)."""
        self.snapshot_held_by = ()
        self.metrics.snapshots.labels(outcome="applied" if applied else "repeated").inc()
        self.metrics.snapshot_entries.observe(entries)
        if chunks > 1 or dead:
            self.log.info("snapshot applied", entries=entries, keys=keys, chunks=chunks, dead_lettered=dead)

    def snapshot_chunk_staged(self) -> None:
        """One chunk of a large snapshot was staged in the secondary."""
        self.metrics.snapshot_staged.inc()

    def snapshot_held(self, halted: Sequence[str]) -> None:
        """Snapshot mode ships nothing of the file while a table is halted (a state without it would be torn)."""
        if tuple(halted) == self.snapshot_held_by:
            return
        self.snapshot_held_by = tuple(halted)
        self.log.warning("snapshot mode: nothing of the file ships while a table is halted", halted=list(halted),
                         hint="resume the halted table (its halt says how); every other table waits with it")

    def secondary_recovered(self, after_failures: int) -> None:
        """The secondary answered again after `after_failures` failed tries in a row."""
        self.log.info("secondary recovered", after_failures=after_failures)

    def secondary_checked(self, table: str, error: TargetError | None) -> None:
        """An idle daemon's check of the secondary (a read of no rows): `error` None when it answered."""
        if error is None:
            self.target_answered()
            return
        self.target_failed(error.message)
        self.log.warning("secondary check failed while idle", table=table, reason=error.message)

    def target_answered(self) -> None:
        """The secondary answered: syncd_target_up is 1 and /readyz ready (unless a table is halted)."""
        self.metrics.target_up.set(1)
        self.metrics.health.target_ok, self.metrics.health.reason = True, "ok"

    def target_failed(self, reason: str) -> None:
        """The secondary did not answer: syncd_target_up is 0 and /readyz not ready, with `reason`."""
        self.metrics.target_up.set(0)
        self.metrics.health.target_ok, self.metrics.health.reason = False, reason

    # -- tables ---------------------------------------------------------------------------------------------

    def table_halted(self, table: str, reason: str, hint: str, error: TargetError | None = None) -> None:
        """Shipping `table` stopped (`reason`; `hint`: how it resumes); capture goes on, nothing is lost."""
        self.metrics.halted.labels(table=table).set(1)
        self.metrics.health.halted[table] = reason
        self.log.error("table halted", table=table, status=error.status if error else None,
                       code=error.code if error else None, reason=reason, hint=hint)

    def changes_waiting(self, waits: Mapping[str, Mapping[str, str]]) -> None:
        """Which changes wait for a halted table ({table: {op: the halted table}}): shown with the halts in /readyz
        and logged."""
        before = set(self.metrics.health.waiting)
        self.metrics.health.waiting = describe_waits(waits)
        for table in before - waits.keys():
            self.metrics.waiting.labels(table=table).set(0)
        for table in waits:
            self.metrics.waiting.labels(table=table).set(1)
        if waits:
            self.log.warning("changes wait for a halted table they depend on (foreign keys): they stay in the outbox "
                             "and ship when it resumes", waiting=self.metrics.health.waiting)

    def tables_resumed(self, tables: Sequence[str], why: str | None = None) -> None:
        """These tables ship again (`why`, when it is worth a log line)."""
        for table in tables:
            self.metrics.halted.labels(table=table).set(0)
            self.metrics.health.halted.pop(table, None)
        if tables and why:
            self.log.info("table(s) resumed", tables=list(tables), why=why)

    def backlog(self, tables: Iterable[str], pending: Mapping[str, Pending], dead: Mapping[str, int],
                now: float) -> None:
        """The outbox measured: entries pending and the oldest one's age, dead letters, per table."""
        m = self.metrics
        for table in tables:
            mine = pending.get(table)
            m.pending.labels(table=table).set(mine.count if mine else 0)
            age = now - mine.oldest_at if mine and mine.oldest_at else 0.0
            m.oldest_age.labels(table=table).set(max(0.0, age))
            m.dead_letters.labels(table=table).set(dead.get(table, 0))


def key_pairs(pairs: list[tuple[object, object]]) -> list[str]:
    """The first three pairs of SQLite keys that are one key of the secondary, as a log line shows them."""
    return [f"{first!r} -> {second!r}" for first, second in pairs[:3]]


def describe_waits(waits: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """{table: "deletes wait for halted table child"}: what waits, in words, from {table: {op: the halted table}}."""
    return {table: ", ".join(f"{op}s wait for halted table {blocker}" for op, blocker in sorted(ops.items()))
            for table, ops in waits.items()}
