"""Snapshot mode next to key mode (issue 22), against `syncd dev-server` on this machine, side by side in one run.

Two shapes of application:
- one table: each transaction inserts one 6-column row (bench_run's rows);
- ten tables: each transaction inserts one small row into each of ten tables (t0 .. t9).
For each shape, with 0 ms and with `--latency-ms` added to every answer (the dev server's fault injection):
1. drain: rows/s of `syncd run --once` (the whole process) shipping a backlog of `--transactions` transactions, in
   key mode and in snapshot mode (rounds interleaved, medians);
2. lag: `--rate` transactions/s for `--lag-seconds` with `syncd run` in each mode; commit in SQLite to visible in
   PostgreSQL (the last table's row of each transaction), p50 and p99.

    python benchmarks/bench_snapshot.py [--transactions 20000] [--rounds 3] [--latency-ms 50] [--rate 100]
"""

from __future__ import annotations

import argparse
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

from syncd.devserver.launcher import RunningDevServer, launch

BATCH = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Shape:
    """An application: its tables (SQLite name -> target name) and the SQL of one transaction's rows."""

    name: str
    tables: list[str]
    columns: str  # the SQLite columns after the key
    target_columns: str

    def app_sql(self) -> str:
        return "PRAGMA journal_mode=WAL;\n" + "\n".join(
            f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, {self.columns});" for t in self.tables)

    def target_sql(self) -> str:
        return "\n".join(f"DROP TABLE IF EXISTS public.bench_snap_{t}; CREATE TABLE public.bench_snap_{t} "
                         f"(id bigint PRIMARY KEY, {self.target_columns}); "
                         f"GRANT ALL ON public.bench_snap_{t} TO service_role;" for t in self.tables) + \
            "\nNOTIFY pgrst, 'reload schema';"

    def write(self, conn: sqlite3.Connection, first: int, count: int) -> None:
        """`count` transactions, from id `first`: each writes one row per table."""
        for i in range(first, first + count):
            conn.execute("BEGIN")
            for t in self.tables:
                if len(self.tables) == 1:
                    conn.execute(f"INSERT INTO {t} VALUES (?, ?, ?, ?, ?, ?)",
                                 (i, f"name-{i}", i % 97, i * 0.5, "a note of modest length", 0.0))
                else:
                    conn.execute(f"INSERT INTO {t} VALUES (?, ?, ?)", (i, f"v{i}", i % 7))
            conn.execute("COMMIT")


ONE_TABLE = Shape("one table", ["item"], "name TEXT, qty INTEGER, price REAL, note TEXT, written REAL",
                  "name text, qty integer, price double precision, note text, written double precision")
TEN_TABLES = Shape("ten tables", [f"t{i}" for i in range(10)], "v TEXT, n INTEGER", "v text, n integer")


def setup(scratch: Path, server: RunningDevServer, shape: Shape) -> tuple[Path, dict[str, Path]]:
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute(shape.target_sql())
    db = scratch / f"{shape.tables[0]}.sqlite3"
    sqlite3.connect(db).executescript(shape.app_sql())
    configs = {}
    for mode in ("key", "snapshot"):
        config = scratch / f"{shape.tables[0]}-{mode}.toml"
        tables = "".join(f'[[table]]\nname = "{t}"\ntarget = "bench_snap_{t}"\n' for t in shape.tables)
        config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "{server.url}"\njwt_secret = '
                          f'"{server.jwt_secret}"\n[worker]\nbatch_size = {BATCH}\npoll_interval = 0.5\n'
                          f'consistency = "{mode}"\nmetrics_addr = "127.0.0.1:{free_port()}"\n{tables}')
        configs[mode] = config
    subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(configs["key"])], check=True,
                   capture_output=True)
    time.sleep(0.5)
    return db, configs


def truncate(server: RunningDevServer, shape: Shape) -> None:
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute("TRUNCATE " + ", ".join(f"public.bench_snap_{t}" for t in shape.tables))


def set_delay(server: RunningDevServer, delay_ms: float) -> None:
    httpx.put(f"{server.url.removesuffix('/rest/v1')}/_dev/faults", json={"delay_ms": delay_ms}).raise_for_status()


def enqueue_all(db: Path, shape: Shape) -> int:
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM _syncd_outbox")
        for t in shape.tables:
            conn.execute(f"INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT '{t}', quote(id), 'I', "
                         f"julianday('now') FROM {t}")
        return conn.execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]


def run_once(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "syncd", "run", "--once", "--config", str(config)], check=True,
                   capture_output=True)


def drain(server: RunningDevServer, db: Path, configs: dict[str, Path], shape: Shape, rounds: int) -> dict[str, float]:
    """Rows/s of `run --once` per mode, medians of interleaved rounds."""
    rates: dict[str, list[float]] = {"key": [], "snapshot": []}
    for _ in range(rounds):
        for mode in ("key", "snapshot"):
            truncate(server, shape)
            rows = enqueue_all(db, shape)
            started = time.perf_counter()
            run_once(configs[mode])
            rates[mode].append(rows / (time.perf_counter() - started))
    return {mode: statistics.median(values) for mode, values in rates.items()}


def lag(server: RunningDevServer, db: Path, config: Path, shape: Shape, seconds: float, rate: float,
        first: int) -> tuple[float, float]:
    """(p50, p99) ms from commit to the transaction's last row visible in PostgreSQL."""
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM _syncd_outbox")
    daemon = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    last = f"public.bench_snap_{shape.tables[-1]}"
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    done = threading.Event()

    def observe() -> None:
        with psycopg.connect(server.pg_url, autocommit=True) as pg:
            low = first
            while not done.is_set() or (len(seen) < len(committed) and time.time() < deadline):
                for (i,) in pg.execute(f"SELECT id FROM {last} WHERE id >= %s ORDER BY id", [low]):
                    seen.setdefault(i, time.time())
                while low in seen:
                    low += 1
                time.sleep(0.002)

    deadline = time.time() + seconds + 30
    watcher = threading.Thread(target=observe)
    watcher.start()
    app = sqlite3.connect(db, isolation_level=None)
    n, next_at = first, time.perf_counter()
    end = next_at + seconds
    while next_at < end:
        shape.write(app, n, 1)
        committed[n] = time.time()
        n += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
    done.set()
    watcher.join()
    daemon.terminate()
    daemon.wait()
    lags = sorted((seen[i] - committed[i]) * 1000 for i in committed if i in seen)
    return lags[len(lags) // 2], lags[max(0, int(len(lags) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--lag-seconds", type=float, default=8)
    args = parser.parse_args()
    server = launch(["--port", "0", "--faults"])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for shape in (ONE_TABLE, TEN_TABLES):
                db, configs = setup(Path(scratch), server, shape)
                count = args.transactions // len(shape.tables)
                shape.write(sqlite3.connect(db, isolation_level=None), 0, count)
                for delay in (0.0, args.latency_ms):
                    set_delay(server, delay)
                    rates = drain(server, db, configs, shape, args.rounds)
                    lags = {mode: lag(server, db, configs[mode], shape, args.lag_seconds, args.rate,
                                      10_000_000 + 1_000_000 * i + int(delay) * 10_000)
                            for i, mode in enumerate(("key", "snapshot"))}
                    print(f"{shape.name}, {delay:.0f} ms added: drain of {count * len(shape.tables):,} rows "
                          f"({count:,} transactions), median of {args.rounds} interleaved rounds")
                    print(f"   key mode      : {rates['key']:9,.0f} rows/s   lag at {args.rate:.0f} tx/s: p50 "
                          f"{lags['key'][0]:7.1f} ms  p99 {lags['key'][1]:7.1f} ms")
                    print(f"   snapshot mode : {rates['snapshot']:9,.0f} rows/s   lag at {args.rate:.0f} tx/s: p50 "
                          f"{lags['snapshot'][0]:7.1f} ms  p99 {lags['snapshot'][1]:7.1f} ms")
                    print(f"   snapshot / key: {rates['snapshot'] / rates['key']:9.2f}")
                set_delay(server, 0)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
