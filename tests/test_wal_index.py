"""A WAL index (`-shm`) deleted under the daemon (issue 18; field case 22 deletes `-wal` and `-shm` right after
putting a backup in place, while syncd has the file open). syncd's connection then reads a WAL nobody writes; it
must read the file anew without ever writing that dead WAL into the live file, and without a second connection of
its own keeping the dead index alive. SQLite shares one WAL index among a process's connections to an inode
(unixShmNode, os_unix.c), and its last connection to close checkpoints and deletes `-wal` and `-shm` by name
(sqlite3WalClose, wal.c). In process, with a fake secondary; the app is another process, as in production."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import apsw
import pytest

from syncd import sqlite
from syncd.source import Event, Source, StaleWalIndex, side_connection
from tests.test_capture import installed
from tests.test_continuity import shipped_once
from tests.test_source import SCHEMA

APP_COMMITS = """
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA wal_autocheckpoint = 0")
for i in sys.argv[2:]:
    conn.execute("INSERT INTO parent VALUES (?, 'the app')", (int(i),))
os._exit(0)  # dies without closing: its commits stay in the WAL, not checkpointed (as after a kill)
"""


def app_commits(path: Path, *ids: int) -> None:
    """The app, in a process of its own, commits `ids` to `parent` and dies with them in its WAL."""
    subprocess.run([sys.executable, "-c", APP_COMMITS, str(path), *map(str, ids)], check=True)


def read_by_another_process(path: Path) -> tuple[list[int], str]:
    """What a fresh connection of another process reads: the ids of `parent`, and `PRAGMA quick_check`."""
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "print(*[r[0] for r in c.execute('SELECT id FROM parent ORDER BY id')]); "
              "print(c.execute('PRAGMA quick_check').fetchone()[0])")
    out = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True)
    ids, check = out.stdout.splitlines()
    return [int(i) for i in ids.split()], check


def delete_wal_and_shm(path: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink()


def opened(tmp_path: Path) -> Source:
    """A Source configured on an installed WAL file whose connection has written to it (frames in its WAL)."""
    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    source = Source(path)
    source.configure()
    source.conn.execute("PRAGMA main.wal_autocheckpoint = 0")
    source.conn.execute("INSERT INTO parent VALUES (1, 'before')")
    return source


def test_reopening_after_a_lost_wal_index_never_writes_the_dead_wal_into_the_file(tmp_path: Path):
    """Closing the old connection is the dangerous step: as the last connection to the file, SQLite would
    checkpoint its dead WAL over the app's newer pages and delete the app's -wal, commits and all."""
    source = opened(tmp_path)
    delete_wal_and_shm(source.path)
    app_commits(source.path, 2, 3)
    assert source.check() is Event.STALE
    source.reopen()
    assert [r[0] for r in source.conn.execute("SELECT id FROM parent ORDER BY id")] == [2, 3]
    assert read_by_another_process(source.path) == ([2, 3], "ok")
    assert source.check() is Event.NONE


def test_a_connection_opened_beside_a_stale_one_is_stale_until_every_one_has_closed(tmp_path: Path):
    """The reconciler's connection, open while the worker reopens, keeps the deleted WAL index alive: the worker's
    new connection would read through it (and find nothing the app committed since, or a 'malformed' error)."""
    source = opened(tmp_path)
    beside = apsw.Connection(str(source.path))
    assert beside.execute("SELECT count(*) FROM parent").fetchone()[0] == 1
    delete_wal_and_shm(source.path)
    app_commits(source.path, 2, 3)
    assert source.check() is Event.STALE
    with pytest.raises(StaleWalIndex, match="WAL index"), side_connection(source.path) as conn:
        conn.execute("SELECT count(*) FROM parent")  # not reached: refused before anything is read through it
    source.reopen()
    assert source.wal_index_lost() and source.check() is Event.STALE  # still the dead index, told as such
    sqlite.close(beside, checkpoint=False)
    source.reopen()
    assert not source.wal_index_lost() and source.check() is Event.NONE
    assert [r[0] for r in source.conn.execute("SELECT id FROM parent ORDER BY id")] == [2, 3]
    with side_connection(source.path) as conn:
        assert conn.execute("SELECT count(*) FROM parent").fetchone()[0] == 2
    assert read_by_another_process(source.path) == ([2, 3], "ok")


def test_the_worker_waits_while_a_connection_of_its_own_keeps_the_dead_index_then_adopts_the_file(tmp_path: Path):
    worker, config = shipped_once(tmp_path)
    beside = apsw.Connection(str(config.source.path))
    beside.execute("SELECT count(*) FROM parent").fetchall()
    delete_wal_and_shm(config.source.path)
    app_commits(config.source.path, 5)
    stop = threading.Event()
    assert not worker.follow_source(stop)  # waits (one GONE_POLL) rather than adopt what it cannot read
    assert "still maps the deleted WAL index" in (worker.observer.metrics.health.source_problem or "")
    sqlite.close(beside, checkpoint=False)
    assert worker.follow_source(stop) and worker.keeper.replaced
    worker.keeper.keep_whole()
    assert not worker.keeper.replaced
    seen = [r[0] for r in worker.conn.execute("SELECT id FROM parent ORDER BY id")]
    assert 5 in seen and read_by_another_process(config.source.path) == (seen, "ok")



# -- a restore (delete -wal and -shm, rename a backup into place) while syncd has the file open ---------------


def backup_through(conn: apsw.Connection, to: Path) -> None:
    """A backup-API copy of the file `conn` has open, through that connection (another SQLite library of this
    process opening the file would drop this one's locks on closing it)."""
    with apsw.Connection(str(to)) as copy, copy.backup("main", conn, "main") as step:
        step.step()


def tables_seen_by_another_process(path: Path) -> tuple[list[str], str]:
    script = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
              "print(*[r[0] for r in c.execute(\"SELECT name FROM sqlite_schema WHERE type = 'table' "
              "AND name NOT LIKE '\\\\_syncd%' ESCAPE '\\\\' ORDER BY name\")]); "
              "print(c.execute('PRAGMA quick_check').fetchone()[0])")
    out = subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True, text=True)
    names, check = out.stdout.splitlines()
    return names.split(), check


def test_a_commit_through_a_connection_opened_between_the_delete_and_the_rename_is_refused(tmp_path: Path):
    """The CI failure of stop 26 ("no such table: parent" in the restored file): the old file's connection made
    a new -wal at the path, the backup was renamed over it, and that connection's commit went into the -wal the
    restored file pairs with. The commit hook refuses it; the restored file reads as the backup."""
    source = opened(tmp_path)
    copy = tmp_path / "backup.sqlite3"
    backup_through(source.conn, copy)
    source.conn.execute("CREATE TABLE added_after_the_backup (x)")
    delete_wal_and_shm(source.path)
    sqlite.close(source.conn, checkpoint=False)
    reopened = sqlite.connect(source.path)  # as a reopen in that instant would: a new -wal and -shm, for the old file
    reopened.execute("SELECT count(*) FROM parent").fetchall()
    assert Path(f"{source.path}-wal").exists()
    copy.replace(source.path)
    with pytest.raises(sqlite.FileMoved, match="replaced"):
        reopened.execute("CREATE TABLE written_to_the_old_file (x); INSERT INTO parent VALUES (9, 'lost')")
    assert tables_seen_by_another_process(source.path) == (["child", "parent"], "ok")
    assert read_by_another_process(source.path) == ([1], "ok")
    app_commits(source.path, 2)
    assert read_by_another_process(source.path) == ([1, 2], "ok")
    sqlite.close(reopened, checkpoint=False)


def test_no_checkpoint_through_the_old_files_connection(tmp_path: Path):
    """A PASSIVE checkpoint through the old file's connection would mark the frames of the shared -wal as copied
    into the old inode: the restored file's readers would then skip them."""
    source = opened(tmp_path)
    copy = tmp_path / "backup.sqlite3"
    backup_through(source.conn, copy)
    copy.replace(source.path)
    assert source.check() is Event.REPLACED
    with pytest.raises(sqlite.FileMoved):
        source.checkpoint()
    source.reopen()
    source.checkpoint()
    assert source.check() is Event.NONE


def test_the_worker_waits_for_the_rename_after_the_wal_and_shm_are_deleted(tmp_path: Path):
    """A restore deletes -wal and -shm first: the worker does not read the old file anew at once (that would make
    the -wal the backup renamed in a moment later pairs with); it waits, then adopts the restored file."""
    worker, config = shipped_once(tmp_path)
    copy = tmp_path / "backup.sqlite3"
    backup_through(worker.conn, copy)
    old = worker.conn
    delete_wal_and_shm(config.source.path)
    stop = threading.Event()
    assert not worker.follow_source(stop)  # settling: no connection made, nothing at the path
    assert worker.conn is old and not Path(f"{config.source.path}-wal").exists()
    assert "reading the file anew in 2 s" in (worker.observer.metrics.health.source_problem or "")
    copy.replace(config.source.path)
    assert worker.follow_source(stop) and worker.keeper.replaced and worker.conn is not old
    worker.keeper.keep_whole()
    assert not worker.keeper.replaced
    assert read_by_another_process(config.source.path) == ([1], "ok")


def test_a_rename_after_the_settle_finds_the_worker_writing_nothing_into_the_restored_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A slower restore: the worker has read the old file anew (its own -wal and -shm at the path) when the backup
    is renamed in. Its next write (adopting the file it had opened) is refused, and the one after goes to the
    restored file."""
    monkeypatch.setattr("syncd.source.STALE_SETTLE", 0.0)
    worker, config = shipped_once(tmp_path)
    copy = tmp_path / "backup.sqlite3"
    backup_through(worker.conn, copy)
    worker.conn.execute("CREATE TABLE added_after_the_backup (x)")
    delete_wal_and_shm(config.source.path)
    stop = threading.Event()
    assert worker.follow_source(stop) and worker.keeper.replaced  # read anew: still the old file
    copy.replace(config.source.path)
    with pytest.raises(sqlite.FileMoved):
        worker.keeper.keep_whole()  # adopting the old file: its commit refused
    assert tables_seen_by_another_process(config.source.path) == (["child", "parent"], "ok")
    assert worker.follow_source(stop) and worker.keeper.replaced
    worker.keeper.keep_whole()
    assert not worker.keeper.replaced
    assert read_by_another_process(config.source.path) == ([1], "ok")
    assert tables_seen_by_another_process(config.source.path) == (["child", "parent"], "ok")


def test_a_backup_renamed_over_the_file_beside_the_old_files_wal_is_not_read_until_that_wal_is_gone(tmp_path: Path):
    """`mv backup app.sqlite3` with the old -wal left at the path (the README says to delete it first): the new
    file would read the old file's frames as its own pages. syncd says so, with the fix, and reads nothing
    through it; once -wal and -shm are deleted it adopts the restored file."""
    worker, config = shipped_once(tmp_path)
    copy = tmp_path / "backup.sqlite3"
    backup_through(worker.conn, copy)
    assert Path(f"{config.source.path}-wal").stat().st_size > 32
    copy.replace(config.source.path)
    stop = threading.Event()
    assert not worker.follow_source(stop)
    problem = worker.observer.metrics.health.source_problem or ""
    assert "-wal beside it is still the old file's" in problem and f"delete {config.source.path}-wal" in problem
    assert not worker.follow_source(stop)  # still: nothing read through it
    delete_wal_and_shm(config.source.path)
    assert worker.follow_source(stop) and worker.keeper.replaced
    worker.keeper.keep_whole()
    assert not worker.keeper.replaced
    assert read_by_another_process(config.source.path) == ([1], "ok")
