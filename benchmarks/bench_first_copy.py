"""The first copy of a database with a deep foreign-key graph, against the same number of rows in one table without
foreign keys, side by side in one run (issue 19, point 2): Chinook's 11 tables and 15,607 rows (benchmarks/chinook.py)
through the README's commands (`init`, schema.sql applied, `install`, `resync --all`, `run --once`), and the same for
a file of one table with as many rows. Also the order a user picked before `--all` existed: `resync --table` of every
table in alphabetical order (children before parents), then `run --once`. Each round starts from an empty secondary;
rounds interleave; medians. Prints rows/s of each and the ratios, and the requeues and dead letters seen.

    python benchmarks/bench_first_copy.py [--rounds 3] [--scale 1.0] []
"""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's root on the path
from benchmarks import chinook
from syncd.devserver.launcher import launch

FLAT = ("CREATE TABLE Flat (FlatId INTEGER PRIMARY KEY, Name NVARCHAR(200) NOT NULL, Other INTEGER, "
        "Price NUMERIC(10,2));")


def syncd(work: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "syncd", *args], cwd=work, env=env, capture_output=True, text=True,
                          check=True, timeout=600)


def prepare(work: Path, pg_url: str, env: dict[str, str], build: str, rows: int, scale: float) -> Path:
    """A fresh app file of kind `build` ("chinook" or "flat"), init'ed and installed, its schema.sql applied (the
    secondary's tables dropped first)."""
    work.mkdir()
    db = work / "app.sqlite3"
    if build == "chinook":
        chinook.build(db, scale)
    else:
        conn = sqlite3.connect(db)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(FLAT)
        with conn:
            conn.executemany("INSERT INTO Flat VALUES (?, ?, ?, ?)",
                             ((i, f"Row {i}", i % 97, "0.99") for i in range(1, rows + 1)))
        conn.close()
    syncd(work, env, "init", "--db", "app.sqlite3")
    with psycopg.connect(pg_url, autocommit=True) as pg:
        for table in [*chinook.TABLES, "Flat"]:
            pg.execute(f'DROP TABLE IF EXISTS public."{table}" CASCADE')
        pg.execute((work / "schema.sql").read_text())
        pg.execute("NOTIFY pgrst, 'reload schema'")
    time.sleep(1.0)
    syncd(work, env, "install")
    return db


def first_copy(work: Path, env: dict[str, str], tables: list[str] | None) -> tuple[float, int]:
    """Seconds for resync (--all, or --table of each of `tables` in that order) and run --once; keys requeued."""
    started = time.monotonic()
    if tables is None:
        syncd(work, env, "resync", "--all")
    else:
        for table in tables:
            syncd(work, env, "resync", "--table", table)
    run = syncd(work, env, "run", "--once", "--metrics-addr", "127.0.0.1:0")
    seconds = time.monotonic() - started
    requeued = sum(int(n) for n in re.findall(r'"requeued": (\d+)', run.stderr))
    return seconds, requeued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="syncd-bench-first-copy-"))
    server = launch(["--port", "0"])
    try:
        env = {**os.environ, "SUPABASE_URL": server.url.removesuffix("/rest/v1"),
               "SUPABASE_SERVICE_KEY": server.service_key}
        rows = chinook.build(scratch / "count.sqlite3", args.scale)
        results: dict[str, list[float]] = {"chinook --all": [], "flat --all": [], "chinook alphabetical": []}
        requeues: dict[str, list[int]] = {name: [] for name in results}
        for round_ in range(args.rounds):
            for name in results:
                build, how = name.split()
                work = scratch / f"{build}-{how.strip('-')}-{round_}"
                prepare(work, server.pg_url, env, build, rows, args.scale)
                seconds, requeued = first_copy(work, env, None if how == "--all" else sorted(chinook.TABLES))
                results[name].append(rows / seconds)
                requeues[name].append(requeued)
        rates = {name: statistics.median(values) for name, values in results.items()}
        for name, rate in rates.items():
            print(f"{name:22} {rate:9,.0f} rows/s  (requeued keys per round: {requeues[name]})")
        print(f"chinook --all / flat --all: {rates['chinook --all'] / rates['flat --all']:.2f}")
        print(f"chinook --all / chinook alphabetical: {rates['chinook --all'] / rates['chinook alphabetical']:.2f}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
