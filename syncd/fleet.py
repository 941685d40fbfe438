"""Multi-file mode (`[source] glob`): one daemon serves every matching file, a few drive threads taking turns among
them.

Each file is a `Unit`: its tenant file, what the daemon knows of it (`FileState`, kept while the file matches) and,
while the file has work, a `Worker` of its own (the single-file drain loop, with its source, lease, plan, halts and
flush) sharing the daemon's target (scoped to the tenant), shipping threads and metrics. A unit is due when its file
changes (one watchdog watch on the glob's directory; a sweep of the closed files' stat every second is the net under
it), when its pause ends or, with work left, at once; `drain_threads` threads take the due unit that waited longest
and give it one turn of at most `SLICE_SECONDS`, so a busy tenant takes its turn among the others and never starves
them. A unit idle for `IDLE_CLOSE_SECONDS` closes its file (the lease given up, nothing kept open; the next sweep
gives the memory freed back to the system); idle files cost a stat, not a connection or a thread. One broken file
(locked, halted, corrupt, not installed) keeps its problem in its state and waits with backoff; the others ship.

Files that appear are served at the next look (the watch, or a rescan of the glob every `RESCAN_SECONDS`); a file
that disappears is closed and forgotten (its state stays in its own file: it resumes, through the replaced-file
logic of the single-file mode, when it comes back). A new file without syncd's tables is reported, or with
`[source] auto_install` installed once its schema holds the configured tables and has stood still for
`SETTLE_SECONDS`, and its rows copied (resync, parents first).
"""

from __future__ import annotations

import contextlib
import fnmatch
import heapq
import itertools
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import apsw

from syncd import backoff, capture, memory, outbox, sqlite
from syncd import replay as operations
from syncd.config import Config, ConfigError
from syncd.fleet_metrics import FileHealth, FileMetrics, FileState, fleet_metrics
from syncd.logs import get_logger
from syncd.metrics import Metrics
from syncd.observer import Observer
from syncd.plan import ship_order
from syncd.reconcile import Reconciler
from syncd.source import Source
from syncd.target import PostgrestTarget, open_target
from syncd.tenants import COMPANIONS, TenantFile, TenantPattern, discover, recursive, watched_directories
from syncd.watch import SOURCE_FAULTS, SourceGone, fault_kind
from syncd.worker import Pause, Worker

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

__all__ = ["Fleet", "Unit", "glob_root"]

SLICE_SECONDS = 0.25  # the longest turn of one file while others wait
IDLE_CLOSE_SECONDS = 10.0  # a file without claims this long is closed (reopened at its next change)
IDLE_LOOK_SECONDS = 300.0  # a closed idle file that does not change is opened for one turn this often
RESCAN_SECONDS = 5.0  # the glob is read again this often (new files the watch missed, files gone)
SWEEP_SECONDS = 1.0  # the closed files' stat is compared this often (changes the watch missed)
SETTLE_SECONDS = 2.0  # a new file's schema stands still this long before auto_install installs capture
SETTLING_LOOKS_SECONDS = 60.0  # a new file is looked at every second this long; then as one with a problem
PROBLEM_RETRY_SECONDS = 30.0  # a file with a problem (not installed, cannot be opened) is looked at again
FAILURE_CAP_SECONDS = 60.0  # the longest backoff of a file whose turn failed


@dataclass(eq=False)
class Unit:
    """One matching file and what the daemon does with it now."""

    file: TenantFile
    state: FileState
    worker: Worker | None = None
    reconciler: Reconciler | None = None
    due: float = 0.0  # monotonic seconds: its next turn, not before
    wakeable: bool = True  # a change of the file may bring `due` forward
    scheduled: bool = False  # in the heap
    running: bool = False  # a drive thread has it
    poked: bool = False  # changed while running: another turn at once
    idle_since: float = field(default_factory=time.monotonic)
    failures: int = 0  # turns in a row that failed (open, problem, unexpected error)
    # The file's `signature` as it was left closed (or as its turn began, while not open): only a change from it opens
    # the file again, so that the watch events of the daemon's own doing (the checkpoint of its close, the -wal its
    # open created) do not reopen an idle file at once. An open file takes every event, running or not: a commit's
    # last write can share its mtime with a turn that began before the commit was visible (WAL size unchanged), and
    # dropping that event as 'seen' left the commit waiting for the poll interval.
    signature: tuple[int, ...] | None = None
    settling: tuple[int, float] | None = None  # auto_install: (schema version, since when) of an uninstalled file
    done: bool = False  # --once: drained
    gone: bool = False  # no longer matches: drop after its turn


class Fleet:
    """The files of one glob, served by `drain_threads` drive threads until `stop` (see the module docstring).
    `reload` reads the configuration again (SIGHUP)."""

    def __init__(self, config: Config, *, once: bool = False, reload: Callable[[], Config] | None = None) -> None:
        assert config.source.glob is not None
        self.config = config
        self.once = once
        self.reload = reload
        self.log = get_logger()
        self.pattern = TenantPattern.parse(config.source.tenant)
        self.root = glob_root(config)
        self.units: dict[Path, Unit] = {}
        self.lock = threading.Condition()
        self.heap: list[tuple[float, int, Unit]] = []
        self.order = itertools.count()
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.rescan_requested = threading.Event()
        self.closed_any = False  # a file was closed since the sweep last gave freed memory back
        self.metrics: Metrics = fleet_metrics(self.states)
        self.metrics.health.alive_within = max(60.0, 5 * config.worker.poll_interval)
        self.target = open_target(config)
        self.pool = ThreadPoolExecutor(max_workers=config.worker.drain_threads * config.worker.max_in_flight,
                                       thread_name_prefix="syncd-ship")
        self.watcher: BaseObserver | None = None
        self.unmatched: set[str] = set()  # files whose name gives no tenant (warned once)
        self.unlisted: set[str] = set()  # files not installed (warned once each)

    # -- what the metrics and status read ------------------------------------------------------------------

    def states(self) -> list[FileState]:
        with self.lock:
            return [unit.state for unit in self.units.values()]

    def wake(self) -> None:
        """SIGUSR1 (and SIGHUP, SIGTERM): every file is due now."""
        with self.lock:
            for unit in self.units.values():
                self.make_due(unit, force=True)
            self.lock.notify_all()

    # -- files: discover, add, drop -----------------------------------------------------------------------

    def rescan(self) -> None:
        """Read the glob: serve the files that appeared, drop those that went away."""
        found = {file.path: file for file in discover(str(self.config.source.glob), self.root, self.pattern,
                                                      self.config.source.shard_of)}
        with self.lock:
            for path, file in found.items():
                if path in self.units:
                    continue
                if file.tenant is None:
                    if file.name not in self.unmatched:
                        self.unmatched.add(file.name)
                        self.log.warning("a file matches source.glob but its name gives no tenant: not served",
                                         file=file.name, tenant_pattern=self.config.source.tenant,
                                         fix="rename it, or change source.tenant")
                    continue
                unit = Unit(file, FileState(file.name, file.tenant))
                self.units[path] = unit
                self.make_due(unit, force=True)
            for path, unit in list(self.units.items()):
                if path not in found and not unit.gone:
                    unit.gone = True  # its next turn closes it, then it is dropped
                    self.make_due(unit, force=True)
            self.lock.notify_all()

    def drop(self, unit: Unit) -> None:
        """Stop serving a file that no longer matches (with the lock held; its worker closed by its last turn)."""
        if self.units.get(unit.file.path) is unit:
            del self.units[unit.file.path]
            self.log.info("file no longer matches source.glob: not served", file=unit.file.name)

    # -- scheduling ---------------------------------------------------------------------------------------

    def make_due(self, unit: Unit, *, at: float | None = None, force: bool = False) -> None:
        """Bring the unit's turn forward to `at` (now by default), with the lock held. A unit in a backoff (not
        wakeable) keeps its time unless `force`."""
        if unit.running:
            unit.poked = unit.poked or unit.wakeable or force
            return
        if not (unit.wakeable or force) or (unit.done and not unit.gone):
            return
        when = time.monotonic() if at is None else at
        if unit.scheduled and unit.due <= when:
            return
        unit.due, unit.scheduled = when, True
        heapq.heappush(self.heap, (when, next(self.order), unit))
        self.lock.notify()

    def schedule(self, unit: Unit, pause: Pause | None) -> None:
        """After a turn: the next one (with the lock held)."""
        unit.running = False
        if unit.gone and unit.worker is None:
            self.drop(unit)
            return
        if unit.gone:  # went away during its turn: the next one closes it
            pause = Pause(0.0)
        if pause is None:
            unit.done = True  # --once: drained, or nothing more to try
            self.lock.notify_all()
            return
        unit.wakeable = pause.wakeable
        seconds = 0.0 if unit.poked and pause.wakeable else pause.seconds
        unit.poked = False
        unit.scheduled = False
        self.make_due(unit, at=time.monotonic() + seconds, force=True)

    def next_unit(self) -> Unit | None:
        """The due unit that waited longest (None when stopping); waits for one (at most a second: the caller
        beats the heartbeat)."""
        with self.lock:
            while not self.stop.is_set():
                while self.heap:
                    due, _, unit = self.heap[0]
                    if not unit.scheduled or unit.due != due or unit.running or unit.done:
                        heapq.heappop(self.heap)  # superseded by an earlier entry
                        continue
                    break
                now = time.monotonic()
                if self.heap and self.heap[0][0] <= now:
                    _, _, unit = heapq.heappop(self.heap)
                    unit.scheduled, unit.running = False, True
                    return unit
                wait = min(1.0, self.heap[0][0] - now) if self.heap else 1.0
                self.lock.wait(wait)
                return None
            return None

    def finished(self) -> bool:
        """--once: every file drained (or dropped)."""
        with self.lock:
            return all(unit.done for unit in self.units.values())

    # -- one turn of one file -------------------------------------------------------------------------------

    def drive(self) -> None:
        """A drive thread: take due units and give each one turn, until stop."""
        while not self.stop.is_set():
            self.metrics.health.heartbeat = time.time()
            unit = self.next_unit()
            if unit is None:
                continue
            pause = self.turn(unit)
            with self.lock:
                self.schedule(unit, pause)

    def turn(self, unit: Unit) -> Pause | None:
        """One turn of `unit`: open it when closed, drain a slice, reconcile what is due, close it when idle or
        gone. Never raises: a failure becomes the file's problem, with backoff."""
        unit.signature = signature(unit.file.path)
        try:
            if unit.gone or unit.signature is None:
                self.close(unit)
                return None if unit.gone or self.once else Pause(RESCAN_SECONDS)
            if unit.worker is None and not self.open(unit):
                if self.once and not unit.failures and unit.settling is None:  # not installed: --once reports it, ends
                    return None
                return self.problem_pause(unit)
            worker = unit.worker
            assert worker is not None
            pause = worker.turn(self.stop, self.once, slice_seconds=SLICE_SECONDS)
            if unit.reconciler is not None and unit.reconciler.busy() and not self.stop.is_set():
                unit.reconciler.run_next()
            unit.state.served = unit.state.health.standby is None
            unit.failures = 0
            unit.state.problem = None
            if pause is None:
                self.close(unit)
                return None
            if not unit.state.served:  # another daemon holds its lease: look again when it may have expired
                self.close(unit)
                return Pause(pause.seconds)
            now = time.monotonic()
            if worker.last_claimed or not pause.wakeable:
                unit.idle_since = now
            elif now - unit.idle_since > IDLE_CLOSE_SECONDS and self.closable(unit):
                self.close(unit)
                return Pause(IDLE_LOOK_SECONDS, wakeable=True)  # until it changes: the watch, or the sweep's stat
            return pause
        except SourceGone:
            self.close(unit)
            return Pause(RESCAN_SECONDS)
        except Exception as exc:  # a bug, or a file syncd cannot read: this file waits, the others ship
            unit.failures += 1
            unit.state.problem = f"its drain failed: {type(exc).__name__}: {exc}"
            self.log.error("a file's drain failed; it is retried with backoff while the others ship",
                           file=unit.file.name, tenant=unit.file.tenant, error=f"{type(exc).__name__}: {exc}",
                           traceback=traceback.format_exc())
            self.close(unit)
            return None if self.once else self.problem_pause(unit)

    def problem_pause(self, unit: Unit) -> Pause:
        """A file that could not be opened: looked at again with backoff (a locked file is not tried at each of the
        app's commits: every try waits out the busy timeout); one not installed, after PROBLEM_RETRY_SECONDS or as
        soon as it changes (`syncd install` ran); a new one settling, soon."""
        if unit.settling is not None and time.monotonic() - unit.settling[1] < SETTLING_LOOKS_SECONDS:
            return Pause(SETTLE_SECONDS / 2, wakeable=True)
        if unit.failures:
            return Pause(backoff.delay(unit.failures, base=1.0, cap=FAILURE_CAP_SECONDS))
        return Pause(PROBLEM_RETRY_SECONDS, wakeable=True)

    def closable(self, unit: Unit) -> bool:
        """An idle unit may close its file: nothing halted, waiting or being reconciled (those are held open so
        that status and /readyz keep saying so)."""
        health = unit.state.health
        return (not health.halted and not health.waiting and health.source_problem is None
                and (unit.reconciler is None or not unit.reconciler.busy()))

    def open(self, unit: Unit) -> bool:
        """Open the unit's file and build its worker; False (the problem in its state) when it cannot be served
        yet: locked, not installed, cannot be opened."""
        file = unit.file
        assert file.tenant is not None
        try:
            source = Source(file.path)
        except sqlite.SourceFileError as exc:
            unit.failures += 1
            unit.state.problem = f"cannot open it: {exc}"
            return False
        try:
            if not outbox.installed(source.conn) and not self.install(unit, source):
                source.conn.close()
                return False
            source.configure()
        except SOURCE_FAULTS as exc:
            source.conn.close()
            unit.failures += 1
            unit.state.problem = f"cannot read it ({fault_kind(exc)}): {exc}"
            return False
        except apsw.Error as exc:
            source.conn.close()
            unit.failures += 1
            unit.state.problem = f"cannot read it: {type(exc).__name__}: {exc}"
            return False
        config = self.config.for_file(file.path, file.tenant)
        health = FileHealth(target_ok=unit.state.health.target_ok, reason=unit.state.health.reason)
        health.target_at = unit.state.health.target_at
        unit.state.health = health
        observer = Observer(FileMetrics(self.metrics, unit.state),
                            self.log.bind(file=file.name, tenant=file.tenant))
        scoped = self.target.scoped(self.config.source.tenant_column, file.tenant)
        worker = Worker(source, config, scoped, observer, pool=self.pool, among_files=True,
                        reload=None if self.reload is None else lambda: self.reloaded_settings(file))

        def settings() -> tuple[Config, PostgrestTarget]:
            target = worker.target
            assert isinstance(target, PostgrestTarget)
            return worker.config, target

        unit.reconciler = worker.keeper.reconciler = Reconciler(file.path, settings, observer)
        unit.worker, unit.settling = worker, None
        unit.state.problem = None
        unit.idle_since = time.monotonic()
        return True

    def install(self, unit: Unit, source: Source) -> bool:
        """An uninstalled file: with auto_install, install capture once its schema holds the configured tables
        and stood still for SETTLE_SECONDS, then enqueue its rows (parents first); else report it. True when it is
        installed now."""
        file, config = unit.file, self.config
        if not config.source.auto_install:
            unit.state.problem = (f"syncd is not installed in it: run syncd install --file {file.name} "
                                  "(or set source.auto_install = true)")
            if file.name not in self.unlisted:
                self.unlisted.add(file.name)
                self.log.warning("a file matching source.glob is not installed: not served", file=file.name,
                                 fix=f"syncd install --file {file.name}, or set source.auto_install = true")
            return False
        missing = [t.name for t in config.tables if not capture.table_exists(source.conn, t.name)]
        version, now = sqlite.schema_version(source.conn), time.monotonic()
        if missing or unit.settling is None or unit.settling[0] != version:
            unit.settling = (version, now)
            unit.state.problem = ("a new file, waiting for its schema to hold " + ", ".join(missing) if missing
                                  else "a new file, waiting for its schema to stand still before installing capture")
            return False
        if now - unit.settling[1] < SETTLE_SECONDS:
            return False
        source.configure()
        for_file = config.for_file(file.path, str(file.tenant))
        report = capture.install(source.conn, for_file)
        tables = ship_order(source.conn, for_file, [t.name for t in config.tables])
        keys = sum(operations.resync_table(source.conn, for_file, table).keys for table in tables)
        self.log.info("capture installed in a new file (source.auto_install); its rows are enqueued, parents first",
                      file=file.name, tenant=file.tenant, triggers=len(report.created), keys=keys)
        unit.settling = None
        return True

    def close(self, unit: Unit) -> None:
        """Close the unit's file: apply what was acknowledged, give the lease up, remember its stat."""
        worker, unit.worker, unit.reconciler = unit.worker, None, None
        if worker is not None:
            with contextlib.suppress(Exception):
                worker.close_out()
            with contextlib.suppress(apsw.Error):
                worker.conn.close()
            self.closed_any = True
        unit.signature = signature(unit.file.path)

    def reloaded_settings(self, file: TenantFile) -> tuple[Config, PostgrestTarget]:
        """A worker's SIGHUP: the fleet's reloaded configuration, narrowed to its file, and its scoped target."""
        assert file.tenant is not None
        return self.config.for_file(file.path, file.tenant), self.target.scoped(self.config.source.tenant_column,
                                                                                file.tenant)

    # -- the watch, the sweep, SIGHUP ------------------------------------------------------------------------

    def start_watch(self) -> None:
        """One watchdog watch on the glob's fixed directory: a change of a served file makes it due; a file
        unknown to the daemon asks for a rescan."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer as DirectoryWatch

        fleet = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                fleet.on_event(event)

        self.watcher = DirectoryWatch()
        self.watcher.schedule(Handler(), str(self.root), recursive=recursive(str(self.config.source.glob)))
        self.watcher.daemon = True
        self.watcher.start()

    def on_event(self, event: FileSystemEvent) -> None:
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = os.fsdecode(raw)
            if not path or path.endswith(("-shm", *COMPANIONS[3:])):
                continue
            database = Path(path.removesuffix("-wal").removesuffix("-journal"))
            unit = self.units.get(database)
            if unit is not None:
                now = signature(database)
                with self.lock:
                    if now is not None and now == unit.signature and unit.worker is None:
                        continue  # closed, and unchanged since: an event of the daemon's own doing
                    self.make_due(unit, force=now is None)
                if now is None:  # moved away or deleted: drop it (a rescan), or see it back
                    self.rescan_requested.set()
                continue
            if fnmatch.fnmatch(str(database), str(self.config.source.glob)) or (
                    event.is_directory and recursive(str(self.config.source.glob))):
                self.rescan_requested.set()

    def sweep(self) -> None:
        """The housekeeping thread: rescan the glob, catch changes of closed files the watch missed, reload on
        SIGHUP."""
        last_rescan = time.monotonic()
        while not self.stop.wait(SWEEP_SECONDS):
            if self.closed_any:  # the files closed leave their memory in the allocator's heaps: return it
                self.closed_any = False
                memory.release_freed_memory()
            if self.reload_requested.is_set():
                self.reload_now()
            now = time.monotonic()
            if self.rescan_requested.is_set() or now - last_rescan >= RESCAN_SECONDS:
                self.rescan_requested.clear()
                last_rescan = now
                try:
                    self.rescan()
                except OSError as exc:
                    self.log.error("cannot read the directory of source.glob", glob=self.config.source.glob,
                                   error=str(exc))
            with self.lock:
                closed = [unit for unit in self.units.values() if unit.worker is None and not unit.running
                          and unit.signature is not None]
            for unit in closed:
                if signature(unit.file.path) != unit.signature:
                    with self.lock:
                        self.make_due(unit)

    def reload_now(self) -> None:
        """SIGHUP: read the configuration again; every open worker reloads at its next turn (through
        `reloaded_settings`), the closed ones open with the new one."""
        self.reload_requested.clear()
        if self.reload is None:
            return
        try:
            config = self.reload()
        except ConfigError as exc:
            self.log.error("configuration reload failed; the old one stays", problems=exc.problems or [str(exc)])
            return
        old, self.config = self.target, config
        self.target = open_target(config)
        self.pattern = TenantPattern.parse(config.source.tenant)
        # Scoped views of the old client may still be in flight: close it once every turn moved to the new one.
        threading.Timer(FAILURE_CAP_SECONDS * 2, old.close).start()
        with self.lock:
            for unit in self.units.values():
                if unit.worker is not None:
                    unit.worker.settings.requested.set()
                self.make_due(unit, force=True)
        self.rescan_requested.set()

    # -- the whole ----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until `stop` (or, with `once`, until every file is drained); the exit code: 0, or 1 when `once`
        ended with a file not shipping (halted, failing, not installed)."""
        if not self.root.is_dir():
            raise ConfigError("invalid configuration (1 problem):", [
                f"source.glob: the directory {self.root} does not exist; create it (the app's tenant files go "
                "there), or correct the pattern"])
        self.rescan()
        if not self.units:
            self.log.warning("no file matches source.glob yet: serving the files that appear",
                             glob=self.config.source.glob)
        if not self.once:
            self.start_watch()
        threads = [threading.Thread(target=self.drive, name=f"syncd-drive-{i}", daemon=True)
                   for i in range(self.config.worker.drain_threads)]
        threads.append(threading.Thread(target=self.sweep, name="syncd-sweep", daemon=True))
        for thread in threads:
            thread.start()
        self.log.info("syncd started", glob=self.config.source.glob, files=len(self.units),
                      target=self.config.target.url, tables=[t.name for t in self.config.tables],
                      metrics=self.config.worker.metrics_addr, once=self.once, shard=self.config.source.shard,
                      drain_threads=self.config.worker.drain_threads)
        while not self.stop.is_set():
            if self.once and self.finished():
                break
            self.stop.wait(0.1)
        self.stop.set()
        with self.lock:
            self.lock.notify_all()
        deadline = time.monotonic() + self.config.worker.shutdown_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in threads):
            return -1  # the caller leaves at once: a request in flight is abandoned (it ships again)
        with self.lock:
            units = list(self.units.values())
        for unit in units:
            self.close(unit)
        if self.watcher is not None:
            self.watcher.stop()
        self.target.close()
        self.pool.shutdown(wait=False)
        troubled = {state.name: reason for state in self.states() if (reason := state.trouble()) is not None}
        if self.once and troubled:
            self.log.error("run --once ended with file(s) not shipping", files=troubled)
            return 1
        return 0


def glob_root(config: Config) -> Path:
    """The directory the glob's names are relative to, and the one watched: its longest part without a
    wildcard. The shard hash and status use names relative to it, the same in every process on one glob."""
    return watched_directories(str(config.source.glob), Path("/"))[0]


def signature(path: Path) -> tuple[int, ...] | None:
    """The stat of a database file and its WAL (inode, size, mtime) that a commit changes; None when it is gone.
    Only a stat: the daemon never opens a database file (or its -shm) outside SQLite, since closing any descriptor
    of a file drops every POSIX lock the process holds on it, SQLite's included, and the app may then checkpoint or
    reset the WAL under a connection still reading it (https://www.sqlite.org/howtocorrupt.html, 2.2). A stat can
    miss a commit: a -wal reset by a checkpoint is written again from its start without growing, and mtime moves
    only at the kernel's clock tick. That is why an open file takes every event, and why a closed one still gets a
    turn every IDLE_LOOK_SECONDS."""
    try:
        main = os.stat(path)
    except OSError:
        return None
    try:
        wal = os.stat(f"{path}-wal")
        extra: tuple[int, ...] = (wal.st_size, wal.st_mtime_ns)
    except OSError:
        extra = ()
    return (main.st_ino, main.st_size, main.st_mtime_ns, *extra)
