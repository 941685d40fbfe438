"""Benchmark: what the capture triggers cost the application's writes.

Two identical SQLite files in WAL mode (synchronous=FULL, as a careful app runs), one with syncd's
triggers installed; the app writes through stdlib sqlite3. Rounds alternate between the two files so
both see the same machine noise; the ratio (with triggers / without) is what matters.

    python benchmarks/bench_capture.py [--rounds 5]

Goals (issue 3): 1,000-row transactions at most 1.6x, single-row commits at most 1.05x, the same for
UPDATE and DELETE.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from syncd import capture
from syncd.config import Config
from syncd.state import connect

SCHEMA = "CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, note TEXT)"
BATCH = 1000
SINGLE = 200


def make(path: Path, with_triggers: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(SCHEMA)
    if with_triggers:
        capture.install(connect(path), Config.model_validate({"table": [{"name": "item"}]}))
    return conn


def row(i: int) -> tuple[int, str, int, float, str]:
    return (i, f"name-{i}", i % 97, i * 0.5, "a note of modest length")


def batched(sql: str, params: Callable[[int], tuple[object, ...]]) -> Callable[[sqlite3.Connection, int], None]:
    def run(conn: sqlite3.Connection, base: int) -> None:
        for start in range(base, base + 10 * BATCH, BATCH):
            conn.execute("BEGIN")
            conn.executemany(sql, (params(i) for i in range(start, start + BATCH)))
            conn.execute("COMMIT")
    return run


def single(sql: str, params: Callable[[int], tuple[object, ...]]) -> Callable[[sqlite3.Connection, int], None]:
    def run(conn: sqlite3.Connection, base: int) -> None:
        for i in range(base, base + SINGLE):
            conn.execute(sql, params(i))  # autocommit: one transaction (and one fsync) per row
    return run


INSERT = "INSERT INTO item VALUES (?, ?, ?, ?, ?)"
UPDATE = "UPDATE item SET qty = qty + 1, note = ? WHERE id = ?"
DELETE = "DELETE FROM item WHERE id = ?"
CASES = [  # (label, prepare rows first?, workload)
    ("insert, 1,000-row transactions", False, batched(INSERT, row)),
    ("update, 1,000-row transactions", True, batched(UPDATE, lambda i: ("changed", i))),
    ("delete, 1,000-row transactions", True, batched(DELETE, lambda i: (i,))),
    ("insert, single-row commits", False, single(INSERT, row)),
    ("update, single-row commits", True, single(UPDATE, lambda i: ("changed", i))),
    ("delete, single-row commits", True, single(DELETE, lambda i: (i,))),
]


def measure(conn: sqlite3.Connection, prepare: bool, work: Callable[[sqlite3.Connection, int], None],
            base: int) -> float:
    if prepare:
        conn.execute("BEGIN")
        conn.executemany(INSERT, (row(i) for i in range(base, base + 10 * BATCH)))
        conn.execute("COMMIT")
    conn.execute("DELETE FROM _syncd_outbox") if has_outbox(conn) else None
    started = time.perf_counter()
    work(conn, base)
    return time.perf_counter() - started


def has_outbox(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = '_syncd_outbox'").fetchone() is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        plain = make(Path(scratch) / "plain.sqlite3", with_triggers=False)
        captured = make(Path(scratch) / "captured.sqlite3", with_triggers=True)
        print(f"sqlite {sqlite3.sqlite_version}, WAL, synchronous=FULL; median of {args.rounds} interleaved rounds")
        print(f"{'workload':34} {'plain':>10} {'captured':>10} {'ratio':>7}")
        for n, (label, prepare, work) in enumerate(CASES):
            plain_times, captured_times = [], []
            for r in range(args.rounds):
                base = (n * args.rounds + r) * 100_000
                plain_times.append(measure(plain, prepare, work, base))
                captured_times.append(measure(captured, prepare, work, base))
            p, c = statistics.median(plain_times), statistics.median(captured_times)
            print(f"{label:34} {p * 1000:8.1f}ms {c * 1000:8.1f}ms {c / p:7.2f}")


if __name__ == "__main__":
    main()
