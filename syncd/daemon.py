"""`syncd run`: the wiring. Build the daemon's parts from the configuration (the application's file, the
secondary, the metrics server, the wake-up sources, the worker) and drive the worker until a signal.

Signals: SIGTERM/SIGINT stop claiming, let the request in flight finish within the shutdown timeout
(or abandon it: nothing unacknowledged is ever deleted, so that is safe) and exit 0; a second one exits
at once. SIGUSR1 wakes the loop; SIGHUP resumes tables halted by a configuration error.

Only the command line imports this module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from syncd import capture, logs, outbox, sqlite
from syncd.config import Config, ConfigError
from syncd.logs import get_logger
from syncd.metrics import Metrics, serve
from syncd.observer import Observer
from syncd.target import open_target, token_source
from syncd.wake import Waker
from syncd.worker import Worker


def run(config: Config, *, once: bool = False, log_format: str = "json") -> int:
    """Run the daemon until SIGTERM/SIGINT (or, with `once`, until the outbox is empty); the exit code.
    Raises ConfigError, CaptureError or DatabaseNotFound before anything starts."""
    logs.configure(log_format)
    log = get_logger()
    tokens = token_source(config)
    conn = sqlite.connect(config.source.path)
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        # In WAL mode a lost acknowledgement (power cut before the WAL reaches the disk) only means entries
        # ship again, so syncd's own commits need no fsync (the app's durability stays the app's setting).
        # Outside WAL, NORMAL is not corruption-safe: keep SQLite's default there.
        conn.execute("PRAGMA synchronous = NORMAL")
    if not outbox.installed(conn):
        raise capture.CaptureError(f"syncd is not installed in {config.source.path}; run: syncd install")
    metrics = Metrics()
    metrics.health.alive_within = max(60.0, 5 * config.worker.poll_interval)
    observer = Observer(metrics, log)
    source_of = {table.target_name: table.name for table in config.tables}
    target = open_target(config, tokens, on_renewed=lambda table, error: observer.token_renewed(
        source_of.get(table, table), error))
    try:
        server = serve(metrics, config.worker.metrics_addr)
    except OSError as exc:
        raise ConfigError("invalid configuration (1 problem):", [
            f"worker.metrics_addr: cannot listen on {config.worker.metrics_addr} ({exc.strerror}); "
            "choose another with --metrics-addr"]) from None
    worker = Worker(conn, config, target, observer)
    waker = Waker(conn, config.source.path)
    waker.start()
    stop = threading.Event()
    install_signal_handlers(stop, waker, worker)
    log.info("syncd started", database=str(config.source.path), target=config.target.url,
             tables=list(worker.mappings), metrics=config.worker.metrics_addr, once=once)
    thread = threading.Thread(target=worker.run, args=(stop, waker.wait, once), name="syncd-worker", daemon=True)
    thread.start()
    while thread.is_alive() and not stop.is_set():
        thread.join(0.05)
    thread.join(config.worker.shutdown_timeout)
    if thread.is_alive():
        # The shipping thread would be joined at interpreter exit; leave now instead. Safe: nothing in
        # flight was acknowledged, so it ships again at the next start.
        log.warning("request in flight abandoned at shutdown; it will be shipped again at the next start")
        sys.stderr.flush()
        os._exit(0)
    waker.stop()
    server.shutdown()
    target.close()
    log.info("syncd stopped")
    return 0


def install_signal_handlers(stop: threading.Event, waker: Waker, worker: Worker) -> None:
    """SIGTERM and SIGINT set `stop` and wake the loop (a second one exits at once with 128 + the signal number);
    SIGUSR1 wakes the loop; SIGHUP asks `worker` to resume halted tables. Call it from the main thread: Python's
    `signal.signal` raises ValueError anywhere else."""
    def on_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # second signal: at once (safe: nothing is acknowledged early)
        stop.set()
        waker.wake()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: waker.wake())
    signal.signal(signal.SIGHUP, lambda signum, frame: (worker.resume_requested.set(), waker.wake()))
