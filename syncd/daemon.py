"""`syncd run`: the wiring. Build the daemon's parts from the configuration (the application's file, the
secondary, the metrics server, the wake-up sources, the reconciler, the worker) and drive the worker until a
signal.

Signals: SIGTERM/SIGINT stop claiming, let the request in flight finish within the shutdown timeout
(or abandon it: nothing unacknowledged is ever deleted, so that is safe) and exit 0; a second one exits
at once. SIGUSR1 wakes the loop; SIGHUP reloads the configuration and the secret files, rebuilds the
target and resumes halted tables.

Exit codes a supervisor can trust: 0 only when asked to stop (or `--once` done with every table shipping);
1 when `--once` ended with a table halted or a snapshot refused, or the database file is gone for good; 70 when the
drain loop died of an unexpected error (logged with its traceback; /healthz answers 503 meanwhile).

Only the command line imports this module.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Protocol

import apsw

from syncd import backoff, capture, logs, outbox
from syncd.config import Config, ConfigError
from syncd.logs import get_logger
from syncd.metrics import Metrics, serve
from syncd.observer import Observer
from syncd.priority import lower_priority
from syncd.reconcile import Reconciler
from syncd.source import Source
from syncd.sqlite import BUSY_TIMEOUT_MS
from syncd.target import PostgrestTarget, open_target, token_source
from syncd.wake import Waker
from syncd.watch import SourceGone, fault_problem
from syncd.worker import Worker

EXIT_HALTED = 1
EXIT_SOURCE_GONE = 1
EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error


def run(config: Config, *, once: bool = False, log_format: str = "json",
        reload: Callable[[], Config] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or, with `once`, until the outbox is empty); the exit code (see the
    module docstring). `reload` reads the configuration again (SIGHUP). Raises ConfigError, CaptureError or
    DatabaseNotFound before anything starts."""
    logs.configure(log_format)
    priority = lower_priority(config.worker.nice)  # before any thread starts: every thread inherits it
    log = get_logger()
    token_source(config)  # no credential: refused before anything starts
    if config.source.glob is not None:
        return run_fleet(config, once, reload, priority)
    source = Source(config.source.path)
    stop, reload_requested = threading.Event(), threading.Event()
    waker = Waker(source, config.source.path)
    install_signal_handlers(stop, waker, reload_requested)  # before anything answers: a probe may signal soon
    metrics = Metrics()
    metrics.health.alive_within = max(60.0, 5 * config.worker.poll_interval)
    observer = Observer(metrics, log)
    observer.yielding_cpu(config.worker.nice, *priority)
    try:
        server = serve(metrics, config.worker.metrics_addr)
    except OSError as exc:
        raise ConfigError("invalid configuration (1 problem):", [
            f"worker.metrics_addr: cannot listen on {config.worker.metrics_addr} ({exc.strerror}); "
            "choose another with --metrics-addr"]) from None
    installed = wait_while_busy(lambda: outbox.installed(source.conn), observer, stop)
    if installed and not stop.is_set():
        def configured() -> bool:
            source.configure()  # the state file: the lease lives there
            return True

        wait_while_busy(configured, observer, stop)
    if stop.is_set() or not installed:
        server.shutdown()
        if stop.is_set():
            return 0
        raise capture.CaptureError(f"syncd is not installed in {config.source.path}; run: syncd install")

    def target_for(settings: Config) -> PostgrestTarget:
        """The target for these settings; a renewed token is counted under the source table's name."""
        source_of = {table.target_name: table.name for table in settings.tables}
        return open_target(settings, on_renewed=lambda table, error: observer.token_renewed(
            source_of.get(table, table), error))

    worker = Worker(source, config, target_for(config), observer,
                    reload=None if reload is None else lambda: (settings := reload(), target_for(settings)))
    worker.settings.requested = reload_requested

    def current_settings() -> tuple[Config, PostgrestTarget]:
        """The worker's configuration and target as a SIGHUP left them (what a reconcile runs with)."""
        target = worker.target
        if not isinstance(target, PostgrestTarget):  # target_for builds every target this worker holds
            raise TypeError(f"the daemon's target is a {type(target).__name__}, not a PostgrestTarget")
        return worker.config, target

    worker.keeper.reconciler = reconciler = Reconciler(config.source.path, current_settings, observer)
    if not once:  # --once never sleeps between drains: nothing to wake
        waker.start()
    log.info("syncd started", database=str(config.source.path), target=config.target.url,
             tables=[t.name for t in config.tables], metrics=config.worker.metrics_addr, once=once,
             consistency=config.worker.consistency)
    if config.target.in_clear:
        log.warning(config.target.in_clear)
    if not once:
        reconciler.start(stop)
    outcome: list[int] = []
    thread = threading.Thread(target=drive, args=(worker, stop, waker, once, outcome), name="syncd-worker",
                              daemon=True)
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
    stop.set()
    waker.stop()
    server.shutdown()
    current_settings()[1].close()
    code = outcome[0] if outcome else 0
    if code == 0 and once and worker.halted:
        log.error("run --once ended with table(s) halted", tables=sorted(worker.halted),
                  reasons={t: h.reason for t, h in worker.halted.items()})
        code = EXIT_HALTED
    if code == 0 and once and worker.refused is not None:
        log.error("run --once ended with a snapshot the secondary refused", reason=worker.refused.error.message)
        code = EXIT_HALTED
    log.info("syncd stopped", exit_code=code)
    return code


def run_fleet(config: Config, once: bool, reload: Callable[[], Config] | None,
              priority: tuple[int, str | None]) -> int:
    """Multi-file mode (`source.glob`, `syncd.fleet`): the same signals, metrics server and exit codes."""
    from syncd.fleet import Fleet

    fleet = Fleet(config, once=once, reload=reload)
    install_signal_handlers(fleet.stop, fleet, fleet.reload_requested)
    Observer(fleet.metrics, fleet.log).yielding_cpu(config.worker.nice, *priority)
    try:
        server = serve(fleet.metrics, config.worker.metrics_addr)
    except OSError as exc:
        raise ConfigError("invalid configuration (1 problem):", [
            f"worker.metrics_addr: cannot listen on {config.worker.metrics_addr} ({exc.strerror}); "
            "choose another with --metrics-addr"]) from None
    if config.target.in_clear:
        fleet.log.warning(config.target.in_clear)
    code = fleet.run()
    if code < 0:
        fleet.log.warning("request in flight abandoned at shutdown; it will be shipped again at the next start")
        sys.stderr.flush()
        os._exit(0)
    server.shutdown()
    fleet.log.info("syncd stopped", exit_code=code)
    return code


def drive(worker: Worker, stop: threading.Event, waker: Waker, once: bool, outcome: list[int]) -> None:
    """The worker thread: run the loop; record the exit code of an end nobody asked for, and stop the process."""
    try:
        worker.run(stop, waker.wait, once)
        outcome.append(0)
    except SourceGone as exc:
        worker.observer.log.error("the database file is gone: stopping", reason=str(exc))
        outcome.append(EXIT_SOURCE_GONE)
    except BaseException as exc:  # a bug: say so loudly, and let the supervisor restart us
        worker.observer.died(exc)
        outcome.append(EXIT_SOFTWARE)
    finally:
        stop.set()


def wait_while_busy(read: Callable[[], bool], observer: Observer, stop: threading.Event) -> bool:
    """`read()` retried while the app holds the database locked (rollback-journal mode blocks readers too), until
    it answers or `stop` is set (then False); the loop stays alive for /healthz, and each wait shows in /readyz,
    the metrics and a warning."""
    started, failures = time.monotonic(), 0
    while not stop.is_set():
        observer.heartbeat()
        try:
            value = read()
        except apsw.BusyError as exc:
            failures += 1
            pause = backoff.delay(failures, base=0.5, cap=10.0, rand=lambda: 1.0)
            lasting = time.monotonic() - started + BUSY_TIMEOUT_MS / 1000
            observer.source_fault("busy", fault_problem("busy", exc, lasting) + " (at start)", lasting, pause)
            stop.wait(pause)
            continue
        observer.source_ok()
        return value
    return False


class Wakeable(Protocol):
    def wake(self) -> None: ...


def install_signal_handlers(stop: threading.Event, waker: Wakeable, reload_requested: threading.Event) -> None:
    """SIGTERM/SIGINT stop (a second one exits at once), SIGUSR1 wakes the loop, SIGHUP asks for a reload."""
    def on_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # second signal: at once (safe: nothing is acknowledged early)
        stop.set()
        waker.wake()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: waker.wake())
    def on_reload(signum: int, frame: FrameType | None) -> None:
        reload_requested.set()
        waker.wake()

    signal.signal(signal.SIGHUP, on_reload)
