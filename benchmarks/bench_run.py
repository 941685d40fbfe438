"""Benchmarks of `syncd run` against `syncd dev-server` on this machine, each measured side by side in one run.

1. Drain: rows/s of `syncd run --once` (the whole process) shipping N inserted rows, divided by rows/s of a
   client that reads the same rows and POSTs `json.dumps` batches of 500 to the same server (rounds interleaved).
   Beside them, what bounds the ratio on this machine: syncd's start-up (`run --once` of an empty outbox), its
   drain without it, and the server's own capacity (the same bodies built beforehand, 2 requests in flight).
2. The same drain with 50 ms added to every answer (a remote Supabase; the dev server's fault injection), as a
   share of the 0 ms rate; the client's share beside it.
3. Lag at N single-row commits/s (default 2,000): commit in SQLite to visible in PostgreSQL, p50 and p99.
4. A backlog of changes (default 1,000,000): peak RSS of the syncd process while it drains, and its
   drain rate; meanwhile the app's single-row commit latency p99, divided by its p99 with syncd idle.
(What syncd costs the app's transactions: benchmarks/bench_app.py; capture: benchmarks/bench_capture.py.)

    python benchmarks/bench_run.py [--rows 50000] [--latency-ms 50] [--rate 2000] [--backlog 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import psycopg

from syncd.devserver.launcher import RunningDevServer, launch

TARGET_SQL = """
DROP TABLE IF EXISTS public.bench_items;
CREATE TABLE public.bench_items (id bigint PRIMARY KEY, name text, qty integer, price double precision, note text,
                                 written double precision);
GRANT ALL ON public.bench_items TO service_role;
NOTIFY pgrst, 'reload schema';
"""
APP_SQL = """
PRAGMA journal_mode=WAL;
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, note TEXT, written REAL);
CREATE TABLE app_only (id INTEGER PRIMARY KEY, v TEXT);
"""
BATCH = 500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(scratch: Path, server: RunningDevServer) -> tuple[Path, Path]:
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute(TARGET_SQL)
    db = scratch / "app.sqlite3"
    sqlite3.connect(db).executescript(APP_SQL)
    config = scratch / "syncd.toml"
    config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "{server.url}"\njwt_secret = "{server.jwt_secret}"\n'
                      f'[worker]\nbatch_size = {BATCH}\npoll_interval = 0.5\nmetrics_addr = "127.0.0.1:{free_port()}"\n'
                      '[[table]]\nname = "item"\ntarget = "bench_items"\n')
    subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(config)], check=True,
                   capture_output=True)
    time.sleep(0.5)
    return db, config


def insert_rows(db: Path, start: int, count: int) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany("INSERT INTO item VALUES (?, ?, ?, ?, ?, ?)",
                         ((i, f"name-{i}", i % 97, i * 0.5, "a note of modest length", 0.0)
                          for i in range(start, start + count)))


def truncate(server: RunningDevServer) -> None:
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute("TRUNCATE public.bench_items")


def enqueue_all(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO _syncd_outbox (tbl, key, op, at) SELECT 'item', quote(id), 'I', julianday('now') "
                     "FROM item")


def syncd_once(config: Path) -> None:
    subprocess.run([sys.executable, "-m", "syncd", "run", "--once", "--config", str(config)], check=True,
                   capture_output=True)


def raw_posts(server: RunningDevServer, db: Path) -> None:
    rows = sqlite3.connect(db).execute("SELECT id, name, qty, price, note, written FROM item ORDER BY id").fetchall()
    names = ("id", "name", "qty", "price", "note", "written")
    headers = {"Authorization": f"Bearer {server.service_key}", "Content-Type": "application/json",
               "Prefer": "resolution=merge-duplicates, return=minimal"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for start in range(0, len(rows), BATCH):
            body = json.dumps([dict(zip(names, r, strict=True)) for r in rows[start:start + BATCH]])
            client.post("/bench_items?on_conflict=id", content=body).raise_for_status()


def server_capacity(server: RunningDevServer, db: Path, in_flight: int = 2) -> float:
    """Rows/s the server takes when nothing else costs: the bodies of all rows built beforehand, `in_flight`
    requests at once (the ceiling of any client on this machine)."""
    rows = sqlite3.connect(db).execute("SELECT id, name, qty, price, note, written FROM item ORDER BY id").fetchall()
    names = ("id", "name", "qty", "price", "note", "written")
    bodies = iter([json.dumps([dict(zip(names, r, strict=True)) for r in rows[start:start + BATCH]])
                   for start in range(0, len(rows), BATCH)])
    headers = {"Authorization": f"Bearer {server.service_key}", "Content-Type": "application/json",
               "Prefer": "resolution=merge-duplicates, return=minimal"}
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            while True:
                with lock:
                    body = next(bodies, None)
                if body is None:
                    return
                client.post("/bench_items?on_conflict=id", content=body).raise_for_status()

    truncate(server)
    started = time.perf_counter()
    posters = [threading.Thread(target=post) for _ in range(in_flight)]
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join()
    return len(rows) / (time.perf_counter() - started)


def drain_rates(server: RunningDevServer, db: Path, config: Path, rows: int,
                rounds: int) -> tuple[float, float, float]:
    """(syncd run --once rows/s, the client's rows/s, seconds of `run --once` with nothing to ship), medians of
    `rounds` interleaved rounds; `CPU` gets the CPU seconds per row of the syncd process and of the client."""
    syncd_rates, raw_rates, idle, syncd_cpu, raw_cpu = [], [], [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        syncd_once(config)  # nothing queued: start-up and exit alone
        idle.append(time.perf_counter() - started)
        truncate(server)
        enqueue_all(db)
        before = os.times()
        started = time.perf_counter()
        syncd_once(config)
        syncd_rates.append(rows / (time.perf_counter() - started))
        after = os.times()
        syncd_cpu.append((after.children_user + after.children_system - before.children_user -
                          before.children_system) / rows)
        truncate(server)
        started, cpu = time.perf_counter(), time.process_time()
        raw_posts(server, db)
        raw_rates.append(rows / (time.perf_counter() - started))
        raw_cpu.append((time.process_time() - cpu) / rows)
    CPU.update(syncd=statistics.median(syncd_cpu), client=statistics.median(raw_cpu))
    return statistics.median(syncd_rates), statistics.median(raw_rates), statistics.median(idle)


CPU: dict[str, float] = {}  # CPU seconds per row of the last drain_rates: the syncd process, the client


def set_delay(server: RunningDevServer, delay_ms: float) -> None:
    httpx.put(f"{server.url.removesuffix('/rest/v1')}/_dev/faults", json={"delay_ms": delay_ms}).raise_for_status()


def drain_efficiency(server: RunningDevServer, db: Path, config: Path, rows: int, rounds: int,
                     latency_ms: float) -> None:
    insert_rows(db, 0, rows)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM _syncd_outbox")
    s, r, start = drain_rates(server, db, config, rows, rounds)
    cpu = dict(CPU)
    capacity = statistics.median(server_capacity(server, db) for _ in range(rounds))
    set_delay(server, latency_ms)
    try:
        s_far, r_far, _ = drain_rates(server, db, config, rows, rounds)
    finally:
        set_delay(server, 0)
    drain_only = rows / (rows / s - start)
    print(f"1. drain ({rows:,} rows, batches of {BATCH}, median of {rounds} interleaved rounds)")
    print(f"   syncd run --once (whole process) : {s:10,.0f} rows/s")
    print(f"   client: json.dumps + POST        : {r:10,.0f} rows/s")
    print(f"   ratio                            : {s / r:10.2f}   (goal >= 1.2)")
    print(f"   syncd's start-up and exit        : {start:10.2f} s; its drain without them {drain_only:,.0f} rows/s "
          f"= {drain_only / r:.2f} of the client")
    print(f"   CPU per row                      : syncd's process {cpu['syncd'] * 1e6:.1f} us (start-up included), "
          f"the client {cpu['client'] * 1e6:.1f} us")
    print(f"   the server's capacity            : {capacity:10,.0f} rows/s (bodies built beforehand, 2 in flight): "
          f"the ratio's ceiling with this start-up is {rows / (start + rows / capacity) / r:.2f}")
    print(f"2. the same with {latency_ms:.0f} ms added to every answer")
    print(f"   syncd run --once                 : {s_far:10,.0f} rows/s = {s_far / s:.2f} of its 0 ms rate "
          "(goal >= 0.9)")
    print(f"   client (one request in flight)   : {r_far:10,.0f} rows/s = {r_far / r:.2f} of its 0 ms rate")


def lag(server: RunningDevServer, db: Path, config: Path, seconds: float, rate: float) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM item")
        conn.execute("DELETE FROM _syncd_outbox")  # steady state: not behind the deletes of phase 1's rows
    daemon = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    truncate(server)
    committed: dict[int, float] = {}
    seen: dict[int, float] = {}
    done = threading.Event()

    def observe() -> None:
        with psycopg.connect(server.pg_url, autocommit=True) as pg:
            low = 10_000_000  # the lowest id not seen yet: batches in flight together may land out of order
            while not done.is_set() or len(seen) < len(committed):
                for (i,) in pg.execute("SELECT id FROM public.bench_items WHERE id >= %s ORDER BY id", [low]):
                    seen.setdefault(i, time.time())
                while low in seen:
                    low += 1
                time.sleep(0.002)
                if done.is_set() and time.time() > deadline:
                    break

    deadline = time.time() + seconds + 30
    watcher = threading.Thread(target=observe)
    watcher.start()
    app = sqlite3.connect(db, isolation_level=None)
    app.execute("PRAGMA synchronous=FULL")
    n, next_at = 10_000_000, time.perf_counter()
    end = next_at + seconds
    while next_at < end:
        app.execute("INSERT INTO item (id, name) VALUES (?, 'lag')", (n,))
        committed[n] = time.time()
        n += 1
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))
    done.set()
    watcher.join()
    daemon.terminate()
    daemon.wait()
    lags = sorted((seen[i] - committed[i]) * 1000 for i in committed if i in seen)
    p50, p99 = lags[len(lags) // 2], lags[int(len(lags) * 0.99) - 1]
    print(f"3. lag at {rate:.0f} single-row commits/s for {seconds:.0f} s ({len(lags)}/{len(committed)} rows seen)")
    print(f"   commit to visible p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   (goal: p99 <= 100)")


def app_commit_latencies(db: Path, seconds: float, stop: threading.Event | None = None) -> list[float]:
    app = sqlite3.connect(db, isolation_level=None, timeout=30)
    app.execute("PRAGMA synchronous=FULL")
    latencies, n, end = [], 0, time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop and stop.is_set()):
        started = time.perf_counter()
        app.execute("INSERT OR REPLACE INTO app_only VALUES (?, 'x')", (n % 1000,))
        latencies.append(time.perf_counter() - started)
        n += 1
        time.sleep(0.005)
    return latencies


def p99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99) - 1]


def peak_rss(process: subprocess.Popen[str] | subprocess.Popen[bytes], every: float) -> int:
    """The highest RSS (bytes) of `process`, sampled every `every` seconds until it exits."""
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(every)
    return peak


def backlog(server: RunningDevServer, db: Path, config: Path, size: int) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM item")
        conn.execute("DELETE FROM _syncd_outbox")
    truncate(server)
    for start in range(0, size, 100_000):
        insert_rows(db, 20_000_000 + start, min(100_000, size - start))
    idle = app_commit_latencies(db, 5)
    daemon = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--once", "--config", str(config)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.perf_counter()
    busy: list[float] = []
    stop = threading.Event()
    writer = threading.Thread(target=lambda: busy.extend(app_commit_latencies(db, 3600, stop)))
    writer.start()
    peak = peak_rss(daemon, every=0.05)
    elapsed = time.perf_counter() - started
    stop.set()
    writer.join()
    print(f"4. backlog of {size:,} changes")
    print(f"   syncd peak RSS {peak / 2**20:6.1f} MB (goal <= 100 at 10M)   drain rate {size / elapsed:10,.0f} rows/s")
    print(f"   app single-row commit p99: idle {p99(idle) * 1000:.2f} ms, while draining "
          f"{p99(busy) * 1000:.2f} ms, ratio {p99(busy) / p99(idle):.2f} (goal <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--lag-seconds", type=float, default=10)
    args = parser.parse_args()
    server = launch(["--port", "0", "--faults"])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            db, config = setup(Path(scratch), server)
            drain_efficiency(server, db, config, args.rows, args.rounds, args.latency_ms)
            lag(server, db, config, args.lag_seconds, args.rate)
            backlog(server, db, config, args.backlog)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
