"""Is the app's file the one syncd last shipped from? (issue 18, point 2; DESIGN.md, "Living with a source that
changes"). The position (a generation and a count of flushes, kept in the app's `_syncd_meta` and in the state file,
advanced by every flush in both at once), the inode, and the entries syncd acknowledged tell a restored copy from
the file, whatever way it was put back; a clean restart, and a crash between a flush's two commits, are no
discontinuity. In process, with a fake secondary; the real process is in tests/test_soak_faults.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import apsw

from syncd import outbox, state
from syncd.config import Config
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.source import Source
from syncd.worker import Worker
from tests.test_source import DescribedTarget, make_worker


def write(config: Config, sql: str) -> None:
    """The app's write, through the same SQLite as the worker's (apsw): a second copy of SQLite in this process
    (stdlib sqlite3) would drop the worker's POSIX locks when it closes (https://sqlite.org/howtocorrupt.html,
    2.2.1), and then delete the WAL the worker still reads."""
    conn = apsw.Connection(str(config.source.path))
    conn.execute(sql)
    conn.close()


def ship(worker: Worker) -> None:
    """Ship what is pending and flush it into the app's file."""
    while worker.drain_once().claimed:
        pass


def copy_of(config: Config, to: Path) -> Path:
    """A consistent copy of the app's file (SQLite's backup API)."""
    source, copy = apsw.Connection(str(config.source.path)), apsw.Connection(str(to))
    with copy.backup("main", source, "main") as step:
        step.step()
    copy.close()
    source.close()
    return to


def copy_bytes_over(copy: Path, config: Config) -> None:
    """Put a copy back in place, the same inode (cp over the file, everything stopped: -wal and -shm removed)."""
    for suffix in ("-wal", "-shm"):
        Path(f"{config.source.path}{suffix}").unlink(missing_ok=True)
    with open(config.source.path, "r+b") as out:
        out.write(copy.read_bytes())
        out.truncate()


def restart(worker: Worker, config: Config) -> Worker:
    """The daemon stopped (its connection closed) and started again on whatever is at the path now."""
    worker.conn.close()
    fresh = Worker(Source(config.source.path), config, worker.target, Observer(Metrics()))
    fresh.source.configure()
    return fresh


def shipped_once(tmp_path: Path) -> tuple[Worker, Config]:
    """A worker on an installed file that has shipped and flushed one row (the app's own connection closed)."""
    worker, db, config = make_worker(tmp_path, DescribedTarget())
    db.close()
    worker.keeper.prepare()
    write(config, "INSERT INTO parent VALUES (1, 'a')")
    ship(worker)
    return worker, config


def position(worker: Worker) -> outbox.Position | None:
    return outbox.file_position(worker.conn)


def test_every_flush_advances_the_position_in_both_files(tmp_path: Path):
    worker, db, config = make_worker(tmp_path, DescribedTarget())
    db.close()
    worker.keeper.prepare()
    start = position(worker)
    assert start is not None and start.flushes == 0
    write(config, "INSERT INTO parent VALUES (1, 'a')")
    ship(worker)
    now = position(worker)
    recorded = outbox.recorded_source(worker.conn)
    assert now is not None and now.generation == start.generation and now.flushes >= 1
    assert recorded is not None and recorded.position == now
    assert worker.source.discontinuity(thorough=True) is None


def test_a_clean_restart_is_no_discontinuity(tmp_path: Path):
    worker, config = shipped_once(tmp_path)
    again = restart(worker, config)
    assert again.source.discontinuity(thorough=True) is None


def test_a_copy_put_back_over_the_same_inode_is_a_discontinuity(tmp_path: Path):
    worker, config = shipped_once(tmp_path)
    copy = copy_of(config, tmp_path / "copy.sqlite3")
    write(config, "INSERT INTO parent VALUES (2, 'after the copy')")
    ship(worker)
    worker.conn.close()
    copy_bytes_over(copy, config)
    again = restart(worker, config)
    reason = again.source.discontinuity(thorough=True)
    assert reason is not None and "position" in reason, reason


def test_a_copy_taken_after_the_last_flush_is_told_by_the_entries_it_lacks(tmp_path: Path):
    """The copy carries the last flush's position, but entries syncd shipped after it (acknowledged, not flushed
    yet) are not in it: the thorough check at start finds them missing."""
    worker, config = shipped_once(tmp_path)
    copy = copy_of(config, tmp_path / "copy.sqlite3")
    write(config, "INSERT INTO parent VALUES (2, 'after the copy')")
    worker.finish(worker.deliver(worker.claim()))  # shipped and acknowledged; the process dies before the flush
    worker.conn.close()
    copy_bytes_over(copy, config)
    again = restart(worker, config)
    assert again.source.discontinuity() is None  # cheap checks cannot tell
    reason = again.source.discontinuity(thorough=True)
    assert reason is not None and "shipped" in reason, reason


def test_a_flush_whose_state_half_was_lost_is_completed_not_reconciled(tmp_path: Path):
    """SQLite commits an attached WAL database's transaction file by file: a crash can leave the app's file one flush
    ahead of the state file. That is completed (the acked entries it deleted forgotten), not taken for a restore."""
    worker, config = shipped_once(tmp_path)
    recorded = outbox.recorded_source(worker.conn)
    assert recorded is not None
    write(config, "INSERT INTO parent VALUES (2, 'b')")
    ship(worker)
    outbox.record_source(worker.conn, recorded.position, recorded.inode)  # its state half never happened
    assert worker.source.discontinuity(thorough=True) is None
    assert outbox.recorded_source(worker.conn).position == position(worker)  # type: ignore[union-attr]


def test_a_lost_state_file_is_a_discontinuity_once_the_file_has_shipped(tmp_path: Path):
    worker, config = shipped_once(tmp_path)
    worker.conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{state.path_for(config.source.path)}{suffix}").unlink(missing_ok=True)
    again = restart(worker, config)
    reason = again.source.discontinuity(thorough=True)
    assert reason is not None and "state file" in reason, reason


def test_two_branches_restored_from_one_backup_never_share_a_position(tmp_path: Path):
    """A backup B, the file goes on; B restored, the file goes on (one flush); a backup X of that branch; B restored
    again, the file goes on (one flush): both branches are at B's flushes + 1. Restoring X must still be seen:
    adopting a restored file starts a new generation."""
    worker, config = shipped_once(tmp_path)
    backup = copy_of(config, tmp_path / "b.sqlite3")
    write(config, "INSERT INTO parent VALUES (2, 'after the backup')")
    ship(worker)

    def restore_and_go_on(copy: Path, row: int) -> Worker:
        nonlocal worker
        worker.conn.close()
        copy_bytes_over(copy, config)
        worker = restart(worker, config)
        worker.keeper.look_for_discontinuity(thorough=True)
        assert worker.keeper.replaced, "the restore was not seen"
        worker.keeper.keep_whole()  # adopts it
        assert worker.keeper.replaced is None
        write(config, f"INSERT INTO parent VALUES ({row}, 'branch')")
        worker.drain_once()
        return worker

    restore_and_go_on(shutil.copyfile(backup, tmp_path / "b1.sqlite3"), 10)
    branch = copy_of(config, tmp_path / "x.sqlite3")
    restore_and_go_on(shutil.copyfile(backup, tmp_path / "b2.sqlite3"), 20)
    worker.conn.close()
    copy_bytes_over(branch, config)
    worker = restart(worker, config)
    reason = worker.source.discontinuity(thorough=True)
    assert reason is not None, "a copy of another branch was taken for the file syncd last shipped from"
