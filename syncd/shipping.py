"""Shipping one claimed batch: map, send, classify (DESIGN.md, "The drain loop, as a story"). Upserts go parents
first and deletes children first, one table at a time, grouped by their set of columns and cut to `batch_bytes`.
Failures arrive classified by `syncd.target`: a row error is bisected down to the rows at fault, which are
requeued behind their parent (a foreign key) or the row holding their unique value, a bounded number of times,
then dead-lettered with the reason; a schema, config or auth error halts the table; anything else interrupts the
batch (the secondary failed as a whole: `Interrupted`), and a statement timeout halves the batch size.

Runs on the shipping threads and touches no SQLite: what it decides is written into the batch's `Batch`, which
the loop acknowledges on its own thread.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from syncd import conflicts
from syncd.halts import Halt, Halts
from syncd.mapping import JsonText, RowError, TableMapping
from syncd.observer import Observer
from syncd.outbox import Change, DeadLetter
from syncd.plan import Plan
from syncd.schema_halts import SchemaHalts
from syncd.settings import Settings
from syncd.target import TargetError

__all__ = ["Batch", "Held", "Interrupted", "Shipper", "by_size", "target_keys"]

REGROW_AFTER = 20  # clean batches before a batch size halved by a statement timeout doubles again
ONE_KEY_TWICE = "21000"  # "ON CONFLICT DO UPDATE command cannot affect row a second time" (PostgreSQL, INSERT)
HINT_UNIQUE_HANDOFF = (
    "if another row of SQLite gave this value up in the same transaction, the secondary refuses the hand-over "
    "because it checks the unique constraint row by row: declare it DEFERRABLE INITIALLY DEFERRED there (ALTER TABLE "
    "... DROP CONSTRAINT c, ADD CONSTRAINT c UNIQUE (...) DEFERRABLE INITIALLY DEFERRED), or fix the clash")

Held = tuple[Change, "dict[str, object] | str", TargetError]  # a row refused for a unique value, to send again
Item = tuple[Change, "dict[str, object] | str"]  # a change and its payload: a mapped row, a JSON text, or a key


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
    # per table, the pairs of keys PostgreSQL found to be one key of the secondary (21000) that the collapse missed
    collided: dict[str, list[tuple[object, object]]] = field(default_factory=dict)


class Shipper:
    """Ships batches for one file's plan. Owns the foreign-key attempts of each key (how often it was requeued)
    and the batch size (halved by a statement timeout, doubled again every REGROW_AFTER clean batches); both
    change on the shipping threads (`pool`), under `lock`."""

    def __init__(self, plan: Plan, halts: Halts, schema_halts: SchemaHalts, settings: Settings,
                 observer: Observer, pool: ThreadPoolExecutor) -> None:
        self.plan = plan
        self.pool = pool  # the shipping threads (shared with the units of other files)
        self.halts = halts
        self.schema_halts = schema_halts
        self.settings = settings
        self.observer = observer
        self.batch_size = settings.config.worker.batch_size
        self.clean_batches = 0
        self.fk_attempts: Counter[tuple[str, str | bytes]] = Counter()
        self.lock = threading.RLock()

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
        holds = self.halts.holds
        for table in self.plan.order:
            plan = plans.get(table)
            if plan and plan.present and not holds(table, "upsert"):
                self.ship_upserts(table, plan.present, batch, held.setdefault(table, []))
        for table in reversed(self.plan.order):
            plan = plans.get(table)
            if plan and plan.gone and not holds(table, "delete"):
                self.ship_deletes(table, plan.gone, batch)
        for table in self.plan.order:
            if held.get(table) and not holds(table, "upsert"):
                self.hand_off(table, held[table], batch)
        for table, pairs in batch.collided.items():
            self.observer.keys_collided(table, pairs)

    def collapse(self, table: str, changes: list[Change], batch: Batch) -> conflicts.Collapsed:
        """One change per key of the secondary (see `conflicts`); the superseded ones are acknowledged."""
        plan = conflicts.collapse([c for c in changes if c.present], [c for c in changes if not c.present],
                                  target_keys(self.plan.mappings[table]))
        if plan.superseded:
            batch.shipped += plan.superseded
            self.observer.keys_collapsed(table, len(plan.superseded), plan.examples)
        stood_in: list[tuple[object, object]] = [(c.key, c.stand_in) for c in changes if c.stand_in is not None]
        if stood_in:
            self.observer.deletes_stood_in(table, stood_in)
        return plan

    def ship_upserts(self, table: str, changes: list[Change], batch: Batch, held: list[Held] | None = None) -> None:
        """Map each present row (a row the mapping refuses is dead-lettered) and send them, grouped by their set
        of columns; rows refused for a unique value go to `held` when given."""
        mapping = self.plan.mappings[table]
        groups: dict[tuple[str, ...], list[Item]] = {}
        rendered: list[Item] = [(change, change.rendered) for change in changes if change.rendered is not None]
        for change in changes:
            if change.rendered is not None:
                continue
            try:
                payload = mapping.map_row(change.current_row, change.decoded)
            except RowError as exc:
                batch.dead.append(DeadLetter(change, str(exc)))
                continue
            groups.setdefault(tuple(payload), []).append((change, payload))  # PostgREST: same keys per request
        if rendered:  # SQLite's JSON of every column: the same keys as map_row's of a row of the same columns
            groups.setdefault(("(rendered)",), []).extend(rendered)
        for items in groups.values():
            for chunk in by_size(items, self.settings.config.worker.batch_bytes):
                self.send(table, "upsert", chunk, batch, held)

    def ship_deletes(self, table: str, changes: list[Change], batch: Batch) -> None:
        """Map each gone row's key (a key the mapping refuses is dead-lettered) and send the deletes."""
        mapping = self.plan.mappings[table]
        items: list[Item] = []
        for change in changes:
            try:
                items.append((change, mapping.map_key(change.decoded)))
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
            spec = self.settings.target.describe()
        except TargetError:
            return False
        return self.plan.mappings[table].target not in conflicts.referenced_tables(spec)

    def reinsert(self, table: str, items: list[Held], batch: Batch) -> None:
        """Delete these rows in the secondary, then upsert them: a cycle of unique values applied through a
        moment without them (readers of the secondary may see them missing for that long)."""
        mapping = self.plan.mappings[table]
        removal, kept = Batch(), list[Held]()
        keys: list[Item] = [(change, mapping.map_key(change.decoded))
                            for change, _, _ in items]
        self.send(table, "delete", keys, removal, kept, holds=lambda error: True)
        removed = {id(change) for change in removal.shipped}
        refused: list[Held] = []
        self.send(table, "upsert", [(c, p) for c, p, _ in items if id(c) in removed], batch, refused)
        for change, _, error in [*refused, *(held for held in items if id(held[0]) not in removed)]:
            self.reject(table, change, error, batch)  # not deleted (a trigger refused?): the values stay put
        if removed:
            self.observer.unique_cycle(table, len(removed))

    def send(self, table: str, op: str, items: list[Item], batch: Batch, held: list[Held] | None = None,
             holds: Callable[[TargetError], bool] = lambda error: error.unique_violation) -> None:
        """Ship items; on a row error bisect until the failing rows are alone, and reject only those (a row refused
        for a reason `holds` goes to `held` when given, to be sent again later)."""
        if self.halts.holds(table, "delete" if op == "delete" else "upsert"):
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
            elif error.kind == "row" and (required := self.schema_halts.unfed_column(table, error)) is not None:
                # every row would be refused: the table's problem, not its rows'
                self.schema_halts.halt_until_recheck(table, self.schema_halts.required_halt(table, required), error)
            elif error.kind == "row" and len(items) > 1:
                middle = len(items) // 2
                self.send(table, op, items[:middle], batch, held, holds)
                self.send(table, op, items[middle:], batch, held, holds)
            elif error.kind == "row" and held is not None and holds(error):
                held.append((items[0][0], items[0][1], error))
            elif error.kind == "row":
                self.reject(table, items[0][0], error, batch)
            elif error.kind in ("config", "auth", "schema"):  # auth here: the token could not be renewed
                halt = (self.schema_halts.schema_halt(table, error) if error.kind == "schema" else
                        Halt(error.kind, error.message))
                self.schema_halts.halt_until_recheck(table, halt, error)
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
        mapping = self.plan.mappings[table]
        target = self.settings.target
        try:
            if op == "upsert":
                target.upsert(mapping.target, mapping.target_key, payloads)
            else:
                target.delete(mapping.target, mapping.target_key, [key for key in payloads if isinstance(key, dict)])
        except TargetError as error:
            if not error.foreign_key:  # a matter of order until proven otherwise: a requeue, or a dead letter
                self.observer.exchange_failed(table, error)
            raise

    def reject(self, table: str, change: Change, error: TargetError, batch: Batch) -> None:
        """A row the secondary refused: requeue it behind its parent or behind the row that holds its unique value
        (an FK or unique refusal, a bounded number of times), else dead-letter it with the reason."""
        with self.lock:
            attempts = self.fk_attempts[(table, change.key_text)]
            if (error.foreign_key or error.unique_violation) and attempts < self.settings.config.worker.fk_retries:
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

    def order_problem(self, table: str, items: list[Item]) -> bool:
        """Whether a batch of upserts that a foreign key refused (23503) is most likely early rather than wrong: the
        table has a parent among the synced tables, and none of its keys has used up its `fk_retries` yet. Such a
        batch is requeued whole (its parents, enqueued before it or claimed beside it, land first); once its keys
        have been requeued that often, it is bisected and only the rows whose parent is missing go to the dead
        letters."""
        if not self.plan.ancestors.get(table):
            return False
        with self.lock:
            return all(self.fk_attempts[(table, change.key_text)] < self.settings.config.worker.fk_retries
                       for change, _ in items)

    def regrow(self) -> None:
        """After a statement timeout halved the batch, double it again every REGROW_AFTER clean batches."""
        limit = self.settings.config.worker.batch_size
        if self.batch_size >= limit:
            return
        self.clean_batches += 1
        if self.clean_batches >= REGROW_AFTER:
            self.clean_batches = 0
            self.batch_size = min(limit, self.batch_size * 2)


def by_size(items: list[Item], limit: int) -> Iterator[list[Item]]:
    """`items` in consecutive chunks whose JSON stays under about `limit` bytes (a row over it goes alone)."""
    chunk: list[Item] = []
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
