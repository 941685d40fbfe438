"""Waking the drain loop as soon as the application commits.

Three sources, whichever comes first: watchdog events on the database file and its -wal (milliseconds
after a commit), `PRAGMA data_version` checked every few tens of milliseconds (it changes when another
connection commits, and works where file events do not, e.g. some network or overlay filesystems),
and an explicit `wake()` (SIGUSR1). The poll interval is only the upper bound of a wait.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import apsw

from syncd.source import Source

if TYPE_CHECKING:
    from watchdog.events import FileSystemEvent
    from watchdog.observers.api import BaseObserver

DATA_VERSION_EVERY = 0.025


class Waker:
    """Wakes the drain loop when the database changes; `wait` is the loop's WaitFn. It reads `PRAGMA data_version`
    on the source's own connection (SQLite changes it only for commits of other connections), the new one after
    the file was replaced; once `start`ed, a file event on it (a rename onto the file: a restore) wakes it too."""

    def __init__(self, source: Source, database: Path) -> None:
        self.source = source
        self.event = threading.Event()
        path = database.resolve()
        self.directory = path.parent
        self.watched = {str(path), f"{path}-wal"}
        self.observer: BaseObserver | None = None
        self.data_version: int | None = None

    def start(self) -> None:
        """Start watching the database file's directory (on watchdog's thread; imported here: `syncd run --once`
        never waits, and starts without it)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        waker = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                waker.on_any_event(event)

        self.observer = Observer()
        self.observer.schedule(Handler(), str(self.directory), recursive=False)
        self.observer.daemon = True
        self.observer.start()

    def stop(self) -> None:
        """Stop watching (nothing to do when it never started)."""
        if self.observer is not None:
            self.observer.stop()

    def on_any_event(self, event: FileSystemEvent) -> None:
        """A file event (on watchdog's thread): wake the loop when it concerns the database file or its -wal."""
        if str(event.src_path) in self.watched or str(getattr(event, "dest_path", "")) in self.watched:
            self.event.set()

    def wake(self) -> None:
        """Wake the loop now (SIGUSR1, or a stop)."""
        self.event.set()

    def current_version(self) -> int | None:
        """SQLite's `PRAGMA data_version` on the source's connection (it changes when another connection commits);
        None when the file cannot be read now (the loop finds out why)."""
        try:
            return int(cast(tuple[int], self.source.conn.execute("PRAGMA data_version").fetchone())[0])
        except apsw.Error:
            return None

    def wait(self, timeout: float, stop: threading.Event) -> None:
        """Return when something changed, when woken or stopped, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not stop.is_set():
            if self.event.wait(min(DATA_VERSION_EVERY, max(0.0, deadline - time.monotonic()))):
                break
            version = self.current_version()
            if version is None or version != self.data_version or time.monotonic() >= deadline:
                break
        self.event.clear()
        self.data_version = self.current_version()
