"""A randomized soak of syncd: an app writes continuously while, cycle after cycle, `syncd run` is killed with -9,
the secondary has outages, tables are rebuilt by migrations, columns are added on both sides, the app's file is
restored from a backup in the four ways operators do, and another process holds the write lock for seconds.

Everything runs on this machine, loopback only, in a temporary work directory: a `syncd dev-server --faults` (or
the real PostgREST over the dev server's PostgreSQL, behind `syncd dev-server --upstream` for the same fault
API), an app SQLite file in WAL mode with three tables (`parent`; `tagged`, a composite TEXT key; `child`,
referencing parent ON DELETE CASCADE in SQLite, without cascade in PostgreSQL), `syncd run` as its own process,
and the app (benchmarks/soak_app.py) as its own processes. Every choice (which operations, their order, their
parameters, the app's writes) follows from `--seed`; timing varies.

After each cycle the app stops, `syncd run` is made to run, and the source is compared with PostgreSQL row for
row until they agree (or `--converge-timeout`): rows lost (in the file, missing or different in PostgreSQL) and
extra (in PostgreSQL only), the outbox, dead letters, `PRAGMA quick_check`, syncd's own exits (a crash is exit 70)
and stalls (pending changes, no progress for `--stall-seconds` with nothing of ours to explain it: silent when
/readyz answers 200 and `syncd status` reports nothing wrong). Exit 0 only when every cycle converged with none.

    python benchmarks/soak.py [--seed N] [--cycles 5] [--secondary dev-server|postgrest] [--postgrest PATH]
                              [--hold-connection] [--cycle-seconds S] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

import httpx
import psycopg

from syncd.devserver.launcher import RunningDevServer, launch

ROOT = Path(__file__).resolve().parents[1]
APP = Path(__file__).resolve().with_name("soak_app.py")
POSTGREST_VARIABLE = "SYNCD_TEST_POSTGREST"
OPERATIONS = ("kill", "outage", "migration", "column", "restore", "lock")
RESTORE_KINDS = ("app-stopped", "syncd-stopped", "backup-api", "copy-bytes")
OUTAGES = ("down", "reset", "error", "slow")
TABLES = ("parent", "tagged", "child")
KEYS = {"parent": ("id",), "tagged": ("a", "b"), "child": ("id",)}
LEASE_SECONDS = 5
RECHECK_SECONDS = 2
RESTART_SECONDS = 2  # the soak's supervisor starts a syncd that ended by itself again after this
SOURCE_SCHEMA = """
CREATE TABLE parent (id INTEGER PRIMARY KEY, v TEXT, n INTEGER);
CREATE TABLE tagged (a TEXT, b TEXT, v TEXT, PRIMARY KEY (a, b)){rowid};
CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER NOT NULL REFERENCES parent (id) ON DELETE CASCADE,
                    v TEXT);
"""
TARGET_SCHEMA = """
DROP TABLE IF EXISTS public.child, public.tagged, public.parent CASCADE;
CREATE TABLE public.parent (id bigint PRIMARY KEY, v text, n bigint);
CREATE TABLE public.tagged (a text, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE public.child (id bigint PRIMARY KEY, parent_id bigint NOT NULL REFERENCES public.parent (id), v text);
GRANT ALL ON public.parent, public.tagged, public.child TO service_role;
NOTIFY pgrst, 'reload schema';
"""
NORMAL_FAULTS = {"down": False, "error_rate": 0.0, "reset_rate": 0.0, "timeout_rate": 0.0, "delay_ms": 0}


# -- processes ---------------------------------------------------------------------------------------------------


class Processes:
    """Every process the soak started, stopped (SIGTERM, then SIGKILL) in the reverse order at the end."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, subprocess.Popen[Any], float]] = []
        self.lock = threading.Lock()

    def adopt(self, name: str, process: subprocess.Popen[Any], grace: float = 10) -> subprocess.Popen[Any]:
        """Register `process` (stopped with SIGTERM and `grace` seconds at the end)."""
        with self.lock:
            self.entries.append((name, process, grace))
        return process

    def spawn(self, name: str, argv: list[str], grace: float = 10, **popen: Any) -> subprocess.Popen[Any]:
        """Start `argv` in a session of its own (Ctrl-C reaches the soak only, which stops it) and register it."""
        return self.adopt(name, subprocess.Popen(argv, start_new_session=True, **popen), grace)

    def stop_all(self) -> None:
        """Stop whatever still runs, newest first."""
        with self.lock:
            entries, self.entries = list(reversed(self.entries)), []
        for _name, process, grace in entries:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


class Events:
    """soak-events.log in the work directory: what the soak did, with UTC times like syncd's log lines, to read
    beside syncd's logs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def __call__(self, text: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self.lock, self.path.open("a") as out:
            out.write(f"{stamp} {text}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_file(path: Path) -> IO[str]:
    return path.open("w")


# -- the secondary -----------------------------------------------------------------------------------------------


@dataclass
class Secondary:
    """Where syncd ships (`api_url`), where the fault API lives (`fault_root`), the PostgreSQL behind it and the
    service key."""

    kind: str
    api_url: str
    fault_root: str
    pg_url: str
    service_key: str


def start_secondary(kind: str, postgrest: str | None, work: Path, processes: Processes) -> Secondary:
    """The dev server with --faults; for "postgrest", the real PostgREST over its PostgreSQL (same JWT secret) and a
    `dev-server --upstream` in front of it for the fault API. The soak's tables exist and are served on return."""
    devserver = start_devserver(["--faults"], work / "devserver.log", processes)
    with psycopg.connect(devserver.pg_url, autocommit=True) as pg:
        pg.execute(TARGET_SCHEMA)
    if kind == "dev-server":
        secondary = Secondary(kind, devserver.url, devserver.root, devserver.pg_url, devserver.service_key)
    else:
        root = start_postgrest(postgrest or "", devserver, work / "postgrest.log", processes)
        proxy = start_devserver(["--upstream", root], work / "upstream.log", processes)
        secondary = Secondary(kind, proxy.url, proxy.root, devserver.pg_url, devserver.service_key)
    wait_until_served(secondary, TABLES)
    return secondary


def start_devserver(args: list[str], log: Path, processes: Processes) -> RunningDevServer:
    with log_file(log) as stderr:
        server = launch(["--host", "127.0.0.1", "--port", "0", *args], stderr=stderr, start_new_session=True,
                        cwd=ROOT)
    processes.adopt("syncd dev-server", server.process, grace=60)
    return server


def authenticator_uri(pg_url: str) -> str:
    """The dev server's admin URL with the user changed to `authenticator` (PostgREST's login role)."""
    parts = urllib.parse.urlsplit(pg_url)
    host = urllib.parse.parse_qs(parts.query).get("host", [""])[0]
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return f"postgres://authenticator@{netloc}{parts.path or '/postgres'}" + (f"?host={host}" if host else "")


def start_postgrest(binary: str, devserver: RunningDevServer, log: Path, processes: Processes) -> str:
    """Start PostgREST 12 over the dev server's PostgreSQL on a free loopback port; its root URL once it answers."""
    port = free_port()
    env = {"PATH": os.environ.get("PATH", ""), "PGRST_DB_URI": authenticator_uri(devserver.pg_url),
           "PGRST_DB_SCHEMAS": "public", "PGRST_DB_ANON_ROLE": "anon", "PGRST_JWT_SECRET": devserver.jwt_secret,
           "PGRST_SERVER_HOST": "127.0.0.1", "PGRST_SERVER_PORT": str(port), "PGRST_DB_CHANNEL_ENABLED": "true",
           "PGRST_LOG_LEVEL": "error"}
    with log.open("wb") as out:
        process = processes.spawn("postgrest", [binary], env=env, stdout=out, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"postgrest exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(root + "/", timeout=2).status_code == 200:
                return root
        time.sleep(0.2)
    raise RuntimeError(f"postgrest did not answer at {root} in 60 s")


def wait_until_served(secondary: Secondary, tables: tuple[str, ...], timeout: float = 60) -> None:
    """Wait until the secondary's schema cache serves `tables` as they are now: a fresh comment on each marks the
    reload (a table's name in the OpenAPI may come from an older reload still running)."""
    marker = f"soak {uuid.uuid4()}"
    with psycopg.connect(secondary.pg_url, autocommit=True) as pg:
        for table in tables:
            pg.execute(f"COMMENT ON TABLE public.{table} IS '{marker}'")
        pg.execute("NOTIFY pgrst, 'reload schema'")
    headers = {"Authorization": f"Bearer {secondary.service_key}"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            definitions = httpx.get(secondary.api_url + "/", headers=headers, timeout=5).json().get("definitions", {})
            if all(definitions.get(t, {}).get("description") == marker for t in tables):
                return
        time.sleep(0.2)
    raise RuntimeError(f"{secondary.api_url} does not serve {', '.join(tables)} after {timeout} s")


# -- the source --------------------------------------------------------------------------------------------------


def connect_source(db: Path, timeout: float = 30) -> sqlite3.Connection:
    """A connection of the soak's to the app's file, never creating it (a restore may be under way)."""
    return sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=rw", uri=True, timeout=timeout,
                           isolation_level=None)


def create_source(db: Path, without_rowid: bool) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SOURCE_SCHEMA.format(rowid=" WITHOUT ROWID" if without_rowid else ""))
    conn.close()


def seed_rows(db: Path, rng: random.Random) -> None:
    """The rows the app has when the soak starts (captured by the triggers: installed first)."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    with conn:
        conn.executemany("INSERT INTO parent VALUES (?, ?, ?)",
                         [(i, f"seed {i}", rng.randrange(1000)) for i in range(1, 61)])
        conn.executemany("INSERT INTO child VALUES (?, ?, ?)",
                         [(i, rng.randint(1, 60), f"child {i}") for i in range(1, 101)])
        conn.executemany("INSERT OR IGNORE INTO tagged VALUES (?, ?, ?)",
                         [(f"a{rng.randrange(8)}", f"b{rng.randrange(10)}", f"tag {i}") for i in range(40)])
    conn.close()


def write_config(path: Path, db: Path, metrics_port: int, consistency: str = "key") -> None:
    tables = "".join(f'\n[[table]]\nname = "{t}"\n' for t in TABLES)
    path.write_text(f'[source]\npath = "{db}"\n\n[worker]\nmetrics_addr = "127.0.0.1:{metrics_port}"\n'
                    f"poll_interval = 0.2\nmax_backoff = 2.0\nlease_seconds = {LEASE_SECONDS}\n"
                    f'schema_recheck_interval = {RECHECK_SECONDS}\nconsistency = "{consistency}"\n{tables}')


def syncd_env(secondary: Secondary) -> dict[str, str]:
    """The environment of every syncd command: the target through the environment, nothing inherited that could
    point syncd elsewhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNCD_", "SUPABASE_"))}
    return {**env, "SYNCD_TARGET_URL": secondary.api_url, "SUPABASE_SERVICE_KEY": secondary.service_key}


def remove_sidecars(db: Path) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def rebuild_table(db: Path, table: str) -> list[tuple[Any, ...]]:
    """SQLite's 12-step ALTER (lang_altertable.html#otheralter) from a connection of its own: foreign keys off, in
    one transaction create new_X as X is now, copy, drop X, rename, foreign_key_check; its findings."""
    conn = connect_source(db)
    try:
        conn.execute("PRAGMA foreign_keys=OFF")
        retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"))
        create = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()[0]
        columns = ", ".join(f'"{r[1]}"' for r in conn.execute(f"PRAGMA table_info({table})"))
        conn.execute(re.sub(rf'^CREATE TABLE\s+"?{table}"?', f"CREATE TABLE new_{table}", create, flags=re.I))
        conn.execute(f"INSERT INTO new_{table} ({columns}) SELECT {columns} FROM {table}")
        conn.execute(f"DROP TABLE {table}")
        conn.execute(f"ALTER TABLE new_{table} RENAME TO {table}")
        problems = conn.execute("PRAGMA foreign_key_check").fetchall()
        conn.execute("COMMIT")
        conn.execute("PRAGMA foreign_keys=ON")
        return problems
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


def retry_locked(action: Callable[[], Any], attempts: int = 5) -> Any:
    """`action()`, again while SQLite says the database is locked (past the busy timeout)."""
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.5)
    return None


# -- comparing ---------------------------------------------------------------------------------------------------


def normalize(value: object) -> object:
    """One spelling for a value read from either side: ints as ints, text as text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float | Decimal):
        return int(value) if value == int(value) else str(value)
    if isinstance(value, bytes | memoryview):
        return "\\x" + bytes(value).hex()
    return value


@dataclass
class Diff:
    """Source against secondary: keys lost (in the file, missing or different in PostgreSQL) and extra (only in
    PostgreSQL) per table, a few examples, the outbox's size, and columns of the file PostgreSQL lacks."""

    lost: dict[str, list[tuple[Any, ...]]]
    extra: dict[str, list[tuple[Any, ...]]]
    examples: list[str]
    outbox: int
    missing_columns: list[str]

    @property
    def clean(self) -> bool:
        return not any(self.lost.values()) and not any(self.extra.values())


def read_source(db: Path) -> tuple[dict[str, tuple[list[str], list[tuple[Any, ...]]]], int]:
    """Every table's columns and rows, and the outbox's size, in one read transaction of a fresh connection."""
    conn = connect_source(db)
    try:
        conn.execute("BEGIN")
        tables = {}
        for table in TABLES:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            quoted = ", ".join(f'"{c}"' for c in columns)
            tables[table] = (columns, conn.execute(f"SELECT {quoted} FROM {table}").fetchall())
        outbox = conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]
        conn.execute("COMMIT")
        return tables, outbox
    finally:
        conn.close()


def target_columns(pg: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in pg.execute("SELECT column_name FROM information_schema.columns WHERE table_schema = "
                                     "'public' AND table_name = %s", [table])]


def diff_table(table: str, columns: list[str], rows: list[tuple[Any, ...]], pg: psycopg.Connection,
               diff: Diff) -> None:
    """Compare one table on the columns both sides have (PostgreSQL keeps columns a restored file lacks)."""
    present = set(target_columns(pg, table))
    diff.missing_columns += [f"{table}.{c}" for c in columns if c not in present]
    shared = [c for c in columns if c in present]
    index = [columns.index(c) for c in shared]
    keys = [shared.index(k) for k in KEYS[table]]
    source = {}
    for row in rows:
        values = tuple(normalize(row[i]) for i in index)
        source[tuple(values[k] for k in keys)] = values
    quoted = ", ".join(f'"{c}"' for c in shared)
    target = {}
    for row in pg.execute(f"SELECT {quoted} FROM public.{table}"):
        values = tuple(normalize(v) for v in row)
        target[tuple(values[k] for k in keys)] = values
    diff.lost[table] = sorted((k for k in source if target.get(k) != source[k]), key=repr)
    diff.extra[table] = sorted((k for k in target if k not in source), key=repr)
    for key in diff.lost[table][:3]:
        there = target.get(key)
        theirs = "missing" if there is None else repr(dict(zip(shared, there, strict=True)))[:200]
        diff.examples.append(f"{table} {key!r}: file {dict(zip(shared, source[key], strict=True))!r:.200} / "
                             f"secondary {theirs}")
    for key in diff.extra[table][:3]:
        diff.examples.append(f"{table} {key!r}: not in the file / secondary {target[key]!r:.200}")


# -- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One thing a cycle does, after waiting `gap` seconds."""

    op: str
    gap: float
    params: dict[str, Any]


def span(rng: random.Random, low: float, high: float, scale: float) -> float:
    """A duration between `low` and `high` seconds, scaled to a short cycle, never under one second."""
    return round(max(1.0, rng.uniform(low, high) * scale), 1)


def draw_params(op: str, rng: random.Random, number: int, scale: float,
                restore_kinds: Sequence[str] = RESTORE_KINDS) -> dict[str, Any]:
    """The parameters of one operation, drawn from the cycle's RNG."""
    if op == "kill":
        return {"after": round(rng.uniform(0, 2) * scale, 1),
                "restart_after": 0.0 if rng.random() < 0.5 else span(rng, 2, 6, scale)}
    if op == "outage":
        return {"mode": rng.choice(OUTAGES), "seconds": span(rng, 3, 8, scale), "rate": round(rng.uniform(0.3, 0.9), 2),
                "delay_ms": rng.randint(200, 1500), "seed": rng.randrange(10**6), "background": rng.random() < 0.4}
    if op == "migration":
        return {"table": rng.choice(TABLES)}
    if op == "column":
        return {"table": rng.choice(TABLES), "name": f"x{number:02d}", "type": rng.choice(("TEXT", "INTEGER")),
                "default": rng.random() < 0.5, "sqlite_first": rng.random() < 0.5, "lag": span(rng, 2, 5, scale)}
    if op == "restore":
        return {"kind": rng.choice(restore_kinds), "pick": rng.random(), "kill": rng.random() < 0.5,
                "syncd_first": rng.random() < 0.5, "pause": round(rng.uniform(0, 3) * scale, 1)}
    if op == "lock":
        return {"seconds": span(rng, 2, 8, scale), "background": rng.random() < 0.4}
    return {}


def choices(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated subset of `allowed`."""
    def parse(text: str) -> tuple[str, ...]:
        chosen = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [part for part in chosen if part not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(allowed)} (got {text!r})")
        return chosen
    return parse


def plan_cycle(seed: int, number: int, cycle_seconds: float | None, operations: Sequence[str] = OPERATIONS,
               restore_kinds: Sequence[str] = RESTORE_KINDS) -> tuple[float, list[Step]]:
    """How long the app writes in cycle `number`, and its steps: a random subset of the operations in a random order
    (at least one), with one or two backups among them. The same seed gives the same plan. `operations` and
    `restore_kinds` narrow the draw (--only, --restore-kinds: to repeat one combination of faults many times)."""
    rng = random.Random(f"syncd-soak:{seed}:{number}")
    seconds = cycle_seconds if cycle_seconds is not None else round(rng.uniform(6, 10), 1)
    scale = min(1.0, seconds / 8)
    ops = [op for op in operations if rng.random() < 0.5] or [rng.choice(operations)]
    rng.shuffle(ops)
    steps = [Step(op, 0.0, draw_params(op, rng, number, scale, restore_kinds)) for op in ops]
    for _ in range(rng.randint(1, 2)):
        steps.insert(rng.randint(0, len(steps)), Step("backup", 0.0, {}))
    for step in steps:
        step.gap = round(rng.uniform(0.2, 1.2) * scale, 1)
    return seconds, steps


def describe(step: Step) -> str:
    """A step in a few words, for the plan and the summary."""
    p = step.params
    bg = ", in the background" if p.get("background") else ""
    if step.op == "kill":
        restart = "at once" if not p["restart_after"] else f"after {p['restart_after']} s"
        return f"kill -9 (+{p['after']} s, restart {restart})"
    if step.op == "outage":
        what = {"down": "down", "reset": f"reset_rate {p['rate']}", "error": f"error_rate {p['rate']} (503)",
                "slow": f"delay_ms {p['delay_ms']}"}[p["mode"]]
        return f"outage ({what}, {p['seconds']} s{bg})"
    if step.op == "migration":
        return f"migration (12-step rebuild of {p['table']})"
    if step.op == "column":
        order = f"SQLite first, PostgreSQL {p['lag']} s later" if p["sqlite_first"] else "PostgreSQL first"
        return f"column ({p['table']}.{p['name']} {p['type']}{' DEFAULT' if p['default'] else ''}, {order})"
    if step.op == "restore":
        stop = "killed" if p["kill"] else "SIGTERM"
        how = {"app-stopped": "rename, app stopped", "syncd-stopped": f"rename, syncd {stop}, app stopped",
               "backup-api": "backup API into the live file",
               "copy-bytes": f"bytes copied in place, app stopped, syncd {stop}"}
        return f"restore {p['kind']} ({how[p['kind']]})"
    if step.op == "lock":
        return f"lock ({p['seconds']} s{bg})"
    return step.op


# -- records -----------------------------------------------------------------------------------------------------


@dataclass
class CycleRecord:
    """What one cycle did and what it found."""

    number: int
    seconds: float
    plan: list[str]
    done: list[str] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    writes: int = 0
    app: Counter[str] = field(default_factory=Counter)
    app_errors: Counter[str] = field(default_factory=Counter)
    converged: bool = False
    converge_seconds: float = 0.0
    lost: int = 0
    extra: int = 0
    new_lost: int = 0
    new_extra: int = 0
    lost_by_table: dict[str, int] = field(default_factory=dict)
    extra_by_table: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    missing_columns: list[str] = field(default_factory=list)
    outbox: int | None = None
    dead_letters: int = 0
    dead_examples: list[str] = field(default_factory=list)
    quick_check: str = ""
    exits: list[dict[str, Any]] = field(default_factory=list)
    silent_stalls: int = 0
    explained_stalls: int = 0
    stalls: list[dict[str, Any]] = field(default_factory=list)
    soak_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """For --json (dataclasses.asdict would rebuild each Counter from its items, as counts of pairs)."""
        return {f.name: dict(v) if isinstance(v, Counter) else v
                for f in fields(self) for v in [getattr(self, f.name)]}

    @property
    def failed(self) -> bool:
        return bool(not self.converged or self.lost or self.extra or self.dead_letters or self.quick_check != "ok"
                    or self.exits or self.silent_stalls or self.soak_errors)

    def line(self) -> str:
        """One line of the summary."""
        exits = ", ".join(f"exit {e['code']}" for e in self.exits) or "none"
        state = f"converged in {self.converge_seconds} s" if self.converged else \
            f"NOT converged after {self.converge_seconds} s"
        check = self.quick_check if self.quick_check in ("ok", "") else "FAILED"
        return (f"cycle {self.number}: {' > '.join(self.done) or '-'} | {self.writes} writes in {self.seconds} s | "
                f"{state} | lost {self.lost} (new {self.new_lost}) extra {self.extra} (new {self.new_extra}) "
                f"outbox {self.outbox} dead {self.dead_letters} quick_check {check} | syncd exits {exits} | stalls "
                f"{self.silent_stalls} silent, {self.explained_stalls} explained"
                + (f" | soak errors {len(self.soak_errors)}" if self.soak_errors else ""))

    def details(self) -> list[str]:
        """The lines under a failed cycle: what was lost, how syncd ended, the stalls."""
        out = []
        if self.lost or self.extra:
            out.append(f"lost by table {self.lost_by_table}, extra by table {self.extra_by_table}")
        out += self.examples
        out += [f"columns of the file missing in PostgreSQL: {', '.join(self.missing_columns)}"] \
            if self.missing_columns else []
        out += [f"dead letter: {d}" for d in self.dead_examples]
        out += [f"syncd exit {e['code']} ({e['log']}, during {e['during']}): {e['error']}" for e in self.exits]
        out += [stall_line(s) for s in self.stalls]
        out += [f"soak error: {e}" for e in self.soak_errors]
        out += [f"app error (not a failure of syncd): {e} x{n}" for e, n in self.app_errors.items()]
        if self.quick_check != "ok":
            out.append(f"quick_check: {self.quick_check}")
        return out


def stall_line(stall: dict[str, Any]) -> str:
    kind = "SILENT stall" if stall["silent"] else "explained stall"
    return (f"{kind} at +{stall['at']} s ({stall['phase']}, after {stall['after']}): {stall['outbox']} outbox "
            f"entries, no progress for {stall['quiet']} s; /readyz {stall['readyz']}; status {stall['status']}")


# -- syncd run and the app ---------------------------------------------------------------------------------------


def last_error(log: Path | None) -> str:
    """The last exception (or error) syncd logged in `log`, in one line."""
    if log is None or not log.exists():
        return ""
    found = ""
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("exception"):
            found = f"{entry.get('event')}: {str(entry['exception']).strip().splitlines()[-1]}"
        elif entry.get("level") in ("error", "critical"):
            found = str(entry.get("event"))
    return found[:400]


class Daemon:
    """`syncd run` kept running as a supervisor would: started, killed and stopped by the soak; an exit the soak did
    not cause (or a non-zero exit after SIGTERM) is reported to `on_exit` and, unless held stopped, it is started
    again."""

    def __init__(self, work: Path, config: Path, env: dict[str, str], processes: Processes,
                 on_exit: Callable[[int | str, Path | None], None], event: Callable[[str], None]) -> None:
        self.work, self.config, self.env, self.processes, self.on_exit = work, config, env, processes, on_exit
        self.event = event
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.runs = 0
        self.held = True  # stopped on purpose (nothing started yet)
        self.started_at = 0.0
        self.lock = threading.RLock()

    def start(self) -> None:
        """Start `syncd run` unless it runs; its stderr goes to syncd-run-NN.log in the work directory."""
        with self.lock:
            self.held = False
            self.reap()
            if self.proc is not None:
                return
            self.runs += 1
            self.log = self.work / f"syncd-run-{self.runs:02d}.log"
            with log_file(self.log) as err:
                self.proc = self.processes.spawn(
                    "syncd run", [sys.executable, "-m", "syncd", "run", "--config", str(self.config)], cwd=ROOT,
                    env=self.env, stdout=subprocess.DEVNULL, stderr=err)
            self.started_at = time.monotonic()
            self.event(f"syncd run started (pid {self.proc.pid}, {self.log.name})")

    def reap(self) -> None:
        """Report an exit the soak did not cause."""
        if self.proc is not None and self.proc.poll() is not None:
            code, self.proc = self.proc.returncode, None
            self.event(f"syncd run ended by itself: exit {code}")
            self.on_exit(code, self.log)

    def kill(self) -> None:
        """kill -9, and keep it stopped until `start`."""
        with self.lock:
            self.held = True
            self.reap()
            if self.proc is not None:
                self.proc.kill()
                self.proc.wait()
                self.event(f"syncd run killed with -9 (pid {self.proc.pid})")
                self.proc = None

    def terminate(self, timeout: float = 30) -> None:
        """SIGTERM (which must end in exit 0 within `timeout`), and keep it stopped until `start`."""
        with self.lock:
            self.held = True
            self.reap()
            if self.proc is None:
                return
            self.proc.send_signal(signal.SIGTERM)
            code: int | str
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = f"none: still running {timeout:.0f} s after SIGTERM"
            self.event(f"syncd run stopped by SIGTERM (pid {self.proc.pid}): exit {code}")
            self.proc = None
            if code == -signal.SIGTERM and not self.started_up():
                # Still starting (Python importing syncd, before its handlers exist): SIGTERM's default action ends
                # it, as systemd counts a clean stop; nothing was claimed yet.
                return
            if code != 0:
                self.on_exit(code, self.log)

    def started_up(self) -> bool:
        """Whether the current run has logged `syncd started` (its signal handlers are installed by then)."""
        return self.log is not None and self.log.exists() and '"syncd started"' in self.log.read_text()

    def supervise(self) -> None:
        """Called every second: an unexpected exit is reported, and syncd started again (as systemd would, at most
        every few seconds)."""
        with self.lock:
            if self.held:
                return
            self.reap()
            if self.proc is None and time.monotonic() - self.started_at > RESTART_SECONDS:
                self.start()

    def stopped(self) -> bool:
        return self.held or self.proc is None


class AppWriter:
    """The app's writer process (soak_app.py write), one per cycle; restarted when it dies by itself."""

    def __init__(self, work: Path, db: Path, seed: int, processes: Processes,
                 on_report: Callable[[dict[str, Any]], None]) -> None:
        self.work, self.db, self.seed, self.processes, self.on_report = work, db, seed, processes, on_report
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.cycle = 0
        self.lock = threading.RLock()

    def start(self, cycle: int | None = None) -> None:
        with self.lock:
            if self.proc is not None:
                return
            self.cycle = self.cycle if cycle is None else cycle
            self.starts += 1
            with log_file(self.work / f"app-{self.starts:03d}.log") as err:
                self.proc = self.processes.spawn(
                    "app writer", [sys.executable, str(APP), "write", "--db", str(self.db), "--seed",
                                   f"{self.seed}:{self.cycle}:{self.starts}"],
                    stdout=subprocess.PIPE, stderr=err, text=True)

    def stop(self) -> None:
        """SIGTERM; it ends its transaction and reports its counts."""
        with self.lock:
            if self.proc is None:
                return
            proc, self.proc = self.proc, None
            proc.send_signal(signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
            self.report(proc.returncode, out)

    def report(self, code: int, out: str) -> None:
        if code == -signal.SIGTERM:
            return  # stopped while Python was starting, before its handler was set: it wrote nothing
        lines = out.strip().splitlines()
        try:
            counts = json.loads(lines[-1]) if code == 0 and lines else {}
        except ValueError:
            counts = {}
        if not counts:
            counts = {"errors": {f"the app writer ended with exit {code} (see app-{self.starts:03d}.log)": 1}}
        self.on_report(counts)

    def supervise(self) -> None:
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None:
                proc, self.proc = self.proc, None
                self.report(-1, proc.communicate()[0])
                self.start()


class Holder:
    """The process that keeps an app connection open all along (soak_app.py hold), reading now and then."""

    def __init__(self, work: Path, db: Path, seed: int, processes: Processes) -> None:
        self.work, self.db, self.seed, self.processes = work, db, seed, processes
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0
        self.counts: Counter[str] = Counter()
        self.lock = threading.RLock()

    def start(self) -> None:
        with self.lock:
            self.starts += 1
            with log_file(self.work / f"holder-{self.starts:02d}.log") as err:
                self.proc = self.processes.spawn(
                    "connection holder", [sys.executable, str(APP), "hold", "--db", str(self.db), "--seed",
                                          f"{self.seed}:{self.starts}"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)

    def command(self, word: str, timeout: float = 60) -> str:
        """Send `word` and return its answer line."""
        with self.lock:
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(word + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            return self.proc.stdout.readline().strip() if ready else ""

    def stop(self) -> None:
        """Ask it to quit; its counts (reads, reopened, errors) go to `counts`."""
        with self.lock:
            if self.proc is None:
                return
            proc, self.proc = self.proc, None
            try:
                out, _ = proc.communicate("quit\n", timeout=30)
                self.counts.update(json.loads(out.strip().splitlines()[-1]))
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                proc.kill()
                proc.wait()

    def supervise(self) -> Counter[str] | None:
        """A holder that died is started again; its end is returned to be noted."""
        with self.lock:
            if self.proc is not None and self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                self.start()
                return Counter({f"the connection holder ended with exit {code}": 1})
        return None


# -- the monitor -------------------------------------------------------------------------------------------------


class Monitor(threading.Thread):
    """Every second: supervise the processes, and look for progress (the outbox shrinking, PostgreSQL changing, or
    nothing pending). Pending changes with no progress for `stall_seconds`, with the secondary up and no operation of
    the soak to explain it, is a stall; the soak then asks /readyz and `syncd status` whether syncd knows."""

    def __init__(self, soak: Soak) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.soak = soak
        self.halt = threading.Event()
        self.last_outbox: int | None = None
        self.last_fingerprint: str | None = None
        self.last_progress = time.monotonic()
        self.stalled = False

    def run(self) -> None:
        pg: psycopg.Connection | None = None
        while not self.halt.wait(1.0):
            try:
                self.soak.supervise()
                if pg is None:
                    pg = psycopg.connect(self.soak.secondary.pg_url, autocommit=True)
                self.tick(pg)
            except Exception as exc:
                self.soak.note(f"monitor: {type(exc).__name__}: {exc}")
                if pg is not None:
                    with contextlib.suppress(Exception):
                        pg.close()
                pg = None

    def tick(self, pg: psycopg.Connection) -> None:
        outbox = self.soak.outbox_count()
        fingerprint = target_fingerprint(pg)
        now = time.monotonic()
        progress = (outbox == 0 or (None not in (outbox, self.last_outbox) and outbox < self.last_outbox)
                    or (self.last_fingerprint is not None and fingerprint != self.last_fingerprint))
        if outbox is not None:
            self.last_outbox = outbox
        self.last_fingerprint = fingerprint
        if progress:
            self.last_progress, self.stalled = now, False
            return
        active, ended = self.soak.excuses()
        if active or not outbox:
            return
        quiet = now - max(self.last_progress, ended)
        if quiet > self.soak.args.stall_seconds and not self.stalled:
            self.stalled = True
            self.soak.diagnose_stall(outbox, round(quiet))


def target_fingerprint(pg: psycopg.Connection) -> str:
    """Changes whenever any row of the secondary's tables does."""
    parts = [f"(SELECT count(*) || ':' || coalesce(sum(hashtextextended(t::text, 0)), 0) FROM public.{table} t)"
             for table in TABLES]
    return str(pg.execute("SELECT " + " || '/' || ".join(parts)).fetchone()[0])


# -- the soak ----------------------------------------------------------------------------------------------------


@dataclass
class Backup:
    name: str
    path: Path
    cycle: int


class Soak:
    """The app's file, syncd, the app and the secondary, and the operations of a cycle."""

    def __init__(self, args: argparse.Namespace, seed: int, work: Path, secondary: Secondary,
                 processes: Processes) -> None:
        self.args, self.seed, self.work, self.secondary, self.processes = args, seed, work, secondary, processes
        self.rng = random.Random(f"syncd-soak:{seed}:setup")
        self.without_rowid = self.rng.random() < 0.5
        self.db = work / "app.sqlite3"
        self.config = work / "syncd.toml"
        self.metrics_port = free_port()
        self.env = syncd_env(secondary)
        self.file_lock = threading.Lock()  # the soak's own use of the app's file, against its file operations
        self.state_lock = threading.RLock()
        self.active: Counter[str] = Counter()
        self.excuse_ended = 0.0
        self.setup_record = CycleRecord(0, 0, ["setup"])
        self.record = self.setup_record  # the cycle under way, which the monitor's findings go to
        self.cycles: list[CycleRecord] = []
        self.setup_notes: list[str] = []
        self.cycle_started = time.monotonic()
        self.phase = "setup"
        self.last_step = "setup"
        self.backups: list[Backup] = []
        self.background: list[tuple[str, threading.Thread]] = []
        self.previous_lost: set[tuple[str, tuple[Any, ...]]] = set()
        self.previous_extra: set[tuple[str, tuple[Any, ...]]] = set()
        self.dead_seen: set[tuple[Any, ...]] = set()
        self.notes_seen: set[str] = set()
        self.event = Events(work / "soak-events.log")
        self.daemon = Daemon(work, self.config, self.env, processes, self.syncd_exited, self.event)
        self.writer = AppWriter(work, self.db, seed, processes, self.app_reported)
        self.holder = Holder(work, self.db, seed, processes) if args.hold_connection else None
        self.monitor = Monitor(self)

    # -- setting up, shutting down --------------------------------------------------------------------------------

    def setup(self) -> None:
        """The app's file, syncd installed in it, the first rows, a first backup, syncd running and converged."""
        create_source(self.db, self.without_rowid)
        write_config(self.config, self.db, self.metrics_port, self.args.consistency)
        installed = self.syncd("install")
        if installed.returncode != 0:
            raise RuntimeError(f"syncd install failed: {installed.stderr.strip()}")
        seed_rows(self.db, self.rng)
        self.take_backup({})
        if self.holder:
            self.holder.start()
        self.daemon.start()
        self.monitor.start()
        self.converge(self.setup_record)
        if not self.setup_record.converged:
            self.setup_notes.append(f"the first rows did not converge in {self.setup_record.converge_seconds} s: "
                                    f"lost {self.setup_record.lost}, extra {self.setup_record.extra}, outbox "
                                    f"{self.setup_record.outbox}")

    def shutdown(self) -> None:
        """Stop the monitor, the app and syncd (everything else: Processes.stop_all)."""
        self.monitor.halt.set()
        if self.monitor.is_alive():
            self.monitor.join(timeout=30)
        for _, thread in self.background:
            thread.join(timeout=1)
        with contextlib.suppress(Exception):
            self.writer.stop()
        if self.holder:
            with contextlib.suppress(Exception):
                self.holder.stop()
        with contextlib.suppress(Exception):
            self.daemon.kill()

    def syncd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "syncd", *args, "--config", str(self.config)], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    # -- what happens in the background -------------------------------------------------------------------------

    def supervise(self) -> None:
        self.daemon.supervise()
        self.writer.supervise()
        if self.holder:
            ended = self.holder.supervise()
            if ended:
                with self.state_lock:
                    self.record.app_errors.update(ended)

    def syncd_exited(self, code: int | str, log: Path | None) -> None:
        """syncd ended without being asked to (or did not exit 0 after SIGTERM)."""
        exit_ = {"code": code, "log": log.name if log else "", "error": last_error(log), "during": self.last_step,
                 "at": round(time.monotonic() - self.cycle_started, 1)}
        with self.state_lock:
            self.record.exits.append(exit_)
        print(f"  ! cycle {self.record.number}: syncd run ended by itself with exit {code} during {self.last_step}: "
              f"{exit_['error']}", flush=True)

    def app_reported(self, counts: dict[str, Any]) -> None:
        with self.state_lock:
            self.record.writes += int(counts.pop("commits", 0))
            counts.pop("by_action", None)
            self.record.app_errors.update(counts.pop("errors", {}))
            self.record.app.update({k: v for k, v in counts.items() if isinstance(v, int)})

    def note(self, text: str) -> None:
        with self.state_lock:
            if text not in self.notes_seen:
                self.notes_seen.add(text)
                self.record.notes.append(text)

    @contextlib.contextmanager
    def excused(self, why: str) -> Iterator[None]:
        """An operation of the soak that explains a pause of syncd's progress while it lasts."""
        self.begin_excuse(why)
        try:
            yield
        finally:
            self.end_excuse(why)

    def begin_excuse(self, why: str) -> None:
        with self.state_lock:
            self.active[why] += 1

    def end_excuse(self, why: str) -> None:
        with self.state_lock:
            self.active[why] -= 1
            self.excuse_ended = time.monotonic()

    def excuses(self) -> tuple[list[str], float]:
        """(operations of the soak under way that explain a pause, when the last one ended)."""
        with self.state_lock:
            active = [why for why, n in self.active.items() if n > 0]
        if self.daemon.stopped():
            active.append("syncd stopped")
        return active, max(self.excuse_ended, self.daemon.started_at)

    def outbox_count(self) -> int | None:
        """Entries in the app file's outbox now (None when it cannot be read at the moment)."""
        with self.file_lock:
            try:
                conn = connect_source(self.db, timeout=5)
            except sqlite3.Error:
                return None
            try:
                return conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]
            except sqlite3.Error:
                return None
            finally:
                conn.close()

    def diagnose_stall(self, outbox: int, quiet: float) -> None:
        """Does syncd know it is stuck? Silent when /readyz answers 200 and `syncd status` reports nothing wrong."""
        readyz = self.readyz()
        status = self.status()
        silent = readyz.startswith("200") and status.startswith("healthy")
        stall = {"at": round(time.monotonic() - self.cycle_started, 1), "phase": self.phase, "after": self.last_step,
                 "outbox": outbox, "quiet": quiet, "readyz": readyz, "status": status, "silent": silent}
        with self.state_lock:
            self.record.stalls.append(stall)
            if silent:
                self.record.silent_stalls += 1
            else:
                self.record.explained_stalls += 1
        print(f"  ! cycle {self.record.number}: {stall_line(stall)}", flush=True)

    def readyz(self) -> str:
        try:
            answer = httpx.get(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=3)
        except httpx.HTTPError as exc:
            return f"unreachable ({type(exc).__name__})"
        return f"{answer.status_code} {answer.text.strip()[:300]}"

    def status(self) -> str:
        try:
            answer = self.syncd("status", "--json", timeout=60)
            report = json.loads(answer.stdout)
        except (subprocess.TimeoutExpired, ValueError) as exc:
            return f"unreadable ({type(exc).__name__})"
        problems = list(report.get("problems", []))
        problems += [f"{t['name']}: {p}" for t in report.get("tables", []) for p in t.get("problems", [])]
        pending = sum(int(t.get("pending") or 0) for t in report.get("tables", []))
        head = "healthy" if report.get("healthy") else "unhealthy"
        listed = ": " + "; ".join(problems) if problems else ""
        return f"{head} (exit {answer.returncode}, pending {pending}){listed}"[:600]

    # -- a cycle -------------------------------------------------------------------------------------------------

    def run_cycle(self, number: int) -> CycleRecord:
        """The app writes while the cycle's steps run; then the app stops and the secondary must converge."""
        seconds, steps = plan_cycle(self.seed, number, self.args.cycle_seconds, self.args.only,
                                    self.args.restore_kinds)
        with self.state_lock:
            self.record = CycleRecord(number, seconds, [describe(s) for s in steps])
            self.cycle_started, self.phase = time.monotonic(), "writing"
        record = self.record
        print(f"cycle {number} plan: {' > '.join(record.plan)}", flush=True)
        self.event(f"cycle {number} begins; the app writes")
        self.writer.start(number)
        for step in steps:
            time.sleep(step.gap)
            self.run_step(step)
        time.sleep(max(0.0, self.cycle_started + seconds - time.monotonic()))
        self.join_background()
        self.writer.stop()
        self.put_faults(NORMAL_FAULTS)
        if self.holder and self.holder.proc is not None:
            self.holder.command("open")
        self.phase, self.last_step = "converging", "the cycle's end"
        self.event(f"cycle {number}: the app stopped; waiting for the secondary to converge")
        self.daemon.start()
        self.converge(record)
        self.inspect(record)
        self.phase = "between cycles"
        self.event(f"cycle {number} ends: {'converged' if record.converged else 'NOT converged'}")
        self.cycles.append(record)
        print(record.line(), flush=True)
        for line in record.details() if record.failed else []:
            print(f"    {line}", flush=True)
        return record

    def run_step(self, step: Step) -> None:
        """One step; a failure of the soak's own doing is recorded, never the end of the soak."""
        self.last_step = describe(step)
        self.event(f"cycle {self.record.number}: {self.last_step}: begins")
        try:
            done = getattr(self, f"op_{step.op}")(step.params)
            self.record.done.append(done or describe(step))
            self.event(f"cycle {self.record.number}: {done or self.last_step}: done")
        except Exception as exc:
            self.record.done.append(f"{describe(step)} FAILED")
            self.record.soak_errors.append(f"{describe(step)}: {type(exc).__name__}: {exc}")
            with (self.work / "soak-errors.log").open("a") as out:
                out.write(f"cycle {self.record.number}, {describe(step)}:\n{traceback.format_exc()}\n")
            self.writer.start()

    def in_background(self, kind: str, work: Callable[[], None]) -> None:
        """Run a step (an outage, a lock) on a thread while the next steps go on."""
        def guarded() -> None:
            try:
                work()
            except Exception as exc:
                self.record.soak_errors.append(f"{kind} in the background: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=guarded, name=f"soak-{kind}", daemon=True)
        self.background.append((kind, thread))
        thread.start()

    def finish_excused(self, why: str, work: Callable[[], None], *, background: bool) -> None:
        """Run the rest of a step that began the excuse `why` (`work`), now or on a thread (`background`), and end
        the excuse when it is done, however it ends."""
        def step() -> None:
            try:
                work()
            finally:
                self.end_excuse(why)

        if background:
            self.in_background(why, step)
        else:
            step()

    def join_background(self, kind: str | None = None) -> None:
        """Wait for the steps running in the background (of `kind` only, when given)."""
        for name, thread in list(self.background):
            if kind is None or name == kind:
                thread.join()
                self.background.remove((name, thread))

    def converge(self, record: CycleRecord) -> None:
        """Poll until the secondary equals the file at the path and the outbox is empty, or the timeout; record the
        last comparison."""
        started = time.monotonic()
        deadline = started + self.args.converge_timeout
        with psycopg.connect(self.secondary.pg_url, autocommit=True) as pg:
            while True:
                diff = self.compare(pg)
                if diff is not None and diff.clean and diff.outbox == 0:
                    break
                if time.monotonic() >= deadline:
                    break
                time.sleep(1)
        record.converge_seconds = round(time.monotonic() - started, 1)
        if diff is None:
            record.soak_errors.append("the app's file could not be read at the end of the cycle")
            return
        record.converged = diff.clean and diff.outbox == 0
        self.record_diff(record, diff)

    def record_diff(self, record: CycleRecord, diff: Diff) -> None:
        lost = {(t, k) for t, keys in diff.lost.items() for k in keys}
        extra = {(t, k) for t, keys in diff.extra.items() for k in keys}
        record.lost, record.extra = len(lost), len(extra)
        record.new_lost, record.new_extra = len(lost - self.previous_lost), len(extra - self.previous_extra)
        self.previous_lost, self.previous_extra = lost, extra
        record.lost_by_table = {t: len(v) for t, v in diff.lost.items() if v}
        record.extra_by_table = {t: len(v) for t, v in diff.extra.items() if v}
        record.examples, record.outbox, record.missing_columns = diff.examples, diff.outbox, diff.missing_columns

    def compare(self, pg: psycopg.Connection) -> Diff | None:
        with self.file_lock:
            try:
                tables, outbox = read_source(self.db)
            except sqlite3.Error as exc:
                self.note(f"reading the app's file: {exc}")
                return None
        diff = Diff({}, {}, [], outbox, [])
        for table, (columns, rows) in tables.items():
            diff_table(table, columns, rows, pg, diff)
        return diff

    def inspect(self, record: CycleRecord) -> None:
        """Dead letters and PRAGMA quick_check of the app's file."""
        with self.file_lock:
            conn = connect_source(self.db)
            try:
                dead = conn.execute("SELECT tbl, key, op, status, code, message, attempts FROM _syncd_dead_letter "
                                    "ORDER BY id").fetchall()
                record.quick_check = "; ".join(r[0] for r in conn.execute("PRAGMA quick_check"))[:500]
            finally:
                conn.close()
        record.dead_letters = len(dead)
        record.dead_examples = [f"{t} key {k} op {o}: {s} {c} {m[:200]} ({a} attempts)" for t, k, o, s, c, m, a
                                in dead[:5]]
        self.dead_seen.update((t, k, o, c) for t, k, o, _s, c, _m, _a in dead)

    # -- the operations ------------------------------------------------------------------------------------------

    def op_backup(self, params: dict[str, Any]) -> str:
        return self.take_backup(params)

    def take_backup(self, params: dict[str, Any]) -> str:
        """A copy of the app's file through the backup API (as `sqlite3 .backup` makes it)."""
        number = len(self.backups)
        name = f"b{number:02d}"
        path = self.work / "backups" / f"{name}-cycle{self.record.number}.sqlite3"
        path.parent.mkdir(exist_ok=True)
        with self.file_lock:
            source = connect_source(self.db)
            target = sqlite3.connect(path)
            try:
                source.backup(target)
            finally:
                target.close()
                source.close()
        self.backups.append(Backup(name, path, self.record.number))
        self.record.ops["backups"] += 1
        return f"backup {name}"

    def op_kill(self, params: dict[str, Any]) -> None:
        time.sleep(params["after"])
        with self.excused("kill"):
            self.daemon.kill()
            self.record.ops["kills"] += 1
            time.sleep(params["restart_after"])
            self.daemon.start()

    def op_outage(self, params: dict[str, Any]) -> None:
        """The secondary unavailable (or slow) for a while through the fault API, then back to normal."""
        settings: dict[str, Any] = {"down": {"down": True, "retry_after": 1},
                                    "reset": {"reset_rate": params["rate"]},
                                    "error": {"error_rate": params["rate"], "error_status": 503},
                                    "slow": {"delay_ms": params["delay_ms"]}}[params["mode"]]
        self.begin_excuse("outage")
        self.record.ops["outages"] += 1

        def outage() -> None:
            try:
                self.put_faults({**settings, "seed": params["seed"]})
                time.sleep(params["seconds"])
            finally:
                self.put_faults(NORMAL_FAULTS)

        self.finish_excused("outage", outage, background=params["background"])

    def put_faults(self, settings: dict[str, Any]) -> None:
        for attempt in range(5):
            try:
                httpx.put(f"{self.secondary.fault_root}/_dev/faults", json=settings, timeout=10).raise_for_status()
                return
            except httpx.HTTPError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def op_migration(self, params: dict[str, Any]) -> None:
        with self.excused("migration"):
            problems = rebuild_table(self.db, params["table"])
        self.record.ops["migrations"] += 1
        if problems:
            self.record.notes.append(f"foreign_key_check after rebuilding {params['table']}: {problems[:5]}")

    def op_column(self, params: dict[str, Any]) -> None:
        """A nullable column added on both sides, in either order; SQLite's may have a DEFAULT."""
        table, name, declared = params["table"], params["name"], params["type"]
        default = ""
        if params["default"]:
            default = f" DEFAULT {self.record.number}" if declared == "INTEGER" else f" DEFAULT 'd{self.record.number}'"
        pg_type = "bigint" if declared == "INTEGER" else "text"
        with self.excused("column"):
            if params["sqlite_first"]:
                self.alter_source(f'ALTER TABLE {table} ADD COLUMN "{name}" {declared}{default}')
                time.sleep(params["lag"])
                self.alter_target(f'ALTER TABLE public.{table} ADD COLUMN "{name}" {pg_type}')
            else:
                self.alter_target(f'ALTER TABLE public.{table} ADD COLUMN "{name}" {pg_type}')
                time.sleep(1.0)
                self.alter_source(f'ALTER TABLE {table} ADD COLUMN "{name}" {declared}{default}')
            time.sleep(RECHECK_SECONDS)  # syncd reads the secondary's schema again within this
        self.record.ops["columns"] += 1

    def alter_source(self, ddl: str) -> None:
        conn = connect_source(self.db)
        try:
            retry_locked(lambda: conn.execute(ddl))
        finally:
            conn.close()

    def alter_target(self, ddl: str) -> None:
        with psycopg.connect(self.secondary.pg_url, autocommit=True) as pg:
            pg.execute(ddl)
            pg.execute("NOTIFY pgrst, 'reload schema'")

    def op_lock(self, params: dict[str, Any]) -> None:
        """Another process holds the write lock (BEGIN IMMEDIATE, one write) for a few seconds."""
        self.begin_excuse("lock")
        self.record.ops["lock holds"] += 1
        with log_file(self.work / f"lock-{self.record.number:02d}.log") as err:
            proc = self.processes.spawn("lock holder", [sys.executable, str(APP), "lock", "--db", str(self.db),
                                                        "--seconds", str(params["seconds"])],
                                        stdout=subprocess.PIPE, stderr=err, text=True)

        def hold() -> None:
            try:
                proc.communicate(timeout=params["seconds"] + 120)
                if proc.returncode != 0:
                    self.note(f"the lock holder ended with exit {proc.returncode}")
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.note("the lock holder did not finish")

        self.finish_excused("lock", hold, background=params["background"])

    def op_restore(self, params: dict[str, Any]) -> str:
        """The app's file restored from an earlier backup, in one of the ways operators do."""
        self.join_background("lock")  # the lock holder is an app process: it ends before any restore
        backup = self.backups[min(int(params["pick"] * len(self.backups)), len(self.backups) - 1)]
        kind = params["kind"]
        with self.excused("restore"):
            getattr(self, "restore_" + kind.replace("-", "_"))(backup, params)
        self.record.ops[f"restore {kind}"] += 1
        return f"{describe(Step('restore', 0, params))} from {backup.name} (cycle {backup.cycle})"

    def stage(self, backup: Backup) -> Path:
        """A copy of the backup beside the app's file, to rename over it (the backup stays for later restores)."""
        staged = self.work / "restore-staged.sqlite3"
        shutil.copyfile(backup.path, staged)
        return staged

    def restore_app_stopped(self, backup: Backup, params: dict[str, Any]) -> None:
        """(a) The app stopped, the backup renamed over the path, -wal and -shm deleted, the app started; syncd runs
        all along."""
        self.writer.stop()
        staged = self.stage(backup)
        with self.file_lock:
            os.replace(staged, self.db)
            remove_sidecars(self.db)
        time.sleep(params["pause"])
        self.writer.start()

    def restore_syncd_stopped(self, backup: Backup, params: dict[str, Any]) -> None:
        """(b) syncd stopped (SIGTERM or kill -9) and the app stopped, the backup renamed over the path, both
        started again."""
        self.stop_daemon(params)
        self.writer.stop()
        staged = self.stage(backup)
        with self.file_lock:
            os.replace(staged, self.db)
            remove_sidecars(self.db)
        time.sleep(params["pause"])
        self.start_both(params)

    def restore_backup_api(self, backup: Backup, params: dict[str, Any]) -> None:
        """(c) The backup API into the live file (`sqlite3 .restore`), with the app and syncd running."""
        with self.file_lock:
            source = sqlite3.connect(backup.path)
            live = connect_source(self.db)
            try:
                source.backup(live)
            finally:
                live.close()
                source.close()

    def restore_copy_bytes(self, backup: Backup, params: dict[str, Any]) -> None:
        """(d) syncd and the app stopped (the held connection closed too), -wal and -shm deleted, the backup's bytes
        copied over the file (same inode), both started again."""
        self.stop_daemon(params)
        self.writer.stop()
        if self.holder and self.holder.proc is not None:
            self.holder.command("close")
        with self.file_lock:
            remove_sidecars(self.db)
            with self.db.open("r+b") as out:
                out.write(backup.path.read_bytes())
                out.truncate()
                out.flush()
                os.fsync(out.fileno())
        time.sleep(params["pause"])
        if self.holder and self.holder.proc is not None:
            self.holder.command("open")
        self.start_both(params)

    def stop_daemon(self, params: dict[str, Any]) -> None:
        if params["kill"]:
            self.daemon.kill()
        else:
            self.daemon.terminate()

    def start_both(self, params: dict[str, Any]) -> None:
        if params["syncd_first"]:
            self.daemon.start()
            self.writer.start()
        else:
            self.writer.start()
            time.sleep(0.5)
            self.daemon.start()

    # -- the end -------------------------------------------------------------------------------------------------

    def totals(self) -> dict[str, Any]:
        """Sums over the cycles."""
        ops: Counter[str] = Counter()
        for record in self.cycles:
            ops.update(record.ops)
        everything = [self.setup_record, *self.cycles]
        exits = [e for r in everything for e in r.exits]
        return {
            "cycles": len(self.cycles), "converged": sum(r.converged for r in self.cycles),
            "kills": ops["kills"], "outages": ops["outages"], "migrations": ops["migrations"],
            "columns_added": ops["columns"],
            "restores": {k: ops[f"restore {k}"] for k in RESTORE_KINDS}, "lock_holds": ops["lock holds"],
            "backups": ops["backups"], "app_writes": sum(r.writes for r in self.cycles),
            "lost": sum(r.lost for r in self.cycles), "extra": sum(r.extra for r in self.cycles),
            "dead_letters": len(self.dead_seen),
            "corrupt_files": sum(r.quick_check != "ok" for r in self.cycles),
            "crashes": len(exits), "crash_codes": [e["code"] for e in exits],
            "silent_stalls": sum(r.silent_stalls for r in everything),
            "explained_stalls": sum(r.explained_stalls for r in everything),
            "soak_errors": sum(len(r.soak_errors) for r in self.cycles),
            "app_errors": sum(sum(r.app_errors.values()) for r in everything),
        }


# -- summary -----------------------------------------------------------------------------------------------------


def failures(soak: Soak, totals: dict[str, Any], expected_cycles: int) -> list[str]:
    """Why the soak failed, one reason a line (empty: it passed)."""
    reasons = list(soak.setup_notes)
    setup = soak.setup_record
    if setup.exits or setup.silent_stalls:
        reasons.append(f"setup: syncd exits {[e['code'] for e in setup.exits]}, {setup.silent_stalls} silent stalls")
    if totals["cycles"] < expected_cycles:
        reasons.append(f"only {totals['cycles']} of {expected_cycles} cycles ran")
    for record in soak.cycles:
        if not record.failed:
            continue
        what = []
        if not record.converged:
            what.append(f"did not converge in {record.converge_seconds} s (outbox {record.outbox})")
        if record.lost or record.extra:
            what.append(f"{record.lost} rows lost {record.lost_by_table} ({record.new_lost} new), {record.extra} "
                        f"extra {record.extra_by_table} ({record.new_extra} new)")
        if record.dead_letters:
            what.append(f"{record.dead_letters} dead letters")
        if record.quick_check != "ok":
            what.append(f"quick_check {record.quick_check.replace(chr(10), '; ')[:200]!r} (the app's file is corrupt)")
        if record.exits:
            what.append("syncd exits " + ", ".join(f"{e['code']} during {e['during']}" for e in record.exits))
        if record.silent_stalls:
            what.append(f"{record.silent_stalls} silent stalls")
        if record.soak_errors:
            what.append(f"{len(record.soak_errors)} errors of the soak itself")
        reasons.append(f"cycle {record.number} [{' > '.join(record.done)}]: {'; '.join(what)}")
    return reasons


def print_summary(soak: Soak, seed: int, args: argparse.Namespace, totals: dict[str, Any],
                  reasons: list[str]) -> None:
    t = totals
    restores = ", ".join(f"{k} {n}" for k, n in t["restores"].items())
    print(f"\n== syncd soak: seed {seed}, secondary {args.secondary}, hold-connection "
          f"{'yes' if args.hold_connection else 'no'}, tagged {'WITHOUT ROWID' if soak.without_rowid else 'rowid'}")
    for record in soak.cycles:
        print(record.line())
    print(f"totals: cycles {t['cycles']} (converged {t['converged']}), kills {t['kills']}, outages {t['outages']}, "
          f"migrations {t['migrations']}, columns added {t['columns_added']}, restores {sum(t['restores'].values())} "
          f"({restores}), lock holds {t['lock_holds']}, backups {t['backups']}, app writes {t['app_writes']}")
    print(f"        lost {t['lost']}, extra {t['extra']}, dead letters {t['dead_letters']}, corrupt files "
          f"{t['corrupt_files']}, crashes {t['crashes']} {t['crash_codes'] or ''}, silent stalls {t['silent_stalls']}, "
          f"explained stalls {t['explained_stalls']}, soak errors {t['soak_errors']}")
    if soak.holder:
        print(f"held connection: {dict(soak.holder.counts) or 'no report'}")
    print("result: PASS" if not reasons else "result: FAIL")
    for reason in reasons:
        print(f"  - {reason}")


def print_logs(work: Path, lines: int = 25) -> None:
    """The tail of each syncd run's log that recorded an error, and of the last one."""
    logs = sorted(work.glob("syncd-run-*.log"))
    shown = [log for log in logs[:-1] if last_error(log)] + logs[-1:]
    for log in shown:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        print(f"\n-- tail of {log}:")
        for line in tail:
            print(f"   {line[:400]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="seed of every choice (default: random, printed)")
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--consistency", choices=("key", "snapshot"), default="key",
                        help="the [worker] consistency syncd ships in (README, \"Consistency: key or snapshot\")")
    parser.add_argument("--secondary", choices=("dev-server", "postgrest"), default="dev-server")
    parser.add_argument("--postgrest", default=os.environ.get(POSTGREST_VARIABLE),
                        help=f"the PostgREST 12 binary (default: ${POSTGREST_VARIABLE})")
    parser.add_argument("--hold-connection", action="store_true",
                        help="keep an app connection open all along in a process of its own")
    parser.add_argument("--cycle-seconds", type=float, default=None,
                        help="how long the app writes per cycle (default: 6 to 10 s, drawn per cycle)")
    parser.add_argument("--converge-timeout", type=float, default=90.0)
    parser.add_argument("--stall-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway on failure)")
    parser.add_argument("--json", type=Path, help="write the summary there")
    parser.add_argument("--only", type=choices(OPERATIONS), default=OPERATIONS,
                        help="draw only these operations (comma-separated, e.g. restore,migration,outage)")
    parser.add_argument("--restore-kinds", type=choices(RESTORE_KINDS), default=RESTORE_KINDS,
                        help="draw only these kinds of restore (comma-separated)")
    parser.add_argument("--plan", action="store_true", help="print each cycle's plan for the seed and exit")
    args = parser.parse_args(argv)
    if args.secondary == "postgrest" and not args.postgrest:
        parser.error(f"--secondary postgrest needs --postgrest PATH or ${POSTGREST_VARIABLE} "
                     "(BIN=$(../shared/postgrest/install.sh))")
    return args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(f"syncd soak: seed {seed}", flush=True)
    if args.plan:
        for number in range(1, args.cycles + 1):
            seconds, steps = plan_cycle(seed, number, args.cycle_seconds, args.only, args.restore_kinds)
            print(f"cycle {number} ({seconds} s): {' > '.join(describe(s) for s in steps)}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="syncd-soak-"))
    print(f"work dir {work}", flush=True)
    signal.signal(signal.SIGTERM, interrupt)
    processes, soak, broken = Processes(), None, ""
    started = time.monotonic()
    try:
        secondary = start_secondary(args.secondary, args.postgrest, work, processes)
        soak = Soak(args, seed, work, secondary, processes)
        soak.setup()
        for number in range(1, args.cycles + 1):
            soak.run_cycle(number)
    except KeyboardInterrupt:
        broken = "interrupted"
    except Exception:
        broken = traceback.format_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if soak is not None:
            soak.shutdown()
        processes.stop_all()
    if soak is None:
        print(f"the soak could not start: {broken}")
        return 2
    totals = soak.totals()
    reasons = failures(soak, totals, args.cycles) + ([f"the soak broke off: {broken.strip()}"] if broken else [])
    print_summary(soak, seed, args, totals, reasons)
    elapsed = time.monotonic() - started
    print(f"{elapsed:.0f} s in all, {elapsed / max(1, totals['cycles']):.0f} s a cycle")
    if args.json:
        args.json.write_text(json.dumps({"seed": seed, "secondary": args.secondary, "ok": not reasons,
                                         "reasons": reasons, "totals": totals, "work_dir": str(work),
                                         "seconds": round(elapsed, 1),
                                         "setup": soak.setup_record.as_dict(),
                                         "held_connection": dict(soak.holder.counts) if soak.holder else None,
                                         "cycles": [r.as_dict() for r in soak.cycles]}, indent=2, default=str))
    if reasons:
        print_logs(work)
        print(f"\nwork dir kept: {work}")
    elif args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
