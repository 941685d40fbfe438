"""Snapshot mode (`[worker] consistency = "snapshot"`): every state of the secondary's synced tables is a state the
SQLite file had (README, "Consistency: key or snapshot").

SQLite has one writer at a time and no transaction id, but a read transaction sees a prefix of the outbox that ends
at a commit, together with the tables as they were at that commit (https://sqlite.org/isolation.html). So one
snapshot is: every unacknowledged outbox entry of the synced tables that one read transaction sees, with the rows
of their keys read in that same transaction. It is applied in the secondary in one PostgreSQL transaction by
`syncd_apply` (syncd/snapshot.sql, called through PostgREST as POST /rpc/syncd_apply); a snapshot larger than a
chunk is staged first (POST /rpc/syncd_stage, one request per chunk) and applied by the final call. Several app
transactions may merge into one snapshot; half of one never ships. The whole range is acknowledged after the 2xx,
as in key mode.

What differs from key mode, on purpose:
- A halted table stops the whole file: shipping the other tables' changes of a transaction without it would show
  a state the source never had. The halt says so in status and /readyz.
- A snapshot the secondary refuses (a row violates a constraint there, the functions are missing) is not bisected:
  nothing of it is applied, it is tried again with backoff (each try reads the file anew, so a row fixed in the app
  ships with the next), and the refusal shows in status, /readyz, syncd_snapshots_total{outcome="refused"} and the
  log with the fix. A row syncd itself cannot map (a key that is not UTF-8, a value JSON cannot carry) goes to the
  dead letters as in key mode and the rest of the snapshot ships: such a row could never reach the secondary.
- Foreign keys are the secondary's business inside one transaction: upserts parents first, deletes children first,
  DEFERRABLE constraints checked at the commit; nothing is requeued.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import IO, Protocol, cast

import apsw

from syncd import outbox
from syncd.halts import Halts
from syncd.mapping import RowError, encode_row
from syncd.observer import Observer
from syncd.outbox import Change, DeadLetter
from syncd.plan import Plan
from syncd.settings import Settings
from syncd.shipping import Batch, Interrupted, Shipper
from syncd.source import Source
from syncd.sqlite import SchemaMoved, quote_ident
from syncd.target import HINT_MISSING_COLUMN, HINT_MISSING_TABLE, TargetError

__all__ = ["SNAPSHOT_LABEL", "Snapshot", "SnapshotRefused", "Snapshots", "function_sql"]

CHUNKS_MISSING = "PT503"  # syncd_apply's SQLSTATE for a chunk it names that is not staged (HTTP 503 via PostgREST)
SNAPSHOT_LABEL = "(snapshot)"  # the `table` label of a snapshot's retries: it is the file's, not a table's
LAG_SAMPLE = 5000  # at most this many entries' lags observed per snapshot (evenly spaced)
HINT_FUNCTIONS = ("Try: run the SQL of `syncd init --consistency snapshot` (schema.sql), or "
                  "deploy/supabase/migrations/003_syncd_snapshots.sql, in the secondary, and grant EXECUTE on "
                  "syncd_apply and syncd_stage to syncd's role.")
HINT_REFUSED = ("In snapshot mode a file's changes ship only whole: fix the row in the app (it ships with the next "
                "try) or the secondary's constraint, or switch the file to consistency = \"key\"; tried again with "
                "backoff meanwhile.")


HINT_DENIED = ("Try: grant syncd's role EXECUTE on syncd_apply and syncd_stage and its privileges on the tables, or "
               "fix the row-level security policy that refused the row (the functions run with the caller's rights); "
               "tried again with backoff meanwhile.")
HINT_SCHEMA = ("Try: add the table or column the snapshot writes to the secondary (syncd init writes their SQL); the "
               "snapshot ships once it is there, tried again with backoff meanwhile.")


def refusal_hint(error: TargetError) -> str:
    """What the operator should do about a snapshot the secondary refused, by what refused it."""
    if error.code in ("PGRST202", "42883") or (error.status == 404 and error.code is None):
        return HINT_FUNCTIONS
    if error.code == "42501" or error.kind in ("config", "auth"):
        return HINT_DENIED
    if error.kind == "schema":
        return HINT_SCHEMA
    return HINT_REFUSED


def function_sql(schema: str = "public") -> str:
    """The secondary's SQL for snapshot mode (syncd/snapshot.sql: the staging and record tables, syncd_stage,
    syncd_apply) in `schema`; for public the same text as deploy/supabase/migrations/003_syncd_snapshots.sql.
    PostgREST looks a function up in the schema of the request's Content-Profile, which syncd sets to the target's
    schema: the functions live beside the tables."""
    text = resources.files("syncd").joinpath("snapshot.sql").read_text(encoding="utf-8")
    return text if schema == "public" else text.replace("public.", f"{quote_ident(schema)}.")


class Caller(Protocol):
    """A secondary that calls functions (`PostgrestTarget.call`)."""

    def call(self, function: str, body: bytes) -> bytes: ...


class SnapshotRefused(Interrupted):
    """The secondary refused a snapshot (it applied none of it): retried with backoff, reported as a refusal."""


@dataclass
class Snapshot:
    """One snapshot read from the file: its chunks (JSON documents for syncd_apply/syncd_stage, spooled to a
    temporary file), the range of seqs it read (`first`..`last`), the entries it holds, what is acknowledged with
    it (`journal`: {table: keys as stored}, `dead`: letters filed instead of shipped) and its id."""

    source: str  # the file's generation (syncd's position)
    first: int = 0
    last: int = 0
    entries: int = 0
    keys: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) in `spool`
    # closed by `close` once the snapshot is acknowledged or dropped (it outlives any `with` block)
    spool: IO[bytes] = field(default_factory=lambda: tempfile.SpooledTemporaryFile(max_size=8 * 2**20))  # noqa: SIM115
    journal: dict[str, list[str]] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    dead_keys: set[tuple[str, bytes]] = field(default_factory=set)
    upserted: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    lags_at: list[float] = field(default_factory=list)  # the entries' commit times (unix seconds), sampled
    flushes: int = 0
    planned_at: int | None = None  # the schema cookie of the plan it was rendered by
    staged: set[int] = field(default_factory=set)  # its chunks the secondary has staged (a resumed one skips them)
    started: float = field(default_factory=time.monotonic)
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)

    @property
    def id(self) -> str:
        """Unique to its content at this position of the file: a retry of the same snapshot has the same id, a later
        one (the flushes count moves, seqs may be handed out again after a flush) another."""
        return f"{self.flushes}:{self.first}-{self.last}:{self.digest.hexdigest()[:16]}"

    def file_dead(self, letter: DeadLetter) -> None:
        """A change that goes to the dead letters: once per key, though the key may come back in a later chunk (its
        entries there are settled with the range, the dead letter names the key)."""
        key = (letter.change.table, letter.change.raw_key)
        if key not in self.dead_keys:
            self.dead_keys.add(key)
            self.dead.append(letter)

    def add_chunk(self, document: bytes) -> None:
        offset = self.spool.seek(0, 2)
        self.spool.write(document)
        self.digest.update(document)
        self.chunks.append((offset, len(document)))

    def chunk(self, index: int) -> bytes:
        offset, length = self.chunks[index]
        self.spool.seek(offset)
        return self.spool.read(length)

    def close(self) -> None:
        self.spool.close()


class Snapshots:
    """Reads, ships and acknowledges snapshots of one file (the drain of snapshot mode). `prepared` plans the
    tables when needed and says whether they are planned (the app may be changing its schema right now);
    `keep_lease` renews the file's lease between the requests of a large snapshot (reading and staging one may
    take longer than the lease lives) and raises LeaseHeld when another daemon took the file over meanwhile."""

    def __init__(self, source: Source, plan: Plan, halts: Halts, settings: Settings, observer: Observer,
                 shipping: Shipper, prepared: Callable[[], bool], replan: Callable[[], None],
                 keep_lease: Callable[[], None] = lambda: None) -> None:
        self.source = source
        self.plan = plan
        self.halts = halts
        self.settings = settings
        self.observer = observer
        self.shipping = shipping
        self.prepared = prepared
        self.replan = replan
        self.keep_lease = keep_lease  # raises LeaseHeld once another daemon holds the file: its snapshot stops
        self.held: Snapshot | None = None  # interrupted on its way: resumed by `next`, chunks staged kept

    def next(self) -> Snapshot | None:
        """The snapshot interrupted on its way, when it may still go on (the same file and plan, no halt: it is a
        state the source had, and nothing was applied since), else the next one read (`read`)."""
        held, self.held = self.held, None
        if held is not None:
            position = outbox.file_position(self.conn)
            if (position is not None and position.generation == held.source and not self.halts.halted
                    and held.planned_at == self.plan.schema_version and self.prepared()):
                return held
            held.close()
        return self.read()

    def hold(self, snapshot: Snapshot) -> None:
        """Keep a snapshot the secondary failed to take as a whole (transient): the next try goes on with it, so a
        large one is not staged from its first chunk again after every failure (it might never get through)."""
        if self.held is not None and self.held is not snapshot:
            self.held.close()
        self.held = snapshot

    def drop(self) -> None:
        """Forget a held snapshot (the file was replaced, syncd stops)."""
        if self.held is not None:
            self.held.close()
            self.held = None

    @property
    def conn(self) -> apsw.Connection:
        return self.source.conn

    def read(self) -> Snapshot | None:
        """The next snapshot (None: nothing to ship, the tables are not planned, or a table is halted). Raises
        TableUnreadable as a claim does."""
        if not self.prepared():
            return None
        if self.halts.halted:
            self.observer.snapshot_held(sorted(self.halts.halted))
            return None
        active = {t: m.key for t, m in self.plan.mappings.items()}
        renderers = {t: m.sql_rendering for t, m in self.plan.mappings.items()}
        per_chunk = self.shipping.batch_size
        conn = self.conn
        conn.execute("BEGIN")
        try:
            position = outbox.file_position(conn)
            snapshot = Snapshot(position.generation if position else "", flushes=position.flushes if position else 0,
                                planned_at=self.plan.schema_version)
            after = 0
            while True:
                try:
                    claimed = outbox.claim(conn, per_chunk, active, after=after, renderers=renderers,
                                           planned_at=self.plan.schema_version, in_transaction=True)
                except SchemaMoved:
                    self.replan()
                    snapshot.close()
                    return None
                if not claimed.changes:
                    break
                entries = sum(len(c.entries) for c in claimed.changes)
                self.add(snapshot, claimed.changes)
                snapshot.first = snapshot.first or min(e.seq for c in claimed.changes for e in c.entries)
                snapshot.last, after = claimed.last_seq, claimed.last_seq
                snapshot.entries += entries
                if entries < per_chunk:
                    break
        finally:
            conn.execute("COMMIT")
        if not snapshot.entries:
            snapshot.close()
            return None
        return snapshot

    def add(self, snapshot: Snapshot, changes: list[Change]) -> None:
        """Render one chunk of changes into the snapshot: per table, one change per key of the secondary (the
        superseded ones are acknowledged with it), upserts of the present rows and deletes of the gone keys; a row
        or key the mapping refuses is dead-lettered."""
        batch = Batch()
        for change in changes:
            if change.problem:
                snapshot.file_dead(DeadLetter(change, change.problem))
        by_table: dict[str, list[Change]] = {}
        for change in changes:
            if not change.problem:
                by_table.setdefault(change.table, []).append(change)
        upserts: list[str] = []
        deletes: list[str] = []
        for table, table_changes in by_table.items():
            mapping = self.plan.mappings[table]
            collapsed = self.shipping.collapse(table, table_changes, batch)
            groups: dict[tuple[str, ...], list[str]] = {}
            shipped: list[Change] = []
            for change in collapsed.present:
                if change.rendered is not None:
                    groups.setdefault(("(rendered)",), []).append(change.rendered)
                    shipped.append(change)
                    continue
                try:
                    payload = mapping.map_row(change.current_row, change.decoded)
                    text = encode_row(payload)
                except (RowError, TypeError, ValueError) as exc:
                    snapshot.file_dead(DeadLetter(change, f"table {table!r}: {exc}"))
                    continue
                groups.setdefault(tuple(payload), []).append(text)
                shipped.append(change)
            keys: list[str] = []
            for change in collapsed.gone:
                try:
                    keys.append(encode_row(mapping.map_key(change.decoded)))
                except (RowError, TypeError, ValueError) as exc:
                    snapshot.file_dead(DeadLetter(change, f"table {table!r}: {exc}"))
                    continue
                shipped.append(change)
            name = json.dumps(mapping.target)
            upserts += [f'{{"table":{name},"rows":[{",".join(rows)}]}}' for rows in groups.values()]
            if keys:
                deletes.append(f'{{"table":{name},"keys":[{",".join(keys)}]}}')
            shipped += [c for c in batch.shipped if c.table == table]  # superseded by a newer change of its key
            snapshot.upserted[table] = snapshot.upserted.get(table, 0) + sum(len(g) for g in groups.values())
            snapshot.deleted[table] = snapshot.deleted.get(table, 0) + len(keys)
            snapshot.journal.setdefault(table, []).extend(
                c.key_text for c in shipped if isinstance(c.key_text, str))
            snapshot.keys += len(shipped)
        stride = max(1, len(changes) // max(1, LAG_SAMPLE // 10))
        snapshot.lags_at += [c.entries[-1].at for c in changes[::stride]]
        if len(snapshot.lags_at) > LAG_SAMPLE:
            snapshot.lags_at = snapshot.lags_at[::2]
        snapshot.add_chunk(f'{{"upserts":[{",".join(upserts)}],"deletes":[{",".join(deletes)}]}}'.encode())

    def ship(self, snapshot: Snapshot) -> bool:
        """Apply the snapshot in the secondary (staged first when it has more than one chunk). Whether it was
        applied now (False: a retry of one applied before, which changed nothing). Raises Interrupted when the
        secondary failed as a whole, SnapshotRefused when it refused the snapshot."""
        target = self.settings.target
        if not hasattr(target, "call"):
            raise SnapshotRefused(SNAPSHOT_LABEL, TargetError(
                "config", f"the target {target!r} cannot call functions: snapshot mode needs PostgREST's /rpc"))
        caller = cast(Caller, target)
        self.keep_lease()
        head: dict[str, object] = {"source": snapshot.source, "snapshot": snapshot.id}
        staged = len(snapshot.chunks) - 1
        self.stage(caller, snapshot, head, [index for index in range(staged) if index not in snapshot.staged])
        self.keep_lease()
        tables = [{"schema": self.settings.config.target.schema_name, "table": self.plan.mappings[t].target,
                   "key": self.plan.mappings[t].target_key} for t in self.plan.order if t in self.plan.mappings]
        try:
            answer = self.exchange(caller, "syncd_apply", {**head, "tables": tables, "staged": staged},
                                   snapshot.chunk(staged))
        except Interrupted as exc:
            if exc.error.code == CHUNKS_MISSING:  # the secondary lost staged chunks: the next try stages them all
                snapshot.staged.clear()
            raise
        try:
            return bool(json.loads(answer).get("applied", True))
        except (ValueError, AttributeError):
            return True

    def stage(self, caller: Caller, snapshot: Snapshot, head: dict[str, object], chunks: list[int]) -> None:
        """Stage these chunks, up to `max_in_flight` requests at once on the shipping threads (chunks are
        independent rows of the staging table until the apply); raises the first failure once the requests under
        way have ended, the chunks that got through recorded in `snapshot.staged`."""
        window = self.settings.config.worker.max_in_flight
        failure: BaseException | None = None
        for start in range(0, len(chunks), window):
            self.keep_lease()
            part = chunks[start:start + window]
            documents = {index: snapshot.chunk(index) for index in part}  # read here: the spool is not thread-safe
            futures = {index: self.shipping.pool.submit(self.exchange, caller, "syncd_stage",
                                                        {**head, "chunk": index}, documents[index])
                       for index in part}
            for index, future in futures.items():
                try:
                    future.result()
                except (Interrupted, SnapshotRefused) as exc:
                    failure = failure or exc
                    continue
                snapshot.staged.add(index)
                self.observer.snapshot_chunk_staged()
            if failure is not None:
                raise failure

    def exchange(self, caller: Caller, function: str, arguments: dict[str, object], doc: bytes) -> bytes:
        """One call of `function` with `arguments` and the chunk `doc` (JSON, embedded as it is)."""
        body = json.dumps(arguments)[:-1].encode() + b',"doc":' + doc + b"}"
        try:
            return caller.call(function, body)
        except TargetError as error:
            if error.kind == "transient":
                raise Interrupted(SNAPSHOT_LABEL, error) from None
            hint = refusal_hint(error)
            said = error.message
            for table_advice in (HINT_MISSING_TABLE, HINT_MISSING_COLUMN):  # about a table request, not a call
                said = said.replace(f" {table_advice}", "")
            raise SnapshotRefused(SNAPSHOT_LABEL, TargetError(
                error.kind, f"the secondary refused snapshot {function}: {said} {hint}",
                status=error.status, code=error.code, retry_after=error.retry_after)) from None

    def acknowledge(self, snapshot: Snapshot, applied: bool) -> int:
        """Record the shipped range in the state file; how many entries it settled."""
        now = time.time()
        settled = outbox.acknowledge_range(self.conn, snapshot.first, snapshot.last, list(self.plan.mappings),
                                           snapshot.dead, snapshot.journal, now=now)
        self.observer.snapshot_applied(entries=snapshot.entries, keys=snapshot.keys, chunks=len(snapshot.chunks),
                                       dead=len(snapshot.dead), applied=applied)
        self.observer.batch_done(claimed=snapshot.entries, shipped=snapshot.keys, dead=len(snapshot.dead), requeued=0,
                                 upserted=snapshot.upserted, deleted=snapshot.deleted,
                                 seconds=time.monotonic() - snapshot.started,
                                 lags=[max(0.0, now - at) for at in snapshot.lags_at], interrupted=False)
        return settled

