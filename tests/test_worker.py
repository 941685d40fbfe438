"""The drain loop's decisions with a scripted fake target: bisection, foreign-key requeue, halting (a
config error, a token that cannot be renewed), partial acknowledgement, adaptive batch size, and the backoff
function."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import apsw
import pytest
import structlog

from syncd import backoff, capture, outbox
from syncd.config import Config, TableConfig
from syncd.mapping import JsonText
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.outbox import Change
from syncd.shipping import Interrupted, by_size
from syncd.source import Source
from syncd.sqlite import SchemaMoved, schema_version
from syncd.sqlite import connect as sqlite_connect
from syncd.state import connect
from syncd.target import TargetError
from syncd.window import Shipment
from syncd.worker import Worker
from tests.test_capture import app, installed

SCHEMA = "CREATE TABLE parent (id INTEGER PRIMARY KEY, v); CREATE TABLE child (id INTEGER PRIMARY KEY, " \
         "parent_id INTEGER REFERENCES parent (id), v);"
Rule = Callable[[str, str, Sequence[dict[str, object]]], TargetError | None]


class FakeTarget:
    """Records every request; `rules` decide which requests fail and how."""

    def __init__(self, *rules: Rule, columns: dict[str, list[str]] | None = None) -> None:
        self.rules = list(rules)
        self.columns = columns  # the schema it describes; None: it describes none (PostgREST's openapi-mode off)
        self.requests: list[tuple[str, str, list[dict[str, object]]]] = []
        self.stored: dict[str, dict[object, dict[str, object]]] = {}

    def answer(self, op: str, table: str, items: Sequence[dict[str, object] | str]) -> None:
        items = [json.loads(item) if isinstance(item, str) else item for item in items]  # rendered by SQLite
        self.requests.append((op, table, list(items)))
        for rule in self.rules:
            error = rule(op, table, items)
            if error is not None:
                raise error
        rows = self.stored.setdefault(table, {})
        for item in items:
            if op == "upsert":
                rows[item["id"]] = dict(item)
            else:
                rows.pop(item["id"], None)

    def upsert(self, table: str, key: Sequence[str], rows: Sequence[dict[str, object]]) -> None:
        self.answer("upsert", table, rows)

    def delete(self, table: str, key: Sequence[str], keys: Sequence[dict[str, object]]) -> int:
        self.answer("delete", table, keys)
        return 1

    def ping(self, table: str) -> None:
        self.answer("ping", table, [])

    def describe(self) -> dict[str, object]:
        if self.columns is None:
            raise TargetError("config", "GET /: 404 (openapi-mode = disabled)")
        return {"definitions": {table: {"properties": {c: {"format": "text"} for c in columns}}
                                for table, columns in self.columns.items()}}


def row_error(bad: set[object], code: str = "23514") -> Rule:
    def rule(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if any(item["id"] in bad for item in items):
            return TargetError("row", f"{code} refused", status=400, code=code)
        return None
    return rule


def worker_for(tmp_path: Path, target: FakeTarget, **worker: object) -> tuple[Worker, sqlite3.Connection]:
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"}, {"name": "child"})
    config = Config.model_validate({"source": {"path": str(path)}, "table": [{"name": "parent"}, {"name": "child"}],
                                    "worker": worker})
    return Worker(Source(path), config, target, Observer(Metrics())), app(path)


def outbox_size(db: sqlite3.Connection) -> int:
    """Outbox entries still pending: those acknowledged leave `_syncd_outbox` at the next flush (in a second)."""
    path = Path(db.execute("PRAGMA database_list").fetchone()[2])
    return outbox.pending_total(connect(path))


def current(change: Change) -> dict[str, object]:
    """The row a claim read for a change: as SQLite rendered it (JSON), or as Python will map it."""
    return json.loads(change.rendered) if change.rendered is not None else dict(change.row or {})


def journal(tmp_path: Path) -> list[tuple[str, str]]:
    """The journal of shipped keys, in the state file beside the app's file."""
    return outbox.journal_keys(connect(tmp_path / "app.sqlite3"), 0)


def dead(db: sqlite3.Connection) -> list[tuple[str, str]]:
    return db.execute("SELECT tbl, key FROM _syncd_dead_letter ORDER BY key").fetchall()


def test_bisection_dead_letters_exactly_the_bad_rows(tmp_path: Path):
    target = FakeTarget(row_error({7, 33}))
    worker, db = worker_for(tmp_path, target)
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(64)])
    result = worker.drain_once()
    assert (result.shipped, result.dead) == (62, 2)
    assert dead(db) == [("parent", "33"), ("parent", "7")]
    assert sorted(target.stored["parent"]) == [i for i in range(64) if i not in (7, 33)]
    assert outbox_size(db) == 0
    assert len(target.requests) < 64  # bisected, not one request per row


def test_parents_are_upserted_before_children_and_children_deleted_first(tmp_path: Path):
    target = FakeTarget()
    worker, db = worker_for(tmp_path, target)
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    worker.drain_once()
    assert [(op, t) for op, t, _ in target.requests] == [("upsert", "parent"), ("upsert", "child")]
    target.requests.clear()
    db.execute("DELETE FROM parent")
    db.execute("DELETE FROM child")
    worker.drain_once()
    assert [(op, t) for op, t, _ in target.requests] == [("delete", "child"), ("delete", "parent")]


def test_foreign_key_refusal_is_requeued_then_dead_lettered(tmp_path: Path):
    target = FakeTarget(row_error({5}, code="23503"))
    worker, db = worker_for(tmp_path, target, fk_retries=2)
    db.execute("INSERT INTO child VALUES (5, 99, 'orphan')")
    assert worker.drain_once().requeued == 1
    assert outbox_size(db) == 1 and dead(db) == []
    assert worker.drain_once().requeued == 1
    assert worker.drain_once().dead == 1
    assert dead(db) == [("child", "5")] and outbox_size(db) == 0


def test_foreign_key_refusal_heals_when_the_parent_arrives(tmp_path: Path):
    parent_missing = {"yes": True}

    def fk_until_parent(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if table == "child" and parent_missing["yes"]:
            return TargetError("row", "23503", status=409, code="23503")
        return None

    worker, db = worker_for(tmp_path, FakeTarget(fk_until_parent))
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    assert worker.drain_once().requeued == 1
    parent_missing["yes"] = False
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    assert worker.drain_once().shipped == 2
    assert dead(db) == [] and outbox_size(db) == 0


class PendingReconciles:
    """A reconciler as the worker sees it: the tables whose reconcile is waiting or running (`tables`)."""

    def __init__(self, *tables: str) -> None:
        self.tables = set(tables)

    def pending(self) -> frozenset[str]:
        return frozenset(self.tables)

    def request(self, table: str, reason: str) -> None:
        self.tables.add(table)

    def retry_now(self) -> None:
        pass


def refused_while_parent_missing(target: FakeTarget) -> Rule:
    """PostgreSQL's foreign key: a child's upsert needs its parent row, a parent's delete needs no child of it."""
    def rule(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        parents, children = target.stored.get("parent", {}), target.stored.get("child", {}).values()
        if (table == "child" and op == "upsert" and any(i["parent_id"] not in parents for i in items)) or \
                (table == "parent" and op == "delete" and any(c["parent_id"] == i["id"] for i in items
                                                             for c in children)):
            return TargetError("row", "23503 refused", status=409, code="23503")
        return None
    return rule


def test_a_child_waits_for_the_reconcile_that_sends_its_parent_instead_of_being_dead_lettered(tmp_path: Path):
    """Soak: a parent's 12-step rebuild lost its triggers while the app added parent 2 and moved child 10 onto it;
    only the parent's reconcile will put parent 2 into the outbox. Meanwhile the child's upsert waits (shipped, it
    would be refused again and again, and dead-lettered after fk_retries), and ships once the reconcile is done."""
    target = FakeTarget()
    target.rules.append(refused_while_parent_missing(target))
    worker, db = worker_for(tmp_path, target, fk_retries=2)
    reconciles = PendingReconciles("parent")
    worker.keeper.reconciler = reconciles  # type: ignore[assignment]  # the part of Reconciler the worker uses
    db.execute("INSERT INTO child VALUES (10, 2, 'moved')")
    for _ in range(4):  # more turns than fk_retries allows
        worker.drain_once()
    assert dead(db) == [] and outbox_size(db) == 1
    assert not any(table == "child" for _, table, _ in target.requests), "the child's upsert did not wait"
    db.execute("INSERT INTO parent VALUES (2, 'p')")  # what the reconcile enqueues, as SQLite's row
    reconciles.tables.clear()
    while worker.drain_once().claimed:
        pass
    assert sorted(target.stored["child"]) == [10] and dead(db) == [] and outbox_size(db) == 0


def test_a_parents_delete_waits_for_the_reconcile_of_its_child_table(tmp_path: Path):
    """A restore: the child's reconcile will enqueue the deletes of children the restored file lacks; until it has,
    the delete of their parent waits (the secondary would refuse it while they are there)."""
    target = FakeTarget()
    target.rules.append(refused_while_parent_missing(target))
    target.stored = {"parent": {1: {"id": 1, "v": "p"}}, "child": {10: {"id": 10, "parent_id": 1, "v": "c"}}}
    worker, db = worker_for(tmp_path, target, fk_retries=2)
    reconciles = PendingReconciles("child")
    worker.keeper.reconciler = reconciles  # type: ignore[assignment]  # the part of Reconciler the worker uses
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("DELETE FROM parent WHERE id = 1")
    for _ in range(4):
        worker.drain_once()
    assert dead(db) == [] and outbox_size(db) == 2 and 1 in target.stored["parent"]  # its insert and its delete
    target.stored["child"].clear()  # the child's delete, enqueued by the reconcile, has shipped
    reconciles.tables.clear()
    while worker.drain_once().claimed:
        pass
    assert target.stored["parent"] == {} and dead(db) == [] and outbox_size(db) == 0


@pytest.mark.parametrize("rename", ["id TO pid", "v TO value"])
def test_a_claim_made_before_the_loop_saw_a_rename_plans_again_and_never_ships_a_delete(tmp_path: Path, rename: str):
    """CI: the app renamed the key column and inserted row 11 between two looks of the loop; the claim, planned
    for `id`, compared the key with the text 'id' (SQLite's double-quoted string fallback), found no row and
    shipped a delete: row 11 was lost. A claim now checks the schema cookie it was planned at, plans again, and
    the table whose key changed halts with its entries kept; a renamed column other than the key ships under
    its new name, never a delete."""
    target = FakeTarget()
    worker, db = worker_for(tmp_path, target)
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    worker.drain_once()
    assert target.stored["parent"] == {1: {"id": 1, "v": "p"}}
    db.execute(f"ALTER TABLE parent RENAME COLUMN {rename}")
    db.execute("INSERT INTO parent VALUES (11, 'after')")
    worker.drain_once()  # no look in between: the claim itself must notice
    assert not any(op == "delete" for op, _, _ in target.requests), target.requests
    if rename.startswith("id"):
        assert "parent" in worker.halted and "pid" in worker.halted["parent"].reason, worker.halted
        assert outbox_size(db) == 1 and target.stored["parent"] == {1: {"id": 1, "v": "p"}}
    else:
        assert target.stored["parent"][11] == {"id": 11, "value": "after"} and outbox_size(db) == 0


def test_syncd_reads_a_double_quoted_name_that_is_no_column_as_an_error_not_a_string(tmp_path: Path):
    """https://sqlite.org/quirks.html#dblquote: by default SQLite reads "id" as the text 'id' when no column has
    that name; syncd's connection refuses it, so a stale statement fails loudly instead of matching nothing."""
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    conn = sqlite_connect(path)
    with pytest.raises(apsw.SQLError, match="no such column"):
        conn.execute('SELECT * FROM parent WHERE "nope" = 1').fetchall()


def test_triggers_are_not_healed_for_a_schema_that_moved_since_it_was_examined(tmp_path: Path):
    """A trigger written for a schema the app has changed since (a column renamed meanwhile) would fail the app's
    own writes: reinstall refuses, nothing written, when the schema cookie is not the one examined."""
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    conn = sqlite_connect(path)
    health = capture.examine(conn, TableConfig(name="parent"), capture.existing_triggers(conn))
    assert health.plan is not None
    examined_at = schema_version(conn)
    app(path).execute("ALTER TABLE parent ADD COLUMN w")
    triggers = capture.existing_triggers(conn)
    with pytest.raises(SchemaMoved):
        capture.reinstall(conn, [health.plan], "test", examined_at)
    assert capture.existing_triggers(conn) == triggers


def metric(worker: Worker, name: str, **labels: str) -> float:
    return worker.observer.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_batch_of_children_refused_for_pending_parents_is_requeued_whole_not_bisected(tmp_path: Path):
    """Issue 19, point 2: a first copy that sends children before their parents. The refused batch goes behind the
    parents as a whole (one request, no bisection), counted as requeued and not as a row failure; once the parents
    have landed the children ship, and nothing is dead-lettered."""
    def fk_until_parents(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if table == "child" and op == "upsert" and any(i["parent_id"] not in target.stored.get("parent", {})
                                                       for i in items):
            return TargetError("row", "POST child: 409 23503 violates foreign key constraint", status=409,
                               code="23503")
        return None

    target = FakeTarget(fk_until_parents)
    worker, db = worker_for(tmp_path, target, batch_size=50)
    db.executemany("INSERT INTO child VALUES (?, ?, 'c')", [(i, i % 5) for i in range(50)])
    db.executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(5)])
    assert worker.drain_once().requeued == 50
    assert [(op, t, len(rows)) for op, t, rows in target.requests] == [("upsert", "child", 50)]
    assert metric(worker, "syncd_requeued_total", table="child", reason="foreign key") == 50
    assert metric(worker, "syncd_ship_failures_total", table="child", **{"class": "row"}) == 0
    while worker.drain_once().claimed:
        pass
    assert sorted(target.stored["child"]) == list(range(50)) and dead(db) == []


def test_a_child_whose_parent_never_comes_is_bisected_out_after_its_retries(tmp_path: Path):
    """A batch is requeued whole only while its keys have retries left; then it is bisected, the rows with a parent
    ship and the orphan alone is dead-lettered (and only then counted as a row failure)."""
    def orphan(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if table == "child" and any(i["parent_id"] == 99 for i in items):
            return TargetError("row", "POST child: 409 23503 violates foreign key constraint", status=409,
                               code="23503")
        return None

    target = FakeTarget(orphan)
    worker, db = worker_for(tmp_path, target, fk_retries=2)
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.executemany("INSERT INTO child VALUES (?, ?, 'c')", [(i, 99 if i == 3 else 1) for i in range(8)])
    while worker.drain_once().claimed:
        pass
    assert dead(db) == [("child", "3")]
    assert sorted(target.stored["child"]) == [0, 1, 2, 4, 5, 6, 7]
    assert metric(worker, "syncd_ship_failures_total", table="child", **{"class": "row"}) >= 1


def test_an_expired_token_that_cannot_be_renewed_halts_its_table(tmp_path: Path):
    """The target renews an expired token itself (tests/test_target.py); an `auth` error that still reaches
    the worker means it could not (a fixed key): the table halts, nothing is dead-lettered."""
    def expired(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        return TargetError("auth", "401 PGRST301 JWT expired", status=401, code="PGRST301") \
            if table == "child" else None

    worker, db = worker_for(tmp_path, FakeTarget(expired))
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    assert worker.drain_once().shipped == 1 and "child" in worker.halted
    assert dead(db) == [] and db.execute("SELECT tbl FROM _syncd_outbox").fetchall() == [("child",)]


def test_config_error_halts_one_table_while_others_ship(tmp_path: Path):
    def deny_child(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        return TargetError("config", "403 42501 permission denied", status=403, code="42501") \
            if table == "child" else None

    worker, db = worker_for(tmp_path, FakeTarget(deny_child))
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    result = worker.drain_once()
    assert result.shipped == 1 and "child" in worker.halted
    assert db.execute("SELECT tbl FROM _syncd_outbox").fetchall() == [("child",)]
    assert worker.drain_once().claimed == 0  # halted tables are not claimed
    worker.halts.resume()
    assert worker.drain_once().claimed == 1


def test_transient_failure_keeps_what_shipped_and_interrupts(tmp_path: Path):
    def down_for_child(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        return TargetError("transient", "503", status=503, retry_after=2) if table == "child" else None

    worker, db = worker_for(tmp_path, FakeTarget(down_for_child))
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    with structlog.testing.capture_logs() as logs, pytest.raises(Interrupted) as caught:
        worker.drain_once()
    assert caught.value.error.retry_after == 2
    assert [(e["shipped"], e["outcome"]) for e in logs if e["event"] == "batch"] == [(1, "interrupted")]
    assert db.execute("SELECT tbl FROM _syncd_outbox").fetchall() == [("child",)]
    assert dead(db) == []


def test_statement_timeout_halves_the_batch(tmp_path: Path):
    def timeout_big(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        return TargetError("transient", "57014", status=500, code="57014") if len(items) > 10 else None

    worker, db = worker_for(tmp_path, FakeTarget(timeout_big), batch_size=40)
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(40)])
    sizes = []
    for _ in range(10):
        try:
            worker.drain_once()
        except Interrupted:
            sizes.append(worker.shipping.batch_size)
    assert sizes == [20, 10] and outbox_size(db) == 0


def test_batch_size_grows_back_after_clean_batches(tmp_path: Path):
    worker, db = worker_for(tmp_path, FakeTarget(), batch_size=40)
    worker.shipping.batch_size = 10
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(2000)])
    sizes = {worker.shipping.batch_size}
    for _ in range(60):
        worker.drain_once()
        sizes.add(worker.shipping.batch_size)
    assert sizes == {10, 20, 40} and worker.shipping.batch_size == 40


def test_only_claimed_entries_are_acknowledged(tmp_path: Path):
    """A change committed while a request is in flight stays queued and ships its newer state next."""
    db_holder: dict[str, sqlite3.Connection] = {}

    def write_meanwhile(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if items and items[0].get("v") == "old":
            db_holder["db"].execute("UPDATE parent SET v = 'new' WHERE id = 1")
        return None

    target = FakeTarget(write_meanwhile)
    worker, db = worker_for(tmp_path, target)
    db_holder["db"] = db
    db.execute("INSERT INTO parent VALUES (1, 'old')")
    worker.drain_once()
    assert target.stored["parent"][1]["v"] == "old" and outbox_size(db) == 1
    worker.drain_once()
    assert target.stored["parent"][1]["v"] == "new" and outbox_size(db) == 0


def test_journal_records_shipped_keys(tmp_path: Path):
    worker, db = worker_for(tmp_path, FakeTarget())
    db.execute("INSERT INTO parent VALUES (3, 'p')")
    worker.drain_once()
    assert journal(tmp_path) == [("parent", "3")]


@pytest.mark.parametrize("failures", [1, 2, 5, 10, 40])
def test_backoff_is_capped_full_jitter(failures: int):
    assert backoff.delay(failures, rand=lambda: 1.0, cap=30) == min(30, 0.1 * 2 ** (failures - 1))
    assert backoff.delay(failures, rand=lambda: 0.0) == 0.0


def test_a_column_the_secondary_lacks_halts_its_table_before_the_first_request(tmp_path: Path):
    """The start check (issue 12): the table whose column the secondary's description lacks is halted with the exact
    DDL and the exclude to set; not one of its rows is sent; the other table ships."""
    target = FakeTarget(columns={"parent": ["id", "v"], "child": ["id", "parent_id"]})
    worker, db = worker_for(tmp_path, target)
    db.execute("INSERT INTO parent VALUES (1, 'p')")
    db.execute("INSERT INTO child VALUES (1, 1, 'c')")
    worker.drain_once()
    assert [(op, table) for op, table, _ in target.requests] == [("upsert", "parent")]
    reason = worker.halted["child"].reason
    assert 'ALTER TABLE "public"."child" ADD COLUMN "v" text' in reason and 'exclude = ["v"]' in reason, reason
    target.columns["child"].append("v")
    worker.keeper.schema_halts.next_schema_check = 0
    worker.keeper.schema_halts.recheck()
    assert "child" not in worker.halted


def test_the_fix_for_a_missing_column_names_its_type_and_the_transform_it_needs():
    """An app's migration added a JSON and a BOOLEAN column: the DDL takes the casting table's types, and the config
    change that makes syncd send them as such is named too (else PostgreSQL stores the JSON text as a string)."""
    from syncd import schema
    from syncd.check import type_problem
    from syncd.config import TableConfig
    from syncd.mapping import TableMapping

    mapping = TableMapping.from_config(TableConfig.model_validate({"name": "users"}), ("id",))
    names = ["id", "settings", "verified"]
    shipped = schema.Shipped(names, {n: n for n in names}, {"id": "INTEGER", "settings": "JSON", "verified": "BOOLEAN"})
    mismatch = schema.compare({"definitions": {"users": {"properties": {"id": {}}}}}, mapping, shipped)
    assert mismatch is not None
    assert mismatch.ddl() == 'ALTER TABLE "public"."users" ADD COLUMN "settings" jsonb, ADD COLUMN "verified" boolean'
    text = mismatch.describe()
    assert '[table.columns.settings] transform = "json"' in text
    assert '[table.columns.verified] transform = "bool"' in text
    assert type_problem(None, "JSON", "jsonb") is not None  # check warns whatever the declared type


def test_batches_are_bounded_by_the_json_documents_they_carry():
    """A `json` column's document (a dict, or JsonText kept as written) counts with its length, not as a number."""
    change = Change("t", "1", [])
    rows = [(change, {"id": 1, "doc": {"text": "x" * 5000}}),
            (change, {"id": 2, "doc": JsonText("[" + "1," * 2500 + "1]")}), (change, {"id": 3, "doc": None})]
    assert [len(chunk) for chunk in by_size(rows, 6000)] == [1, 2]  # type: ignore[arg-type]


def test_backoff_stays_capped_after_thousands_of_failures():
    """An outage of hours at a small max_backoff counts past 1024 failures, where 2**n no longer fits a float."""
    assert backoff.delay(5000, rand=lambda: 1.0, cap=1.0) == 1.0


def test_backoff_honours_retry_after():
    assert backoff.delay(1, rand=lambda: 0.0, retry_after=4) == 4
    assert backoff.delay(1, rand=lambda: 0.0, retry_after=400, cap=30) == 30


def test_a_claim_beside_a_batch_in_flight_leaves_its_keys_out(tmp_path: Path):
    """The overlapping claim skips keys in flight; their newer state ships after the acknowledgement."""
    worker, db = worker_for(tmp_path, FakeTarget())
    db.executemany("INSERT INTO parent VALUES (?, 'old')", [(i,) for i in range(1, 6)])
    first = worker.claim()
    db.execute("UPDATE parent SET v = 'new' WHERE id = 1")
    db.execute("INSERT INTO parent VALUES (9, 'late')")
    beside = worker.claim(first.changes)
    assert [c.key for c in beside.changes] == [(9,)]
    worker.finish(worker.deliver(first))
    worker.finish(worker.deliver(beside))
    last = worker.claim()
    assert [(c.key, current(c)["v"]) for c in last.changes] == [((1,), "new")]
    worker.finish(worker.deliver(last))
    assert worker.target.stored["parent"][1]["v"] == "new" and outbox_size(db) == 0


def test_a_claim_reads_only_new_entries_and_the_ones_it_names_whatever_is_in_flight(tmp_path: Path):
    """With batches in flight, a claim reads after the highest seq read so far and names only the open entries below
    it that no batch holds (passed over for a key in flight): its cost does not grow with the window. A passed-over
    entry ships once its key's batch is acknowledged; an interrupted batch's entries are claimed again."""
    from concurrent.futures import Future

    worker, db = worker_for(tmp_path, FakeTarget(), batch_size=2)
    db.executemany("INSERT INTO parent VALUES (?, 'old')", [(i,) for i in range(1, 7)])

    def send(shipment: Shipment) -> None:
        future: Future[Shipment] = Future()
        future.set_result(worker.deliver(shipment))
        worker.window.batches.append((shipment, future))

    for _ in range(3):
        send(worker.claim(worker.window.in_flight()))
    assert worker.window.claim_from() == (6, [])  # 3 batches, 6 entries in flight: nothing below 6 is read again
    db.execute("UPDATE parent SET v = 'new' WHERE id = 1")  # seq 7, its key in flight
    assert worker.claim(worker.window.in_flight()) is None
    assert worker.window.claim_from() == (7, [7])
    worker.finish(worker.window.batches.popleft()[0])
    again = worker.claim(worker.window.in_flight())
    assert again is not None and [(c.key, current(c)["v"]) for c in again.changes] == [((1,), "new")]
    send(again)
    dropped = worker.window.batches[1][0]  # never acknowledged (a drain left early): its entries stay open
    del worker.window.batches[1]
    assert worker.window.claim_from()[1] == [e.seq for c in dropped.changes for e in c.entries]
    while worker.window.batches:
        worker.finish(worker.window.batches.popleft()[0])
    reclaimed = worker.claim()
    assert reclaimed is not None and sorted(c.key for c in reclaimed.changes) == sorted(c.key for c in dropped.changes)
    worker.finish(worker.deliver(reclaimed))
    worker.flush_when_due(final=True)
    assert worker.claim() is None and outbox_size(db) == 0
    assert worker.target.stored["parent"][1]["v"] == "new" and sorted(worker.target.stored["parent"]) == [*range(1, 7)]


def test_claims_after_a_flush_go_on_above_a_halted_tables_backlog(tmp_path: Path):
    """After every flush the claims went back to the first seq, and read again the backlog a halted table keeps at
    the low end of the outbox; they go on above it now (counted in SQLite's virtual machine steps, not timed)."""
    import threading

    from syncd.halts import Halt

    worker, db = worker_for(tmp_path, FakeTarget())
    assert worker.claim() is None  # the tables planned
    worker.halts.halt("child", Halt("config", "halted by this test"))
    db.execute("BEGIN")
    db.executemany("INSERT INTO child VALUES (?, NULL, 'waits')", [(i,) for i in range(5000)])
    db.execute("COMMIT")
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(10)])
    worker.drain(threading.Event())
    worker.flush_when_due(final=True)
    db.execute("INSERT INTO parent VALUES (100, 'after the flush')")
    steps: list[int] = []

    def count(event: dict[str, object]) -> None:
        if str(event["sql"]).startswith("SELECT seq, tbl"):
            steps.append(cast(dict[str, int], event["stmt_status"])["SQLITE_STMTSTATUS_VM_STEP"])

    worker.conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, count)
    again = worker.claim()
    worker.conn.trace_v2(0, None)
    assert again is not None and [c.key for c in again.changes] == [(100,)]
    assert steps and max(steps) < 1000, steps  # reading the 5,000 entries below would take more than 5 steps each
    assert outbox_size(db) == 5001


def raw_outbox(db: sqlite3.Connection) -> int:
    """Every entry of `_syncd_outbox`, acknowledged or not (a flush deletes the acknowledged ones)."""
    return cast(int, db.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0])


def test_entries_deleted_behind_the_claims_back_are_read_again_from_the_first_seq(tmp_path: Path):
    """Another process empties the outbox (an operator's DELETE, a flush the window never heard of): SQLite hands
    the next entries seqs 1, 2, ... again, at or below the highest seq the claims read. They are claimed, not passed
    over until the file is next opened."""
    import threading

    worker, db = worker_for(tmp_path, FakeTarget())
    db.executemany("INSERT INTO parent VALUES (?, 'first')", [(i,) for i in range(1, 6)])
    worker.drain(threading.Event())
    assert worker.window.claim_from() == (5, [])
    db.execute("DELETE FROM _syncd_outbox")
    db.executemany("INSERT INTO parent VALUES (?, 'after the delete')", [(i,) for i in range(10, 13)])
    assert [row[0] for row in db.execute("SELECT seq FROM _syncd_outbox")] == [1, 2, 3]
    again = worker.claim()
    assert again is not None and sorted(c.key for c in again.changes) == [(10,), (11,), (12,)]
    worker.finish(worker.deliver(again))
    assert sorted(worker.target.stored["parent"]) == [1, 2, 3, 4, 5, 10, 11, 12]
    assert worker.claim() is None


def test_a_daemon_standing_by_applies_none_of_the_holders_acknowledgements(tmp_path: Path):
    """Two daemons on one file: the one standing by closes (its file idle, or it stops) while the holder has
    acknowledged entries not yet flushed. It leaves them to the holder (applying them would empty the outbox behind
    the holder's claims), and the holder ships on and flushes them."""
    import threading

    from syncd.worker import Pause

    stop = threading.Event()
    holder, db = worker_for(tmp_path, FakeTarget())
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(1, 6)])
    assert cast(Pause, holder.turn(stop)).wakeable  # shipped: the idle wait
    assert raw_outbox(db) == 5 and outbox_size(db) == 0  # acknowledged, their flush not yet due
    standing_by = Worker(Source(tmp_path / "app.sqlite3"), holder.config, FakeTarget(), Observer(Metrics()))
    assert standing_by.turn(stop) == Pause(standing_by.lease.retry_after)
    standing_by.close_out()
    standing_by.conn.close()
    assert raw_outbox(db) == 5
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(6, 9)])
    holder.turn(stop)
    holder.close_out()
    assert sorted(holder.target.stored["parent"]) == [*range(1, 9)] and raw_outbox(db) == 0


def test_pipelined_drain_ships_everything_including_changes_made_while_in_flight(tmp_path: Path):
    import threading

    writer: dict[str, sqlite3.Connection] = {}

    def write_during_first_request(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if "db" not in writer:
            writer["db"] = sqlite3.connect(tmp_path / "app.sqlite3", isolation_level=None, check_same_thread=False)
            writer["db"].execute("UPDATE parent SET v = 'new' WHERE id = 1")
            writer["db"].executemany("INSERT INTO parent VALUES (?, 'late')", [(i,) for i in range(100, 130)])
        return None

    target = FakeTarget(write_during_first_request)
    worker, db = worker_for(tmp_path, target, batch_size=10)
    db.executemany("INSERT INTO parent VALUES (?, 'old')", [(i,) for i in range(1, 11)])
    worker.drain(threading.Event())
    assert target.stored["parent"][1]["v"] == "new"
    assert sorted(target.stored["parent"]) == [*range(1, 11), *range(100, 130)]
    assert outbox_size(db) == 0


def test_an_idle_daemon_checks_the_secondary_for_readiness(tmp_path: Path):
    down = {"now": True}

    def unreachable(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        return TargetError("transient", "ConnectError: refused") if down["now"] else None

    target = FakeTarget(unreachable)
    worker, _ = worker_for(tmp_path, target)
    assert worker.metrics.health.ready() == (False, "no exchange with the secondary yet")
    worker.probe_when_idle()
    assert worker.metrics.health.ready() == (False, "ConnectError: refused")
    worker.probe_when_idle()  # within PROBE_RETRY: no second request
    assert [r[0] for r in target.requests] == ["ping"]
    down["now"] = False
    worker.timers.next_probe = 0.0
    worker.probe_when_idle()
    assert worker.metrics.health.ready() == (True, "ok") and target.requests[-1] == ("ping", "parent", [])
