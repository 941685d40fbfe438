"""The source as the worker lives with it, unit by unit: the file's identity and schema version, capture's
health and its repair, the worker's reactions (heal, halt on a changed key, adopt a replaced file, wait out
busy and disk faults, halt on a schema mismatch and resume by itself, reload on SIGHUP), with a fake target.
The real process end to end is in tests/test_source_lifecycle.py."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import apsw
import pytest

from syncd import capture, outbox
from syncd.config import Config, ConfigError, differences
from syncd.halts import Halt
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.source import Event, Source
from syncd.state import connect
from syncd.target import TargetError
from syncd.worker import Worker
from tests.test_capture import app, installed
from tests.test_worker import FakeTarget

SCHEMA = "CREATE TABLE parent (id INTEGER PRIMARY KEY, v); CREATE TABLE child (id INTEGER PRIMARY KEY, v);"


class DescribedTarget(FakeTarget):
    """A fake secondary that also describes its schema (PostgREST's OpenAPI `definitions`)."""

    def __init__(self, *rules, columns: dict[str, list[str]] | None = None) -> None:
        super().__init__(*rules)
        self.columns = columns or {"parent": ["id", "v"], "child": ["id", "v"]}

    def describe(self) -> dict[str, object]:
        return {"definitions": {t: {"properties": {c: {} for c in cs}} for t, cs in self.columns.items()}}


def make_worker(tmp_path: Path, target: FakeTarget, **worker: object) -> tuple[Worker, sqlite3.Connection, Config]:
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"}, {"name": "child"})
    config = Config.model_validate({"source": {"path": str(path)}, "table": [{"name": "parent"}, {"name": "child"}],
                                    "worker": worker})
    return Worker(Source(path), config, target, Observer(Metrics())), app(path), config


def triggers(db: sqlite3.Connection, table: str) -> list[str]:
    return sorted(r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?",
                                           (table,)))


# -- the source ------------------------------------------------------------------------------------------


def test_source_sees_a_schema_change_once_and_a_replacement_until_reopened(tmp_path: Path):
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    source = Source(path)
    assert source.check() is Event.NONE
    app(path).execute("ALTER TABLE parent ADD COLUMN w")
    assert source.check() is Event.SCHEMA and source.check() is Event.NONE
    shutil.copy(path, tmp_path / "copy.sqlite3")
    os.replace(tmp_path / "copy.sqlite3", path)
    assert source.check() is Event.REPLACED and source.check() is Event.REPLACED
    source.reopen()
    assert source.check() is Event.NONE
    os.remove(path)
    assert source.check() is Event.GONE


# -- capture's health ------------------------------------------------------------------------------------


def test_a_rebuilt_table_is_repairable_and_reinstall_marks_it_for_a_reconcile(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, {"name": "parent"})
    db = app(path)
    db.executescript("BEGIN; CREATE TABLE new_parent (id INTEGER PRIMARY KEY, v, w); INSERT INTO new_parent (id, v) "
                     "SELECT id, v FROM parent; DROP TABLE parent; ALTER TABLE new_parent RENAME TO parent; COMMIT;")
    conn = connect(path)
    health = capture.examine(conn, config.tables[0])
    assert (health.triggers, health.repairable, health.key_changed) == ("missing", True, False)
    capture.reinstall(conn, [health.plan], "rebuilt")  # type: ignore[list-item]
    assert triggers(db, "parent") == ["_syncd_parent_del", "_syncd_parent_ins", "_syncd_parent_upd"]
    assert outbox.tables_to_reconcile(conn) == {"parent": "rebuilt"}
    assert capture.examine(conn, config.tables[0]).triggers == "ok"


def test_a_changed_key_is_never_repaired(tmp_path: Path):
    path, config = installed(tmp_path, "CREATE TABLE u (code TEXT PRIMARY KEY, v);", {"name": "u"})
    app(path).execute("ALTER TABLE u RENAME COLUMN code TO ident")
    health = capture.examine(connect(path), config.tables[0])
    assert health.key_changed and not health.repairable and "the key was code" in (health.problem or "")


def test_install_by_hand_after_a_loss_marks_the_table_and_verify_repair_clears_it(tmp_path: Path):
    path, config = installed(tmp_path, SCHEMA, {"name": "parent"})
    app(path).execute("DROP TRIGGER _syncd_parent_ins")
    report = capture.install(connect(path), config)
    assert report.reconcile == ["parent"]
    conn = connect(path)
    assert "lost" in outbox.tables_to_reconcile(conn)["parent"]
    outbox.reconciled(conn, "parent", 3, 1.0, outbox.tables_to_reconcile(conn)["parent"])
    assert outbox.tables_to_reconcile(conn) == {}
    assert outbox.table_state(conn, "parent")["last_reconcile"] == {"at": 1.0, "keys": 3}


def test_a_newer_mark_survives_the_end_of_an_older_reconcile(tmp_path: Path):
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    conn = connect(path)
    with conn:
        outbox.request_reconcile(conn, "parent", "first gap")
    with conn:
        outbox.request_reconcile(conn, "parent", "second gap")
    outbox.reconciled(conn, "parent", 0, 1.0, "first gap")
    assert outbox.tables_to_reconcile(conn) == {"parent": "second gap"}


# -- the worker ------------------------------------------------------------------------------------------


def test_the_worker_heals_lost_triggers_and_ships_what_follows(tmp_path: Path):
    worker, db, _ = make_worker(tmp_path, DescribedTarget())
    db.execute("INSERT INTO parent VALUES (1, 'a')")
    worker.drain_once()
    db.executescript("BEGIN; CREATE TABLE p2 (id INTEGER PRIMARY KEY, v); INSERT INTO p2 SELECT * FROM parent; "
                     "DROP TABLE parent; ALTER TABLE p2 RENAME TO parent; COMMIT;")
    db.execute("INSERT INTO parent VALUES (2, 'written while the triggers were gone')")
    assert worker.follow_source(threading.Event())
    worker.keeper.keep_whole()
    assert triggers(db, "parent") == ["_syncd_parent_del", "_syncd_parent_ins", "_syncd_parent_upd"]
    assert worker.metrics.capture_repairs.labels(table="parent")._value.get() == 1
    assert "schema change" in outbox.tables_to_reconcile(worker.conn)["parent"]  # a reconcile brings row 2 over
    db.execute("INSERT INTO parent VALUES (3, 'c')")
    worker.drain_once()
    assert sorted(worker.target.stored["parent"]) == [1, 3]


def test_a_table_whose_key_changed_halts_and_the_others_ship(tmp_path: Path):
    worker, db, _ = make_worker(tmp_path, DescribedTarget())
    worker.keeper.prepare()
    for trigger in triggers(db, "child"):  # SQLite refuses to rename a column a trigger uses
        db.execute(f"DROP TRIGGER {trigger}")
    db.execute("ALTER TABLE child RENAME COLUMN id TO ident")
    db.execute("INSERT INTO parent VALUES (1, 'a')")
    worker.follow_source(threading.Event())
    worker.keeper.keep_whole()
    assert worker.halted["child"].kind == "capture" and "key" in worker.halted["child"].reason
    assert worker.drain_once().shipped == 1
    ready, reason = worker.metrics.health.ready()
    assert not ready and "child" in reason


def test_a_replaced_file_is_reopened_installed_and_marked_for_reconcile(tmp_path: Path):
    worker, db, config = make_worker(tmp_path, DescribedTarget())
    worker.keeper.prepare()
    backup = tmp_path / "backup.sqlite3"
    plain = sqlite3.connect(backup)
    plain.executescript(SCHEMA + "INSERT INTO parent VALUES (7, 'restored');")
    plain.close()
    db.close()
    os.replace(backup, config.source.path)
    assert worker.follow_source(threading.Event()) and worker.keeper.replaced
    worker.keeper.keep_whole()
    assert outbox.installed(worker.conn)
    assert set(outbox.tables_to_reconcile(worker.conn)) == {"parent", "child"}
    app(config.source.path).execute("INSERT INTO parent VALUES (8, 'after the restore')")
    worker.drain_once()
    assert sorted(worker.target.stored["parent"]) == [8]  # 7 comes with the reconcile


def test_on_source_replaced_halt_halts_every_table(tmp_path: Path):
    worker, _db, config = make_worker(tmp_path, DescribedTarget(), on_source_replaced="halt")
    worker.keeper.prepare()
    shutil.copy(config.source.path, tmp_path / "copy.sqlite3")
    os.replace(tmp_path / "copy.sqlite3", config.source.path)
    worker.follow_source(threading.Event())
    worker.keeper.keep_whole()
    assert {t: h.kind for t, h in worker.halted.items()} == {"parent": "replaced", "child": "replaced"}
    assert outbox.table_state(worker.conn, "parent")["halted"]


def test_a_full_disk_is_waited_out_reported_and_loses_nothing(tmp_path: Path):
    worker, db, _ = make_worker(tmp_path, DescribedTarget(), batch_size=5000)
    worker.keeper.prepare()
    db.executemany("INSERT INTO parent VALUES (?, 'a')", [(i,) for i in range(5000)])
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    used = worker.conn.execute("PRAGMA st.page_count").fetchone()[0]
    worker.conn.execute(f"PRAGMA st.max_page_count = {used}")  # the state file's journal rows need pages: FULL
    with pytest.raises(apsw.FullError) as full:
        worker.drain_once()
    stop = threading.Event()
    stop.set()  # no real waiting in a unit test
    worker.watch.wait_out_fault(full.value, stop)
    ready, reason = worker.metrics.health.ready()
    assert not ready and "disk" in reason and worker.metrics.source_ok._value.get() == 0
    assert db.execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (5000,)  # nothing acknowledged
    worker.conn.execute("PRAGMA st.max_page_count = 1073741823")
    worker.drain_once()
    worker.source_usable()
    assert worker.metrics.health.source_problem is None and worker.metrics.source_ok._value.get() == 1
    assert db.execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (0,)


def test_a_read_only_file_is_waited_out_and_reported(tmp_path: Path):
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"}, {"name": "child"})
    config = Config.model_validate({"source": {"path": str(path)}, "table": [{"name": "parent"}, {"name": "child"}]})
    readonly = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    worker = Worker(Source(path, readonly), config, DescribedTarget(), Observer(Metrics()))
    app(path).execute("INSERT INTO parent VALUES (1, 'a')")
    with pytest.raises(apsw.ReadOnlyError) as refused:
        worker.drain_once()
    stop = threading.Event()
    stop.set()
    worker.watch.wait_out_fault(refused.value, stop)
    assert "read-only" in worker.metrics.health.ready()[1]
    assert app(path).execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (1,)


def test_schema_mismatch_halts_without_dead_letters_and_resumes_by_itself(tmp_path: Path):
    def missing_column(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if table == "parent" and any("w" in item for item in items) and "w" not in target.columns["parent"]:
            return TargetError("schema", "400 PGRST204 Could not find the 'w' column", status=400, code="PGRST204")
        return None

    target = DescribedTarget(missing_column)
    worker, db, _ = make_worker(tmp_path, target, schema_recheck_interval=0.01)
    worker.keeper.prepare()
    db.execute("ALTER TABLE parent ADD COLUMN w")
    db.executemany("INSERT INTO parent VALUES (?, 'v', 'w')", [(i,) for i in range(20)])
    result = worker.drain_once()
    assert (result.dead, worker.halted["parent"].kind) == (0, "schema")
    # The claim saw the schema cookie move since the plan, planned again and found the column the secondary lacks:
    # halted before its first request (before schema cookies were checked, one request, refused, no bisection).
    assert [r for r in target.requests if r[0] == "upsert"] == []
    worker.keeper.schema_halts.recheck()
    assert "parent" in worker.halted  # the secondary still lacks it
    target.columns["parent"].append("w")
    worker.keeper.schema_halts.next_schema_check = 0.0
    worker.keeper.schema_halts.recheck()
    assert "parent" not in worker.halted
    worker.drain_once()
    assert sorted(target.stored["parent"]) == list(range(20))


class RequiringTarget(DescribedTarget):
    """A secondary whose `parent` has a NOT NULL column `tenant` syncd does not send; `default` gives it one."""

    def __init__(self) -> None:
        super().__init__(self.refuse, columns={"parent": ["id", "v", "tenant"], "child": ["id", "v"]})
        self.default: str | None = None

    def refuse(self, op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if op == "upsert" and table == "parent" and self.default is None and any("tenant" not in i for i in items):
            return TargetError("row", 'POST parent: 400 23502 null value in column "tenant" of relation "parent" '
                               "violates not-null constraint", status=400, code="23502")
        return None

    def describe(self) -> dict[str, object]:
        spec = super().describe()
        parent = spec["definitions"]["parent"]  # type: ignore[index]
        parent["required"] = ["id", "tenant"]
        if self.default is not None:
            parent["properties"]["tenant"]["default"] = self.default
        return spec


def test_a_not_null_column_only_the_secondary_has_halts_the_table_and_it_resumes_once_it_has_a_default(
        tmp_path: Path):
    """../shared/field-cases/39: 23502 on a column syncd does not send is the table's problem (every upsert is
    refused, updates of rows that hold a value included): halt it with the fix, dead-letter nothing, resume once
    the secondary gives the column a default. A 23502 on a column syncd sends stays that row's error."""
    target = RequiringTarget()
    worker, db, _ = make_worker(tmp_path, target, schema_recheck_interval=0.01)
    worker.keeper.prepare()
    db.executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(20)])
    db.execute("INSERT INTO child VALUES (1, 'c')")
    result = worker.drain_once()
    halt = worker.halted["parent"]
    assert (result.dead, halt.kind, halt.required) == (0, "schema", ("tenant",))
    assert "'tenant'" in halt.reason and "SET DEFAULT" in halt.reason and "23502" in halt.reason
    assert len([r for r in target.requests if r[:2] == ("upsert", "parent")]) == 1  # no bisection
    while worker.drain_once().claimed:
        pass
    assert sorted(target.stored["child"]) == [1]  # the other table ships
    worker.keeper.schema_halts.next_schema_check = 0.0
    worker.keeper.schema_halts.recheck()
    assert "parent" in worker.halted  # still NOT NULL without a default there
    target.default = "t1"
    worker.keeper.schema_halts.next_schema_check = 0.0
    worker.keeper.schema_halts.recheck()
    assert "parent" not in worker.halted
    while worker.drain_once().claimed:
        pass
    assert sorted(target.stored["parent"]) == list(range(20))
    assert outbox.dead_letters_by_table(worker.conn) == {}


def test_a_not_null_violation_on_a_column_syncd_sends_is_that_rows_error(tmp_path: Path):
    def null_v(op: str, table: str, items: Sequence[dict[str, object]]) -> TargetError | None:
        if table == "parent" and any(item.get("v") is None for item in items):
            return TargetError("row", 'POST parent: 400 23502 null value in column "v" of relation "parent" violates '
                               "not-null constraint", status=400, code="23502")
        return None

    worker, db, _ = make_worker(tmp_path, DescribedTarget(null_v))
    worker.keeper.prepare()
    db.executemany("INSERT INTO parent VALUES (?, ?)", [(1, "a"), (2, None), (3, "c")])
    result = worker.drain_once()
    assert (result.dead, "parent" in worker.halted) == (1, False)
    assert sorted(worker.target.stored["parent"]) == [1, 3]


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(tmp_path: Path):
    new_target = DescribedTarget()
    worker, _db, config = make_worker(tmp_path, DescribedTarget())
    reloaded = config.model_copy(update={"worker": config.worker.model_copy(update={"batch_size": 7})})
    worker.settings.reload = lambda: (reloaded, new_target)
    worker.halted["parent"] = Halt("config", "denied")
    worker.settings.requested.set()
    worker.reload_if_requested()
    assert worker.target is new_target and worker.shipping.batch_size == 7 and not worker.halted

    def broken() -> tuple[Config, DescribedTarget]:
        raise ConfigError("invalid configuration (1 problem):", ["worker.batch_size: 0 is not valid"])

    worker.settings.reload = broken
    worker.settings.requested.set()
    worker.reload_if_requested()
    assert worker.config is reloaded and worker.target is new_target


def test_differences_name_keys_never_values():
    old = Config.model_validate({"target": {"service_key": "old-secret"}, "table": [{"name": "t"}]})
    new = Config.model_validate({"target": {"service_key": "new-secret"}, "table": [{"name": "t", "exclude": ["a"]}]})
    changed = differences(old, new)
    assert changed == ["target.service_key", "table (t)"]
    assert "secret" not in " ".join(changed).replace("service_key", "")


class FailingWrites(apsw.VFS):
    """A VFS over the default one whose writes fail with SQLITE_IOERR while `failing` is set (a dying disk)."""

    def __init__(self) -> None:
        self.failing = False
        super().__init__("failing-writes", "")

    def xOpen(self, name: object, flags: list[int]) -> apsw.VFSFile:
        vfs = self

        class File(apsw.VFSFile):
            def xWrite(self, data: bytes, offset: int) -> None:
                if vfs.failing:
                    raise apsw.IOError("injected write failure")
                super().xWrite(data, offset)

        return File("", name, flags)


def test_an_io_error_on_syncds_writes_is_waited_out_and_loses_nothing(tmp_path: Path):
    import gc

    # Connections an earlier test left to the garbage collector close now, not in the middle of this test: run right
    # after test_continuity's two-branches test, one closing mid-test made this test's -shm look replaced (SQLite
    # knows files by inode, and a replaced file's inode is handed out again).
    gc.collect()
    path, _config = installed(tmp_path, SCHEMA, {"name": "parent"}, {"name": "child"})
    vfs = FailingWrites()
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE, vfs="failing-writes")
    try:
        target = DescribedTarget()
        worker = Worker(Source(path, conn), Config.model_validate(
            {"source": {"path": str(path)}, "table": [{"name": "parent"}, {"name": "child"}]}), target,
            Observer(Metrics()))
        app(path).execute("INSERT INTO parent VALUES (1, 'a')")
        worker.keeper.prepare()
        vfs.failing = True
        with pytest.raises(apsw.IOError) as failed:
            worker.drain_once()
        stop = threading.Event()
        stop.set()
        worker.watch.wait_out_fault(failed.value, stop)
        assert "I/O error" in worker.metrics.health.ready()[1]
        assert worker.metrics.source_errors.labels(kind="io")._value.get() == 1
        vfs.failing = False
        worker.drain_once()
        assert app(path).execute("SELECT count(*) FROM _syncd_outbox").fetchone() == (0,)
        assert sorted(target.stored["parent"]) == [1]
    finally:
        conn.close()
        vfs.unregister()


def test_a_resumed_table_shows_no_stale_error_and_a_repair_says_what_is_true_now(tmp_path: Path):
    """Issue 19, point 6: once a halted table resumes, `status` no longer shows the halt's reason as its last error;
    the capture-repaired line says what was wrong, not the fix the daemon just applied."""
    from syncd.status import collect

    target = DescribedTarget(columns={"parent": ["id", "v"], "child": ["id", "v"]})
    worker, db, config = make_worker(tmp_path, target, schema_recheck_interval=0.01)
    worker.keeper.prepare()
    db.execute("ALTER TABLE parent ADD COLUMN w")
    worker.keeper.prepared = False
    worker.keeper.prepare()
    worker.keeper.record_halts()
    assert outbox.table_state(worker.conn, "parent").get("halted")
    target.columns["parent"].append("w")
    worker.keeper.schema_halts.next_schema_check = 0.0
    worker.keeper.schema_halts.recheck()
    worker.keeper.record_halts()
    shown = next(t for t in collect(worker.conn, config).tables if t.name == "parent")
    assert not shown.halted and shown.last_error is None, shown

    repaired: list[str] = []
    worker.observer.capture_repaired = lambda table, what: repaired.append(what)  # type: ignore[method-assign]
    db.executescript("DROP TRIGGER _syncd_child_ins;")
    worker.keeper.prepared = False
    worker.keeper.prepare()
    assert repaired and "NOT being captured" not in repaired[0] and "run: syncd install" not in repaired[0], repaired
    assert "_syncd_child_ins" in repaired[0]
