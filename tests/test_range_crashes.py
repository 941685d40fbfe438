"""kill -9 inside the seq-range paths (issue 21): a batch's shipped seqs are acknowledged as one range in the state
file, and a flush deletes its chunk from the app's outbox as one range. A real process is killed at the statement
that matters (SIGKILL from SQLite's own trace callback, or from a VFS shim at the first write to the second file
of a commit), then a fresh daemon starts on what is left: nothing is lost, nothing is acknowledged that was not
shipped, and the file is never taken for a restored copy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import cast

import apsw

from syncd import outbox, state
from syncd.config import Config
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.source import Source
from syncd.worker import Worker
from tests.test_source import DescribedTarget
from tests.test_state import app, lab, outbox_seqs

ROWS = 40

# The child: a worker of its own on the lab's file ships every row to a fake secondary, then is killed where the
# parent says: `arm` names the start of the statement after whose end the process dies; "second wal" kills at
# the first write to the WAL of the second file a COMMIT touches: in WAL mode a transaction over attached databases
# is atomic only within each file (https://sqlite.org/lang_attach.html), and SQLite commits them in schema order,
# the app's file (main) before the state file (st).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import apsw

    path, where = Path(sys.argv[1]), sys.argv[2]
    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
    armed = {"commit": False, "wals": []}
    base = apsw.vfs_names()[0]  # the platform's VFS, before the shim becomes the default

    class Shim(apsw.VFS):
        def __init__(self):
            super().__init__("crash-shim", base, makedefault=True)

        def xOpen(self, name, flags):
            return ShimFile(base, name, flags)

    class ShimFile(apsw.VFSFile):
        def __init__(self, vfs, name, flags):
            self.name = name.filename() if hasattr(name, "filename") else str(name)
            super().__init__(vfs, name, flags)

        def xWrite(self, data, offset):
            if armed["commit"] and self.name.endswith("-wal"):
                if self.name not in armed["wals"]:
                    armed["wals"].append(self.name)
                if len(armed["wals"]) == 2:
                    kill()
            return super().xWrite(data, offset)

    shim = Shim()

    from syncd.config import Config
    from syncd.metrics import Metrics
    from syncd.observer import Observer
    from syncd.source import Source
    from syncd.worker import Worker
    from tests.test_source import DescribedTarget

    config = Config.model_validate({"source": {"path": str(path)}, "table": [{"name": "parent"}, {"name": "child"}]})
    worker = Worker(Source(path), config, DescribedTarget(), Observer(Metrics()))
    worker.keeper.prepare()
    worker.source.configure()
    assert worker.source.discontinuity(thorough=True) is None  # as at start: the file's position is recorded

    def arm(statement_start):
        def after(event):
            if str(event["sql"]).startswith(statement_start):
                kill()
        worker.conn.trace_v2(apsw.SQLITE_TRACE_PROFILE, after)

    def arm_commit(event):
        if str(event["sql"]) == "COMMIT":
            armed["commit"] = True

    batch = worker.deliver(worker.claim())
    if where == "acknowledgement":
        arm("INSERT OR REPLACE INTO st.acked (seq, at, fate) SELECT")
    worker.finish(batch)
    if where == "flush":
        arm("DELETE FROM main._syncd_outbox AS o WHERE o.seq BETWEEN")
    elif where == "second wal":
        worker.conn.trace_v2(apsw.SQLITE_TRACE_STMT, arm_commit)
    worker.flush_when_due(final=True)
    print("not killed", flush=True)
""")


def killed_at(path: Path, where: str) -> None:
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-c", CHILD, str(path), where], cwd=root, capture_output=True, text=True,
                           timeout=60, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert child.returncode == -9, (child.returncode, child.stdout, child.stderr)


def restarted(path: Path, config: Config, target: DescribedTarget) -> Worker:
    worker = Worker(Source(path), config, target, Observer(Metrics()))
    worker.source.configure()
    return worker


def shipped_keys(target: DescribedTarget) -> list[int]:
    return sorted(cast(int, row["id"]) for rows in target.stored.values() for row in rows.values())


def lab_with_rows(tmp_path: Path) -> tuple[Path, Config]:
    path, config = lab(tmp_path)
    state.connect(path).close()  # the state file exists before the child: it is attached at once
    app(path).executemany("INSERT INTO parent VALUES (?, 'v')", [(i,) for i in range(ROWS)])
    return path, config


def test_a_range_acknowledgement_killed_before_its_commit_acknowledges_nothing_and_ships_again(tmp_path: Path) -> None:
    path, config = lab_with_rows(tmp_path)
    killed_at(path, "acknowledgement")
    conn = state.connect(path)
    assert conn.execute("SELECT count(*) FROM st.acked").fetchone() == (0,)
    assert conn.execute(f"SELECT count(*) FROM ({outbox.JOURNAL_ROWS})").fetchone() == (0,)  # no key without its ack
    target = DescribedTarget()
    worker = restarted(path, config, target)
    assert worker.source.discontinuity(thorough=True) is None
    while worker.drain_once().claimed:
        pass
    worker.flush_when_due(final=True)
    assert shipped_keys(target) == list(range(ROWS)) and outbox_seqs(path) == []


def test_a_range_flush_killed_before_its_commit_deletes_nothing_and_the_next_start_does_it_all(tmp_path: Path) -> None:
    path, config = lab_with_rows(tmp_path)
    killed_at(path, "flush")
    assert len(outbox_seqs(path)) == ROWS  # the app's file rolled back with the WAL's uncommitted frames
    target = DescribedTarget()
    worker = restarted(path, config, target)
    assert worker.source.discontinuity(thorough=True) is None
    assert worker.drain_once().claimed == 0  # acknowledged before the kill: nothing ships again
    worker.flush_when_due(final=True)
    assert outbox_seqs(path) == [] and outbox.unflushed(worker.conn) == 0 and target.requests == []


def test_a_flush_killed_between_its_two_commits_leaves_the_state_file_behind_and_is_completed(tmp_path: Path) -> None:
    """The app's file committed the range's deletion, the state file did not: the state file still lists the
    entries as acknowledged, and records the position before that flush. The next start completes the flush (it
    forgets those entries), ships nothing again and takes nothing for a restore; what the app writes next ships."""
    path, config = lab_with_rows(tmp_path)
    killed_at(path, "second wal")
    assert outbox_seqs(path) == []  # the app's half committed
    conn = state.connect(path)
    assert conn.execute("SELECT count(*) FROM st.acked").fetchone() == (ROWS,)  # the state half did not
    recorded, position = outbox.recorded_source(conn), outbox.file_position(conn)
    assert recorded is not None and position is not None and position.flushes == recorded.position.flushes + 1
    conn.close()
    target = DescribedTarget()
    worker = restarted(path, config, target)
    assert worker.source.discontinuity(thorough=True) is None
    assert outbox.unflushed(worker.conn) == 0
    app(path).execute("INSERT INTO parent VALUES (1000, 'after the crash')")
    while worker.drain_once().claimed:
        pass
    assert shipped_keys(target) == [1000]


def test_the_crash_shim_passes_every_write_through(tmp_path: Path) -> None:
    """The shim itself changes nothing: a file written through it reads back the same through plain SQLite."""
    path = tmp_path / "plain.sqlite3"
    child = subprocess.run([sys.executable, "-c", CHILD.split("shim = Shim()")[0] + textwrap.dedent(f"""
        shim = Shim()
        db = apsw.Connection({str(path)!r})
        db.execute("PRAGMA journal_mode=WAL").fetchall()
        db.execute("CREATE TABLE t (x); INSERT INTO t VALUES (1), (2)")
        db.close()
    """), str(path), "none"], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert apsw.Connection(str(path)).execute("SELECT sum(x) FROM t").fetchone() == (3,)
