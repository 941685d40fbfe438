"""`syncd run --once` with an empty outbox, process start to exit, side by side in one run (rounds interleaved) with
the floor its libraries set: a Python process that only imports what `run` needs (pydantic-settings for the
configuration, httpx, structlog, prometheus-client, apsw) and exits.

    python benchmarks/bench_start.py [--rounds 15]
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

FLOOR = "import apsw, httpx, prometheus_client, pydantic_settings, structlog"


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        db, config = Path(scratch) / "app.sqlite3", Path(scratch) / "syncd.toml"
        sqlite3.connect(db).executescript("PRAGMA journal_mode=WAL; CREATE TABLE item (id INTEGER PRIMARY KEY, v);")
        # A closed loopback port: an empty outbox never needs the secondary.
        config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "http://127.0.0.1:9/rest/v1"\n'
                          'service_key = "a.b.c"\n[worker]\nmetrics_addr = "127.0.0.1:0"\n[[table]]\nname = "item"\n')
        subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(config)], check=True,
                       capture_output=True)
        once = [sys.executable, "-m", "syncd", "run", "--once", "--config", str(config)]
        syncd_times, floor_times, bare_times = [], [], []
        for _ in range(args.rounds):
            syncd_times.append(timed(once))
            floor_times.append(timed([sys.executable, "-c", FLOOR]))
            bare_times.append(timed([sys.executable, "-c", "pass"]))
    s, f, b = (statistics.median(t) for t in (syncd_times, floor_times, bare_times))
    print(f"process start to exit, median of {args.rounds} interleaved rounds")
    print(f"   syncd run --once, empty outbox          : {s:6.3f} s   (goal <= 0.15 s)")
    print(f"   python importing run's libraries only   : {f:6.3f} s")
    print(f"   python -c pass                          : {b:6.3f} s")
    print(f"   ratio syncd / its libraries' floor      : {s / f:6.2f}")


if __name__ == "__main__":
    main()
