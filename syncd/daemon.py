"""`syncd run`: build the daemon's parts from the configuration and drive the worker until a signal.

Signals: SIGTERM/SIGINT stop claiming, let the request in flight finish within the shutdown timeout
(or abandon it: nothing unacknowledged is ever deleted, so that is safe) and exit 0; a second one exits
at once. SIGUSR1 wakes the loop; SIGHUP resumes tables halted by a configuration error.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType

from syncd import capture, logs, sqlite
from syncd.auth import MintedTokens, StaticToken, TokenSource
from syncd.config import Config, ConfigError
from syncd.logs import get_logger
from syncd.metrics import Metrics, serve
from syncd.target import PostgrestTarget
from syncd.wake import Waker
from syncd.worker import Worker


def token_source(config: Config) -> TokenSource:
    """Mint short-lived service_role tokens when the JWT secret is known, else send the service key."""
    target = config.target
    if target.jwt_secret is not None:
        return MintedTokens(target.jwt_secret.get_secret_value())
    if target.service_key is not None:
        return StaticToken(target.service_key.get_secret_value())
    raise ConfigError("invalid configuration (1 problem):", [
        "target.service_key: missing; set SUPABASE_SERVICE_KEY (or service_key_file), or SUPABASE_JWT_SECRET "
        "so syncd mints its own service_role tokens"])


def open_target(config: Config, tokens: TokenSource | None = None) -> PostgrestTarget:
    """The PostgREST client every command that talks to the secondary uses, built from the configuration."""
    apikey = config.target.effective_apikey
    return PostgrestTarget(config.target.url, tokens or token_source(config), schema=config.target.schema_name,
                           apikey=apikey.get_secret_value() if apikey else None, timeout=config.worker.request_timeout)


def run(config: Config, *, once: bool = False, log_format: str = "json") -> int:
    logs.configure(log_format)
    log = get_logger()
    tokens = token_source(config)
    conn = sqlite.connect(config.source.path)
    if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
        # In WAL mode a lost acknowledgement (power cut before the WAL reaches the disk) only means entries
        # ship again, so syncd's own commits need no fsync (the app's durability stays the app's setting).
        # Outside WAL, NORMAL is not corruption-safe: keep SQLite's default there.
        conn.execute("PRAGMA synchronous = NORMAL")
    if not capture.owned_objects_exist(conn):
        raise capture.CaptureError(f"syncd is not installed in {config.source.path}; run: syncd install")
    target = open_target(config, tokens)
    metrics = Metrics()
    metrics.health.alive_within = max(60.0, 5 * config.worker.poll_interval)
    try:
        server = serve(metrics, config.worker.metrics_addr)
    except OSError as exc:
        raise ConfigError("invalid configuration (1 problem):", [
            f"worker.metrics_addr: cannot listen on {config.worker.metrics_addr} ({exc.strerror}); "
            "choose another with --metrics-addr"]) from None
    worker = Worker(conn, config, target, metrics, tokens)
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
    def on_stop(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os._exit(128 + signum)  # second signal: at once (safe: nothing is acknowledged early)
        stop.set()
        waker.wake()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: waker.wake())
    signal.signal(signal.SIGHUP, lambda signum, frame: (worker.resume_requested.set(), waker.wake()))
