"""What syncd costs the application, measured side by side in one run against `syncd dev-server` on this machine.

The application is a separate process (as in production: the sidecar is another process) writing to its SQLite
file (WAL, synchronous=FULL) at a fixed rate, in three modes:
- deferred:  BEGIN; SELECT; UPDATE; COMMIT (Django's atomic(), an explicit BEGIN): SQLite refuses the UPDATE at
             once with "database is locked" when another connection committed after the SELECT;
- immediate: BEGIN IMMEDIATE; SELECT; UPDATE; COMMIT (Rails' write transactions, Django 5.1's
             transaction_mode="IMMEDIATE"): waits for the lock instead (busy timeout 5 s);
- single:    one INSERT OR REPLACE per commit (autocommit).
Every write is captured by syncd's triggers, so the daemon ships while the app writes. For each mode: the
transactions that failed and the p99 of a transaction's duration, with no daemon, with `syncd run` shipping,
and while `syncd run` drains a backlog of changes (default 200,000); the daemon phases once per `--nice` value
(`worker.nice`, the CPU priority of `syncd run`: 0, the default, is the app's own), side by side;
`--server-nice 19` takes the dev server and its PostgreSQL out of the competition for the CPU (a secondary on
another machine, as in production), leaving the app and syncd.

    python benchmarks/bench_app.py [--seconds 60] [--rate 200] [--backlog 200000] [--modes deferred,immediate,single]
                                   [--nice 0,10] [--server-nice 0]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from bench_run import free_port

from syncd.devserver.launcher import RunningDevServer, launch

TARGET_SQL = """
DROP TABLE IF EXISTS public.bench_acct; DROP TABLE IF EXISTS public.bench_items;
CREATE TABLE public.bench_acct (id bigint PRIMARY KEY, bal bigint NOT NULL);
CREATE TABLE public.bench_items (id bigint PRIMARY KEY, name text, qty integer, price double precision, note text,
                                 written double precision);
GRANT ALL ON public.bench_acct, public.bench_items TO service_role;
NOTIFY pgrst, 'reload schema';
"""
APP_SQL = """
PRAGMA journal_mode=WAL;
CREATE TABLE acct (id INTEGER PRIMARY KEY, bal INTEGER NOT NULL);
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, note TEXT, written REAL);
"""
APP = r"""
import json, sqlite3, sys, time
db, mode, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
conn = sqlite3.connect(db, isolation_level=None, timeout=5)
conn.execute("PRAGMA synchronous=FULL")
ok = failed = 0
durations = []
n, next_at = 0, time.perf_counter()
end = next_at + seconds
while next_at < end:
    n += 1
    started = time.perf_counter()
    try:
        if mode == "single":
            conn.execute("INSERT OR REPLACE INTO acct VALUES (?, ?)", (n % 100, n))
        else:
            conn.execute("BEGIN IMMEDIATE" if mode == "immediate" else "BEGIN")
            bal = conn.execute("SELECT bal FROM acct WHERE id = ?", (n % 100,)).fetchone()[0]
            conn.execute("UPDATE acct SET bal = ? WHERE id = ?", (bal + 1, n % 100))
            conn.execute("COMMIT")
        ok += 1
        durations.append(time.perf_counter() - started)
    except sqlite3.OperationalError:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        failed += 1
    next_at += 1 / rate
    time.sleep(max(0.0, next_at - time.perf_counter()))
durations.sort()
print(json.dumps({"ok": ok, "failed": failed, "p99_ms": durations[int(len(durations) * 0.99) - 1] * 1000}))
"""


def setup(scratch: Path, server: RunningDevServer) -> tuple[Path, Path]:
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute(TARGET_SQL)
    db = scratch / "app.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript(APP_SQL)
    conn.executemany("INSERT INTO acct VALUES (?, 0)", [(i,) for i in range(100)])
    conn.commit()
    config = scratch / "syncd.toml"
    config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "{server.url}"\njwt_secret = "{server.jwt_secret}"\n'
                      f'[worker]\nmetrics_addr = "127.0.0.1:{free_port()}"\nnice = 0\n'
                      '[[table]]\nname = "acct"\ntarget = "bench_acct"\n'
                      '[[table]]\nname = "item"\ntarget = "bench_items"\n')
    subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(config)], check=True,
                   capture_output=True)
    return db, config


def run_app(db: Path, mode: str, rate: float, seconds: float) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", APP, str(db), mode, str(rate), str(seconds)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout)


def enqueue_backlog(db: Path, size: int) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM item")
        conn.executemany("INSERT INTO item VALUES (?, ?, ?, ?, ?, ?)",
                         ((i, f"name-{i}", i % 97, i * 0.5, "a note of modest length", 0.0) for i in range(size)))


def daemon(config: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # started, lease taken, idle
    return process


def drain_all(config: Path) -> None:
    """What the last phase left ships before the next one starts (each phase starts from an empty outbox)."""
    subprocess.run([sys.executable, "-m", "syncd", "run", "--once", "--config", str(config)], check=True,
                   capture_output=True)


def outbox_size(db: Path) -> int:
    return sqlite3.connect(db).execute("SELECT count(*) FROM _syncd_outbox").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--modes", default="deferred,immediate,single")
    parser.add_argument("--nice", default="0", help="worker.nice values to run the daemon phases with, e.g. 0,10")
    parser.add_argument("--server-nice", type=int, default=0,
                        help="run the dev server and its PostgreSQL at this nice value: 19 leaves the app and syncd "
                             "competing for the CPU as if the secondary were on another machine")
    args = parser.parse_args()
    nices = [int(n) for n in args.nice.split(",")]
    server = launch(["--port", "0"], preexec_fn=lambda: os.nice(args.server_nice))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            db, config = setup(Path(scratch), server)
            for mode in args.modes.split(","):
                alone = run_app(db, mode, args.rate, args.seconds)
                for nice in nices:
                    config.write_text(re.sub(r"nice = \d+", f"nice = {nice}", config.read_text()))
                    running = daemon(config)
                    shipping = run_app(db, mode, args.rate, args.seconds)
                    enqueue_backlog(db, args.backlog)
                    draining = run_app(db, mode, args.rate, args.seconds)
                    left = outbox_size(db)
                    running.terminate()
                    running.wait(30)
                    drain_all(config)
                    rows.append((f"{mode} n{nice}", alone, shipping, draining, left))
    finally:
        server.stop()
    print(f"app transactions at {args.rate:.0f}/s for {args.seconds:.0f} s each, a separate process; backlog "
          f"{args.backlog:,} changes")
    print(f"{'mode':14} {'':12} {'failed':>8} {'of':>8} {'per 10k':>8} {'p99 ms':>8} {'p99 ratio':>10}")
    for mode, alone, shipping, draining, left in rows:
        for label, result in (("no daemon", alone), ("shipping", shipping), ("draining", draining)):
            total = result["ok"] + result["failed"]
            print(f"{mode:14} {label:12} {result['failed']:8.0f} {total:8.0f} {result['failed'] / total * 1e4:8.1f} "
                  f"{result['p99_ms']:8.2f} {result['p99_ms'] / alone['p99_ms']:10.2f}")
        print(f"{mode:14} (outbox entries left when the drain phase ended: {left:,})")


if __name__ == "__main__":
    main()
