"""Multi-file mode end to end (`[source] glob`): one daemon, a directory of tenant files written at once, into one
set of secondary tables keyed by tenant. The real `syncd run` process, the apps writing through stdlib sqlite3, real
PostgreSQL behind the dev server; each tenant's rows in the secondary must end equal to its file's."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import DevServer
from tests.e2e import free_port

TENANT_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE parent (id INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE note (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES parent (id), body TEXT, n INTEGER);
"""


@dataclass
class Tenants:
    """A directory of tenant files (`tenants/<run>-<i>.sqlite3`) and a glob configuration shipping them."""

    root: Path
    run: str  # this test's prefix of every tenant id: tests share the secondary's tables
    config: Path
    metrics: str

    @property
    def directory(self) -> Path:
        return self.root / "tenants"

    def path(self, i: int) -> Path:
        return self.directory / f"{self.run}-{i}.sqlite3"

    def create(self, i: int, *, journal: str = "WAL") -> Path:
        path = self.path(i)
        db = sqlite3.connect(path)
        db.executescript(TENANT_SCHEMA.replace("journal_mode = WAL", f"journal_mode = {journal}"))
        db.close()
        return path

    def connect(self, i: int) -> sqlite3.Connection:
        return sqlite3.connect(self.path(i), isolation_level=None, timeout=30)

    def syncd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout)

    def start(self, *args: str, config: Path | None = None,
              launcher: tuple[str, ...] = ("-m", "syncd")) -> subprocess.Popen[str]:
        """`syncd run` (`launcher`: how Python starts it), logging to a file of its own: a pipe nobody reads while it
        runs would fill and block its log."""
        log = self.root / f"daemon-{len(DAEMONS)}.log"
        with log.open("w") as stderr:
            process = subprocess.Popen([sys.executable, *launcher, "run", "--config", str(config or self.config),
                                        *args], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        DAEMONS[process.pid] = (process, log)
        return process


DAEMONS: dict[int, tuple[subprocess.Popen[str], Path]] = {}  # pid -> a daemon started by Tenants.start, its log


def write_config(path: Path, server: DevServer, metrics: str, extra: str = "") -> None:
    path.write_text(f"""
[source]
glob = "tenants/*.sqlite3"
{extra}

[target]
url = "{server.url}"
jwt_secret = "{server.jwt_secret}"

[worker]
metrics_addr = "{metrics}"
poll_interval = 0.2
max_backoff = 1.0
lease_seconds = 3

[[table]]
name = "parent"
target = "fleet_parents"

[[table]]
name = "note"
target = "fleet_notes"
""")


@pytest.fixture
def tenants(tmp_path: Path, devserver: DevServer) -> Iterator[Tenants]:
    (tmp_path / "tenants").mkdir()
    metrics = f"127.0.0.1:{free_port()}"
    config = tmp_path / "syncd.toml"
    write_config(config, devserver, metrics)
    yield Tenants(tmp_path, uuid.uuid4().hex[:8], config, metrics)
    for pid, (process, log) in list(DAEMONS.items()):  # a failed test leaves its daemons running: they would serve
        if log.is_relative_to(tmp_path):  # on, and take the leases of a later run's files at the same paths
            del DAEMONS[pid]
            if process.poll() is None:
                process.kill()
                process.wait()


def write_workload(db: sqlite3.Connection, rng: random.Random, count: int, base: int = 0) -> None:
    """Inserts, updates, deletes and key changes of one tenant's notes, with parents first."""
    db.execute("INSERT OR IGNORE INTO parent VALUES (1, 'p1'), (2, 'p2')")
    for i in range(base + 1, base + count + 1):
        db.execute("BEGIN")
        db.execute("INSERT INTO note VALUES (?, ?, ?, ?)", (i, rng.choice((1, 2, None)), f"b{i}", rng.randint(0, 9)))
        choice = rng.random()
        if choice < 0.2:
            db.execute("UPDATE note SET n = n + 1, body = 'u' WHERE id = ?", (rng.randint(base + 1, i),))
        elif choice < 0.3:
            db.execute("DELETE FROM note WHERE id = ?", (rng.randint(base + 1, i),))
        elif choice < 0.35:
            db.execute("UPDATE OR IGNORE note SET id = ? WHERE id = ?", (-i, i))
        db.execute("COMMIT")


def source_rows(path: Path) -> set[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return set(db.execute("SELECT id, parent_id, body, n FROM note"))


def target_rows(pg: psycopg.Connection, tenant: str) -> set[tuple[object, ...]]:
    return set(pg.execute("SELECT id, parent_id, body, n FROM fleet_notes WHERE tenant_id = %s", (tenant,)))


def wait_equal(tenants: Tenants, pg: psycopg.Connection, files: list[int], timeout: float = 60) -> None:
    """Every tenant's notes in the secondary equal its file's."""
    deadline = time.monotonic() + timeout
    left = list(files)
    while left and time.monotonic() < deadline:
        left = [i for i in left if source_rows(tenants.path(i)) != target_rows(pg, f"{tenants.run}-{i}")]
        if left:
            time.sleep(0.2)
    if left:
        files_status = json.loads(tenants.syncd("status", "--json").stdout)["files"]
        behind = [file for file in files_status if file["file"] in {tenants.path(i).name for i in left[:3]}]
        raise AssertionError(f"tenants not converged after {timeout} s: {left[:10]}; their status: {behind}")


def readyz(tenants: Tenants) -> dict[str, object]:
    try:
        answer: dict[str, object] = httpx.get(f"http://{tenants.metrics}/readyz", timeout=5).json()
        return answer
    except httpx.HTTPError:
        return {}


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM, then the daemon's log once it exited 0."""
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    err = DAEMONS[process.pid][1].read_text()
    assert process.returncode == 0, err[-3000:]
    return err


def test_one_daemon_ships_a_directory_written_at_once(tenants: Tenants, pg: psycopg.Connection):
    """200 tenant files, written concurrently (inserts, updates, deletes, key changes) while one daemon serves
    them; files added and removed while it runs; each tenant's rows in the secondary equal its file's, the same
    primary keys in every tenant never colliding."""
    count = 200
    for i in range(count):
        tenants.create(i)
    installed = tenants.syncd("install")
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.count("== ") == count
    daemon = tenants.start()

    def writer(files: range, seed: int) -> None:
        rng = random.Random(seed)
        for round_ in range(3):
            for i in files:
                with tenants.connect(i) as db:
                    write_workload(db, rng, 4, base=round_ * 10)

    writers = [threading.Thread(target=writer, args=(range(k, count, 4), k)) for k in range(4)]
    for thread in writers:
        thread.start()
    added = tenants.create(count)  # a new file while the daemon runs: installed by hand, then served
    assert tenants.syncd("install", "--file", added.name).returncode == 0
    with tenants.connect(count) as db:
        write_workload(db, random.Random(7), 20)
    for thread in writers:
        thread.join()
    wait_equal(tenants, pg, [*range(count), count], timeout=90)
    verified = tenants.syncd("verify", "--json")
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    assert len(json.loads(verified.stdout)["files"]) == count + 1
    checked = tenants.syncd("check", "--tenant", f"{tenants.run}-5")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.startswith(f"== {tenants.run}-5.sqlite3 (tenant {tenants.run}-5)")
    removed = tenants.path(3)
    removed.rename(tenants.root / removed.name)  # no longer matches: no longer served, its rows stay
    time.sleep(2)
    status = json.loads(tenants.syncd("status", "--json").stdout)
    assert status["totals"]["files"] == count  # 201 files, one moved away
    assert all(file["pending"] == 0 for file in status["files"])
    err = stop(daemon)
    assert "file no longer matches source.glob" in err


def troubled_files(tenants: Tenants) -> dict[str, str]:
    files = readyz(tenants).get("files")
    return files if isinstance(files, dict) else {}


def wait_for(what: str, condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_locked_file_a_halted_table_and_an_uninstalled_file_never_stop_the_rest(tenants: Tenants,
                                                                                   pg: psycopg.Connection):
    """One tenant's file locked (rollback journal: readers wait too), another's table halted (a column the secondary
    lacks), a third not installed: each shows in /readyz, the metrics and status with its file, while the others
    ship; unlocked and fixed, they ship too."""
    count = 12
    locked, halted = 0, 1
    for i in range(count):
        tenants.create(i, journal="DELETE" if i == locked else "WAL")
    assert tenants.syncd("install").returncode == 0
    uninstalled = tenants.create(count)
    daemon = tenants.start()
    lock_held, release = threading.Event(), threading.Event()

    def hold_lock() -> None:
        db = tenants.connect(locked)
        db.execute("BEGIN EXCLUSIVE")
        write_workload(db, random.Random(1), 0)
        db.execute("INSERT INTO note VALUES (1, 1, 'while locked', 1)")
        lock_held.set()
        release.wait(60)
        db.execute("COMMIT")

    holder = threading.Thread(target=hold_lock)
    holder.start()
    lock_held.wait(10)
    with tenants.connect(halted) as db:
        db.execute("ALTER TABLE note ADD COLUMN extra TEXT")
        db.execute("INSERT INTO note VALUES (1, NULL, 'halted', 1, 'x')")
    rng = random.Random(2)
    others = [i for i in range(count) if i not in (locked, halted)]
    for i in others:
        with tenants.connect(i) as db:
            write_workload(db, rng, 5)
    wait_equal(tenants, pg, others)  # while the lock is held and the table halted
    wait_for("the daemon names the locked, halted and uninstalled files",
             lambda: {tenants.path(i).name for i in (locked, halted)} | {uninstalled.name}
             <= set(troubled_files(tenants)), timeout=30)
    reasons = troubled_files(tenants)
    assert "halted" in reasons[tenants.path(halted).name]
    assert "not installed" in reasons[uninstalled.name]
    assert "syncd install --file" in reasons[uninstalled.name]
    metrics = httpx.get(f"http://{tenants.metrics}/metrics", timeout=5).text
    assert f'syncd_file_problem{{file="{tenants.path(halted).name}",tenant="{tenants.run}-{halted}"}} 1.0' in metrics
    assert 'syncd_files{state="troubled"} 3.0' in metrics
    status = tenants.syncd("status")
    assert status.returncode == 1
    assert tenants.path(halted).name in status.stdout and uninstalled.name in status.stdout
    release.set()
    holder.join()
    with tenants.connect(halted) as db:
        db.execute("ALTER TABLE note DROP COLUMN extra")
    daemon.send_signal(signal.SIGHUP)  # resume the halted table
    assert tenants.syncd("install", "--file", uninstalled.name).returncode == 0
    with tenants.connect(count) as db:
        write_workload(db, rng, 3)
    wait_equal(tenants, pg, [locked, halted, count])
    wait_for("every file ships", lambda: not troubled_files(tenants), timeout=30)
    stop(daemon)


def test_kill_9_of_one_of_two_daemons_sharing_a_glob_loses_nothing(tenants: Tenants, pg: psycopg.Connection):
    """Two daemons on one glob split the files by their leases; one killed with SIGKILL mid-stream, the other takes
    its files over within the lease time, and every tenant ends equal."""
    count = 16
    for i in range(count):
        tenants.create(i)
    assert tenants.syncd("install").returncode == 0
    second = tenants.root / "second.toml"
    second.write_text(tenants.config.read_text().replace(tenants.metrics, f"127.0.0.1:{free_port()}"))
    first_daemon, second_daemon = tenants.start(), tenants.start(config=second)
    done = threading.Event()

    def writer(seed: int) -> None:
        rng, base = random.Random(seed), 0
        while not done.is_set():
            for i in range(seed, count, 2):
                with tenants.connect(i) as db:
                    write_workload(db, rng, 2, base=base)
            base += 10

    writers = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    for thread in writers:
        thread.start()
    time.sleep(3)
    holders = lease_holders(tenants)
    first_daemon.kill()
    first_daemon.wait()
    time.sleep(3)
    done.set()
    for thread in writers:
        thread.join()
    wait_equal(tenants, pg, list(range(count)), timeout=60)
    assert holders <= {first_daemon.pid, second_daemon.pid}
    wait_for("the survivor holds every lease it needs", lambda: lease_holders(tenants) <= {second_daemon.pid})
    stop(second_daemon)


def lease_holders(tenants: Tenants) -> set[object]:
    status = json.loads(tenants.syncd("status", "--json").stdout)
    return {file["status"]["lease"]["pid"] for file in status["files"]
            if file["status"]["lease"] and file["status"]["lease"]["alive"]}


def test_shards_split_the_files_and_auto_install_serves_a_new_file(tenants: Tenants, pg: psycopg.Connection):
    """shard = "0/2" and "1/2" serve disjoint halves (by the hash of the name); with auto_install a file that
    appears is installed once its schema stood still, and the rows it already held are copied."""
    from syncd.tenants import shard_index

    count = 8
    for i in range(count):
        tenants.create(i)
    assert tenants.syncd("install").returncode == 0
    text = tenants.config.read_text().replace('glob = "tenants/*.sqlite3"',
                                              'glob = "tenants/*.sqlite3"\nauto_install = true')
    configs = []
    for shard in range(2):
        path = tenants.root / f"shard{shard}.toml"
        path.write_text(text.replace(tenants.metrics, f"127.0.0.1:{free_port()}")
                        .replace("auto_install = true", f'auto_install = true\nshard = "{shard}/2"'))
        configs.append(path)
    daemons = [tenants.start(config=path) for path in configs]
    rng = random.Random(3)
    for i in range(count):
        with tenants.connect(i) as db:
            write_workload(db, rng, 3)
    wait_equal(tenants, pg, list(range(count)))
    status = json.loads(tenants.syncd("status", "--json").stdout)
    for file in status["files"]:
        lease = file["status"]["lease"]
        assert lease and lease["alive"], file
        assert lease["pid"] == daemons[shard_index(file["file"], 2)].pid, file
    tenants.create(count)
    with tenants.connect(count) as db:
        write_workload(db, rng, 10)  # rows written before any capture: copied by the install's resync
    wait_equal(tenants, pg, [count], timeout=40)
    with tenants.connect(count) as db:
        write_workload(db, rng, 5, base=100)
    wait_equal(tenants, pg, [count])
    for daemon in daemons:
        stop(daemon)


def test_run_once_drains_every_file_and_fails_on_one_it_cannot_serve(tenants: Tenants, pg: psycopg.Connection):
    """`run --once` over a glob: every file drained, exit 0; a file not installed makes it exit 1 naming the file,
    after the others were drained; a glob whose directory does not exist is a configuration error."""
    for i in range(5):
        tenants.create(i)
    assert tenants.syncd("install").returncode == 0
    rng = random.Random(4)
    for i in range(5):
        with tenants.connect(i) as db:
            write_workload(db, rng, 10)
    done = tenants.syncd("run", "--once")
    assert done.returncode == 0, done.stderr[-3000:]
    wait_equal(tenants, pg, list(range(5)), timeout=5)
    uninstalled = tenants.create(5)
    with tenants.connect(0) as db:
        write_workload(db, rng, 5, base=50)
    failed = tenants.syncd("run", "--once")
    assert failed.returncode == 1
    assert "run --once ended with file(s) not shipping" in failed.stderr and uninstalled.name in failed.stderr
    wait_equal(tenants, pg, [0], timeout=5)
    tenants.directory.rename(tenants.root / "elsewhere")
    missing = tenants.syncd("run", "--once")
    assert missing.returncode == 2 and "source.glob: the directory" in missing.stderr


def test_operations_run_for_every_file_or_the_one_named(tenants: Tenants):
    """resync, replay and status take --file/--tenant and default to every file, each under its header; a name that
    matches no file is refused with the files there are; --file is refused in single-file mode."""
    for i in range(3):
        tenants.create(i)
        with tenants.connect(i) as db:
            write_workload(db, random.Random(i), 4)
    assert tenants.syncd("install").returncode == 0
    every = tenants.syncd("resync", "--all", "--dry-run")
    assert every.returncode == 0, every.stderr
    assert [line for line in every.stdout.splitlines() if line.startswith("== ")] == [
        f"== {tenants.path(i).name} (tenant {tenants.run}-{i})" for i in range(3)]
    one = tenants.syncd("resync", "--table", "note", "--tenant", f"{tenants.run}-1")
    assert one.returncode == 0 and one.stdout.count("== ") == 1
    pending = json.loads(tenants.syncd("status", "--json").stdout)
    assert [file["pending"] > 0 for file in pending["files"]] == [False, True, False]
    single = json.loads(tenants.syncd("status", "--json", "--file", tenants.path(1).name).stdout)
    assert single["database"] == str(tenants.path(1))  # one file named: its own single-file status
    assert sum(table["pending"] for table in single["tables"]) > 0
    replayed = tenants.syncd("replay", "--dead-letters", "--dry-run")
    assert replayed.returncode == 0 and replayed.stdout.count("would re-enqueue 0 dead letter(s)") == 3
    unknown = tenants.syncd("status", "--tenant", "nobody")
    assert unknown.returncode == 2 and "no file matching source.glob has --tenant nobody" in unknown.stderr
    single_file = tenants.root / "single.toml"
    single_file.write_text(tenants.config.read_text().replace('glob = "tenants/*.sqlite3"',
                                                              f'path = "{tenants.path(0)}"'))
    refused = subprocess.run([sys.executable, "-m", "syncd", "status", "--config", str(single_file), "--file", "x"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "only in multi-file mode" in refused.stderr


def tenant_files_open(pid: int, directory: Path) -> list[str]:
    """The tenant files (and their -wal, -shm, state files) process `pid` has open now, from /proc/PID/fd."""
    opened = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(directory)):
            opened.append(target)
    return opened


def test_an_idle_file_is_closed_and_opened_again_only_when_it_changes(tenants: Tenants, pg: psycopg.Connection):
    """A file idle for IDLE_CLOSE_SECONDS (1 s here) is closed, and stays closed while nothing changes it, the
    close's own checkpoint included (it once woke the file, which opened again at once: an idle directory kept every
    file open); a commit of the app's opens it again, ships, and it closes again."""
    for i in range(3):
        tenants.create(i)
    assert tenants.syncd("install").returncode == 0
    patch = "import syncd.fleet; syncd.fleet.IDLE_CLOSE_SECONDS = 1.0; from syncd.cli import main; main()"
    process = tenants.start(launcher=("-c", patch))
    try:
        with tenants.connect(0) as db:
            write_workload(db, random.Random(7), 5)
        wait_equal(tenants, pg, [0, 1, 2])
        for round_ in range(2):
            wait_for("every file closed", lambda: not tenant_files_open(process.pid, tenants.directory))
            quiet_until = time.monotonic() + 3
            while time.monotonic() < quiet_until:
                assert not tenant_files_open(process.pid, tenants.directory), "an idle file was opened again"
                time.sleep(0.05)
            with tenants.connect(1) as db:
                write_workload(db, random.Random(round_), 3, base=100 * (round_ + 1))
            wait_equal(tenants, pg, [1])
    finally:
        err = stop(process)
    assert "Traceback" not in err, err[-3000:]
