"""How long a flush holds the application's write lock, measured side by side in one run.

syncd writes the app's file only to flush: the acknowledged entries deleted from `_syncd_outbox` in chunks
(`outbox.FLUSH_CHUNK`), each one transaction. Every millisecond of it is a window in which an app transaction
that has read but not written yet fails at its write (SQLITE_BUSY_SNAPSHOT, https://sqlite.org/wal.html#busy) and
in which the app's writers wait. Measured: the median time from BEGIN IMMEDIATE to the end of COMMIT of
`outbox.flush` over a backlog of acknowledged entries, beside the floor of any outbox, a bare
`DELETE FROM _syncd_outbox WHERE seq BETWEEN ? AND ?` of as many entries (rounds interleaved).

    python benchmarks/bench_flush.py [--entries 200000]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw

from syncd import outbox
from syncd.source import Source
from syncd.sqlite import immediate


def backlog(scratch: Path, entries: int) -> Source:
    """An installed app file whose outbox holds `entries` entries, all acknowledged (shipped) in its state file."""
    db = scratch / "app.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript("PRAGMA journal_mode=WAL; CREATE TABLE item (id INTEGER PRIMARY KEY, v TEXT);")
    config = scratch / "syncd.toml"
    config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "http://127.0.0.1:9/rest/v1"\n'
                      'service_key = "a.b.c"\n[[table]]\nname = "item"\n')
    subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(config)], check=True,
                   capture_output=True)
    with conn:
        conn.executemany("INSERT INTO item VALUES (?, 'a value')", ((i,) for i in range(entries)))
    source = Source(db)
    source.configure()
    with immediate(source.conn):
        source.conn.execute("INSERT INTO st.acked (seq, at, fate) SELECT seq, at, 'shipped' FROM main._syncd_outbox")
    return source


def bare_delete(conn: apsw.Connection, first: int, chunk: int) -> None:
    with immediate(conn):
        conn.execute("DELETE FROM main._syncd_outbox WHERE seq BETWEEN ? AND ?", (first, first + chunk - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000)
    args = parser.parse_args()
    chunk = outbox.FLUSH_CHUNK
    with tempfile.TemporaryDirectory() as flushed, tempfile.TemporaryDirectory() as bare:
        syncd_source, bare_source = backlog(Path(flushed), args.entries), backlog(Path(bare), args.entries)
        first = 1
        syncd_times, bare_times = [], []
        for _ in range(args.entries // chunk):
            started = time.perf_counter()
            outbox.flush(syncd_source.conn, wait=True)
            syncd_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            bare_delete(bare_source.conn, first, chunk)
            bare_times.append(time.perf_counter() - started)
            first += chunk
    s, b = statistics.median(syncd_times) * 1000, statistics.median(bare_times) * 1000
    print(f"the app's write lock held per flush of {chunk:,} entries ({args.entries:,} entries, median)")
    print(f"   syncd's flush (deletes, dead letters, requeues, position, state file) : {s:7.3f} ms")
    print(f"   a bare DELETE ... WHERE seq BETWEEN                                  : {b:7.3f} ms")
    print(f"   ratio                                                                : {s / b:7.2f}")


if __name__ == "__main__":
    main()
