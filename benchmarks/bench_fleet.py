"""Multi-file mode (`[source] glob`) at scale: one `syncd run` over a directory of N tenant files (default 1,000),
against `syncd dev-server` on this machine.

1. Lag: every file gets ~2 single-row commits/s (spread evenly over the period; the apps are 4 processes of stdlib
   sqlite3, WAL, synchronous=NORMAL, one connection per file, each commit writing time.time() in `written`); one
   `syncd run` serves the glob. Lag = a row's arrival in PostgreSQL (a BEFORE INSERT trigger stamps
   clock_timestamp(), same clock) minus its commit's `written`, p50/p99/max over the rows committed in the measuring
   window (default 30 s after a 10 s warm-up). Goal: p99 <= 1 s. Beside it: the daemon's CPU, and how late the
   apps' commits were against their schedule (an app that fell behind offers less than the nominal rate).
2. Idle: the same daemon once the writes stopped and its files closed (IDLE_CLOSE_SECONDS), then a fresh daemon
   over the same N idle files: CPU % of one core (psutil cpu_times, the process and its children, over 20 s) and
   RSS. Goals: RSS <= 300 MB, CPU < 5 % of a core.
3. One busy tenant among N-1 idle ones: a backlog of R rows (default 50,000) committed in one transaction in one
   tenant's file while the glob daemon (every other file idle and closed) runs; rows/s from the commit until
   PostgreSQL holds all R. The same backlog in single-file mode (`[source] path`: a file of the same schema outside
   the glob, into a table without the tenant column, its own `syncd run`). Rounds interleaved (glob, single, ...);
   both daemons stay up through the phase (the idle one costs what phase 2 measured); the ratio of the medians,
   goal >= 0.8. Beside it: each daemon's CPU seconds per 1,000 rows.

    python benchmarks/bench_fleet.py [--files 1000] [--rate 2] [--warmup 10] [--window 30] [--idle-seconds 20]
                                     [--rows 50000] [--rounds 3] [--drain-threads N] [--quick] [--json FILE]

`--quick`: 100 files, 5 s warm-up, 10 s windows, 10,000 rows, 2 rounds (a smoke run of a minute or two).
"""

from __future__ import annotations

import argparse
import heapq
import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from syncd.devserver.launcher import RunningDevServer, launch

TARGET_SQL = """
DROP TABLE IF EXISTS public.bench_fleet_items;
DROP TABLE IF EXISTS public.bench_single_items;
CREATE TABLE public.bench_fleet_items (tenant_id text NOT NULL, id bigint NOT NULL, name text,
                                       written double precision, seen double precision, PRIMARY KEY (tenant_id, id));
CREATE TABLE public.bench_single_items (id bigint PRIMARY KEY, name text, written double precision,
                                        seen double precision);
CREATE OR REPLACE FUNCTION public.bench_fleet_seen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.seen := extract(epoch FROM clock_timestamp());
    RETURN NEW;
END $$;
CREATE TRIGGER bench_fleet_seen BEFORE INSERT ON public.bench_fleet_items
    FOR EACH ROW EXECUTE FUNCTION public.bench_fleet_seen();
CREATE TRIGGER bench_single_seen BEFORE INSERT ON public.bench_single_items
    FOR EACH ROW EXECUTE FUNCTION public.bench_fleet_seen();
GRANT ALL ON public.bench_fleet_items, public.bench_single_items TO service_role;
NOTIFY pgrst, 'reload schema';
"""
APP_SQL = """
PRAGMA journal_mode=WAL;
CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, written REAL);
"""
WRITERS = 4  # app processes sharing the files
BUSY_BASE = 100_000_000  # ids of phase 3's backlogs (phase 1's ids count up from 1 in every file)
SETTLE_TIMEOUT = 120.0  # seconds to wait for a daemon to close its idle files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Setup:
    scratch: Path
    server: RunningDevServer
    files: int
    drain_threads: int | None
    glob_config: Path = field(init=False)
    single_config: Path = field(init=False)
    single_db: Path = field(init=False)

    @property
    def directory(self) -> Path:
        return self.scratch / "tenants"

    def path(self, i: int) -> Path:
        return self.directory / f"{tenant(i)}.sqlite3"

    def build(self) -> float:
        """Target tables, N tenant files and the single file, both configurations, `syncd install` of each; the
        seconds the glob's install took."""
        with psycopg.connect(self.server.pg_url, autocommit=True) as pg:
            pg.execute(TARGET_SQL)
        self.directory.mkdir()
        for i in range(self.files):
            create_app_file(self.path(i))
        self.single_db = self.scratch / "single.sqlite3"
        create_app_file(self.single_db)
        threads = "" if self.drain_threads is None else f"drain_threads = {self.drain_threads}\n"
        common = (f'[target]\nurl = "{self.server.url}"\njwt_secret = "{self.server.jwt_secret}"\n'
                  f'[worker]\n{threads}metrics_addr = "127.0.0.1:{{port}}"\n[[table]]\nname = "item"\n')
        self.glob_config = self.scratch / "fleet.toml"
        self.glob_config.write_text('[source]\nglob = "tenants/*.sqlite3"\ntenant = "{stem}"\n'
                                    'tenant_column = "tenant_id"\n' + common.format(port=free_port())
                                    + 'target = "bench_fleet_items"\n')
        self.single_config = self.scratch / "single.toml"
        self.single_config.write_text(f'[source]\npath = "{self.single_db}"\n' + common.format(port=free_port())
                                      + 'target = "bench_single_items"\n')
        time.sleep(0.5)  # the dev server reloads its schema cache
        started = time.perf_counter()
        syncd("install", self.glob_config)
        took = time.perf_counter() - started
        syncd("install", self.single_config)
        return took

    def start(self, config: Path, name: str) -> Daemon:
        log = (self.scratch / f"{name}.log").open("w")
        process = subprocess.Popen([sys.executable, "-m", "syncd", "run", "--config", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=log)
        return Daemon(process, log, self.scratch / f"{name}.log", self.directory)


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log: Any
    log_path: Path
    directory: Path

    def processes(self) -> list[psutil.Process]:
        main = psutil.Process(self.process.pid)
        return [main, *main.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            with_children = p.cpu_times()
            total += with_children.user + with_children.system
        return total

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes())

    def open_files(self) -> int:
        """Tenant files (or their WAL) the daemon has open now."""
        prefix = str(self.directory)
        return sum(1 for f in psutil.Process(self.process.pid).open_files() if f.path.startswith(prefix))

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"syncd run exited with {self.process.returncode}: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def warnings(self) -> int:
        self.log.flush()
        return sum(1 for line in self.log_path.read_text().splitlines()
                   if '"level": "warning"' in line or '"level": "error"' in line
                   or "[warning" in line or "[error" in line)


def tenant(i: int) -> str:
    return f"t{i:05d}"


def create_app_file(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(APP_SQL)
    db.close()


def syncd(command: str, config: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "syncd", command, "--config", str(config)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"syncd {command} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


# -- 1. lag ------------------------------------------------------------------------------------------------------


def writer(paths: list[str], offsets: list[float], period: float, start_at: float, end_at: float,
           window: tuple[float, float], results: Any) -> None:
    """An app process: commit one row into each of `paths` every `period` seconds, file k first at
    start_at + offsets[k], until end_at; put (commits, commits in the window, lateness of every commit) on
    `results`."""
    conns = []
    for path in paths:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous=NORMAL")
        conns.append(conn)
    ids = [0] * len(paths)
    due = [(start_at + offset, k) for k, offset in enumerate(offsets)]
    heapq.heapify(due)
    late: list[float] = []
    in_window = 0
    errors = 0
    while due:
        at, k = heapq.heappop(due)
        if at >= end_at:
            continue
        wait = at - time.time()
        if wait > 0:
            time.sleep(wait)
        ids[k] += 1
        written = time.time()
        try:
            conns[k].execute("INSERT INTO item (id, name, written) VALUES (?, 'lag', ?)", (ids[k], written))
        except sqlite3.OperationalError:
            errors += 1
            ids[k] -= 1
        else:
            late.append(written - at)
            if window[0] <= written < window[1]:
                in_window += 1
        heapq.heappush(due, (at + period, k))
    for conn in conns:
        conn.close()
    results.put((sum(ids), in_window, errors, late))


def lag(setup: Setup, daemon: Daemon, rate: float, warmup: float, seconds: float) -> dict[str, float]:
    n = setup.files
    period = 1 / rate
    start_at = time.time() + 3.0  # the writers' processes start and open their files meanwhile
    window = (start_at + warmup, start_at + warmup + seconds)
    end_at = window[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    writers = []
    for w in range(WRITERS):
        mine = list(range(w, n, WRITERS))
        writers.append(context.Process(target=writer, args=(
            [str(setup.path(i)) for i in mine], [period * i / n for i in mine], period, start_at, end_at, window,
            results)))
    for process in writers:
        process.start()
    time.sleep(max(0.0, window[0] - time.time()))
    cpu, wall = daemon.cpu_seconds(), time.perf_counter()
    time.sleep(max(0.0, window[1] - time.time()))
    cpu_share = (daemon.cpu_seconds() - cpu) / (time.perf_counter() - wall)
    peak_rss = daemon.rss()
    collected = [results.get(timeout=120) for _ in writers]
    for process in writers:
        process.join()
    committed = sum(c[0] for c in collected)
    in_window = sum(c[1] for c in collected)
    errors = sum(c[2] for c in collected)
    late = sorted(x for c in collected for x in c[3])
    # Wait until every row committed in the window is in PostgreSQL (or a minute more).
    caught_up = time.time()
    with psycopg.connect(setup.server.pg_url, autocommit=True) as pg:
        count_sql = "SELECT count(*) FROM public.bench_fleet_items WHERE written >= %s AND written < %s"
        while True:
            row = pg.execute(count_sql, window).fetchone()
            seen = int(row[0]) if row else 0
            if seen >= in_window or time.time() - caught_up > 60:
                break
            daemon.alive()
            time.sleep(0.2)
        drained_after = time.time() - end_at
        lags = sorted(float(r[0]) for r in pg.execute(
            "SELECT seen - written FROM public.bench_fleet_items WHERE written >= %s AND written < %s", window))
        total = pg.execute("SELECT count(*) FROM public.bench_fleet_items").fetchone()
    thirds = [lags_between(setup, window[0] + seconds * k / 3, window[0] + seconds * (k + 1) / 3) for k in range(3)]
    return {
        "files": n, "rate_per_file": rate, "offered_per_s": n * rate, "window_s": seconds,
        "committed": committed, "committed_in_window": in_window, "seen_in_window": len(lags),
        "app_errors": errors, "in_postgres": int(total[0]) if total else 0,
        "achieved_per_s": in_window / seconds,
        "p50_ms": pct(lags, 0.5) * 1000, "p99_ms": pct(lags, 0.99) * 1000, "max_ms": (lags[-1] if lags else 0) * 1000,
        "p99_by_third_ms": [pct(t, 0.99) * 1000 for t in thirds],
        "app_late_p99_ms": pct(late, 0.99) * 1000, "app_late_max_ms": (late[-1] if late else 0) * 1000,
        "daemon_cpu_pct": cpu_share * 100, "daemon_rss_mb": peak_rss / 2**20,
        "drained_after_s": drained_after,
    }


def lags_between(setup: Setup, low: float, high: float) -> list[float]:
    with psycopg.connect(setup.server.pg_url, autocommit=True) as pg:
        return sorted(float(r[0]) for r in pg.execute(
            "SELECT seen - written FROM public.bench_fleet_items WHERE written >= %s AND written < %s", (low, high)))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, int(len(values) * q + 0.5) - 1))]


# -- 2. idle -----------------------------------------------------------------------------------------------------


def settle(daemon: Daemon) -> tuple[float, int]:
    """Wait until the daemon closed its idle files (none open for 2 s in a row, or SETTLE_TIMEOUT); (seconds it
    took, files still open)."""
    started = time.perf_counter()
    quiet_since: float | None = None
    open_now = daemon.open_files()
    while time.perf_counter() - started < SETTLE_TIMEOUT:
        daemon.alive()
        open_now = daemon.open_files()
        now = time.perf_counter()
        if open_now == 0:
            quiet_since = quiet_since or now
            if now - quiet_since >= 2:
                break
        else:
            quiet_since = None
        time.sleep(0.5)
    return time.perf_counter() - started, open_now


def idle(daemon: Daemon, seconds: float) -> dict[str, float]:
    settled, still_open = settle(daemon)
    cpu, wall = daemon.cpu_seconds(), time.perf_counter()
    peak = 0
    while time.perf_counter() - wall < seconds:
        peak = max(peak, daemon.rss())
        time.sleep(0.5)
    share = (daemon.cpu_seconds() - cpu) / (time.perf_counter() - wall)
    return {"settle_s": settled, "files_open": still_open, "cpu_pct": share * 100, "rss_mb": peak / 2**20,
            "threads": psutil.Process(daemon.process.pid).num_threads(),
            "fds": psutil.Process(daemon.process.pid).num_fds()}


# -- 3. one busy tenant ------------------------------------------------------------------------------------------


def backlog_round(pg: psycopg.Connection, db: Path, daemon: Daemon, table: str, where: str, base: int,
                  rows: int) -> tuple[float, float]:
    """Commit `rows` rows in one transaction into `db`; (rows/s from the commit until `table` holds them all, the
    daemon's CPU seconds per 1,000 rows)."""
    conn = sqlite3.connect(db, timeout=30)
    with conn:
        conn.executemany("INSERT INTO item (id, name, written) VALUES (?, ?, ?)",
                         ((i, f"busy-{i}", 0.0) for i in range(base, base + rows)))
    conn.close()
    started, cpu = time.perf_counter(), daemon.cpu_seconds()
    query = f"SELECT count(*) FROM public.{table} WHERE {where} id >= %s AND id < %s"
    while True:
        row = pg.execute(query, (base, base + rows)).fetchone()
        if row and int(row[0]) >= rows:
            break
        if time.perf_counter() - started > 900:
            raise RuntimeError(f"{table}: only {row[0] if row else 0} of {rows} rows after 900 s: {daemon.tail()}")
        daemon.alive()
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    return rows / elapsed, (daemon.cpu_seconds() - cpu) / rows * 1000


def busy_tenant(setup: Setup, fleet: Daemon, rows: int, rounds: int) -> dict[str, Any]:
    single = setup.start(setup.single_config, "single")
    time.sleep(3)
    single.alive()
    busy = setup.path(0)
    glob_rates: list[float] = []
    single_rates: list[float] = []
    glob_cpu: list[float] = []
    single_cpu: list[float] = []
    try:
        with psycopg.connect(setup.server.pg_url, autocommit=True) as pg:
            for r in range(rounds):
                base = BUSY_BASE + r * rows
                order = ("glob", "single") if r % 2 == 0 else ("single", "glob")
                for mode in order:
                    if mode == "glob":
                        rate, cpu = backlog_round(pg, busy, fleet, "bench_fleet_items",
                                                  f"tenant_id = '{tenant(0)}' AND", base, rows)
                        glob_rates.append(rate)
                        glob_cpu.append(cpu)
                    else:
                        rate, cpu = backlog_round(pg, setup.single_db, single, "bench_single_items", "", base, rows)
                        single_rates.append(rate)
                        single_cpu.append(cpu)
                    print(f"   round {r + 1} {mode:6}: {rate:9,.0f} rows/s, {cpu:.2f} CPU s per 1,000 rows",
                          flush=True)
                    time.sleep(2)
    finally:
        single.stop()
    g, s = statistics.median(glob_rates), statistics.median(single_rates)
    return {"rows": rows, "rounds": rounds, "glob_rates": glob_rates, "single_rates": single_rates,
            "glob_rows_per_s": g, "single_rows_per_s": s, "ratio": g / s,
            "glob_cpu_s_per_1000": statistics.median(glob_cpu), "single_cpu_s_per_1000": statistics.median(single_cpu)}


# -- the whole ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2.0, help="single-row commits per second in every file")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--window", type=float, default=30.0, help="seconds of phase 1's measuring window")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--drain-threads", type=int, default=None, help="[worker] drain_threads (default: syncd's)")
    parser.add_argument("--quick", action="store_true", help="100 files, 10 s windows, 10,000 rows, 2 rounds")
    parser.add_argument("--json", type=Path, help="write the results there")
    parser.add_argument("--keep", type=Path, help="build in this (new) directory and keep it (the daemons' logs)")
    args = parser.parse_args()
    if args.quick:
        args.files, args.warmup, args.window, args.idle_seconds, args.rows, args.rounds = 100, 5, 10, 10, 10_000, 2
    results: dict[str, Any] = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "cpus": os.cpu_count()}
    server = launch(["--port", "0"])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            scratch = args.keep or Path(tmp)
            scratch.mkdir(parents=True, exist_ok=True)
            setup = Setup(scratch, server, args.files, args.drain_threads)
            took = setup.build()
            results["install_s"] = took
            print(f"{args.files:,} tenant files built and installed (syncd install over the glob: {took:.1f} s)",
                  flush=True)
            fleet = setup.start(setup.glob_config, "fleet")
            try:
                time.sleep(2)
                fleet.alive()
                print(f"1. lag: {args.files:,} files x {args.rate:g} commits/s, {args.warmup:g} s warm-up, "
                      f"{args.window:g} s window", flush=True)
                results["lag"] = lag(setup, fleet, args.rate, args.warmup, args.window)
                print(f"   {json.dumps(results['lag'])}", flush=True)
                print("2. idle: the same daemon, its files closed", flush=True)
                results["idle_after"] = idle(fleet, args.idle_seconds)
                print(f"   {json.dumps(results['idle_after'])}", flush=True)
                results["warnings_fleet"] = fleet.warnings()
            finally:
                fleet.stop()
            fleet = setup.start(setup.glob_config, "fleet-fresh")
            try:
                print(f"   a fresh daemon over the {args.files:,} idle files", flush=True)
                results["idle_fresh"] = idle(fleet, args.idle_seconds)
                print(f"   {json.dumps(results['idle_fresh'])}", flush=True)
                print(f"3. one busy tenant among {args.files - 1:,} idle: {args.rows:,} rows, {args.rounds} rounds "
                      "each, interleaved", flush=True)
                results["busy"] = busy_tenant(setup, fleet, args.rows, args.rounds)
                results["warnings_fresh"] = fleet.warnings()
            finally:
                fleet.stop()
    finally:
        server.stop()
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def report(r: dict[str, Any]) -> None:
    lag_, after, fresh, busy = r["lag"], r["idle_after"], r["idle_fresh"], r["busy"]
    print()
    print(f"syncd run over {lag_['files']:,} files ({r['cpus']} CPUs)               result          goal")
    print(f"1. lag p50 / p99 (max)                       {lag_['p50_ms']:7.0f} / {lag_['p99_ms']:.0f} ms "
          f"({lag_['max_ms']:.0f})   p99 <= 1000 ms")
    print(f"   p99 by third of the window                {' / '.join(f'{x:.0f}' for x in lag_['p99_by_third_ms'])} ms")
    print(f"   rows: committed in window / seen          {lag_['committed_in_window']:,} / {lag_['seen_in_window']:,}"
          f"  ({lag_['achieved_per_s']:,.0f}/s of {lag_['offered_per_s']:,.0f}/s offered; app late p99 "
          f"{lag_['app_late_p99_ms']:.0f} ms)")
    print(f"   daemon CPU while shipping                 {lag_['daemon_cpu_pct']:7.1f} % of a core, RSS "
          f"{lag_['daemon_rss_mb']:.0f} MB")
    print(f"2. idle CPU, after the lag run / fresh       {after['cpu_pct']:7.2f} / {fresh['cpu_pct']:.2f} % of a core"
          "    < 5 %")
    print(f"   idle RSS, after the lag run / fresh       {after['rss_mb']:7.0f} / {fresh['rss_mb']:.0f} MB"
          "             <= 300 MB")
    print(f"   files still open, threads, fds (fresh)    {fresh['files_open']}, {fresh['threads']}, {fresh['fds']}")
    print(f"3. busy tenant: glob / single-file           {busy['glob_rows_per_s']:7,.0f} / "
          f"{busy['single_rows_per_s']:,.0f} rows/s")
    print(f"   ratio (medians of {busy['rounds']} interleaved rounds)      {busy['ratio']:7.2f}"
          "                       >= 0.8")
    print(f"   CPU s per 1,000 rows: glob / single       {busy['glob_cpu_s_per_1000']:7.3f} / "
          f"{busy['single_cpu_s_per_1000']:.3f}")


if __name__ == "__main__":
    main()
