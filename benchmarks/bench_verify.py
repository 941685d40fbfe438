"""Benchmark of `syncd verify` against `syncd dev-server` on this machine, measured side by side.

For each table size (default 100,000 and 1,000,000 rows, equal on both sides):
- the wall time of the whole `syncd verify` process, divided by the time a bare client takes to stream the
  same two sides with the same keyset pages (SQLite SELECTs and HTTP GETs with JSON decoding, nothing else):
  what mapping, canonicalising, hashing and the scratch-file join cost on top of reading;
- the peak RSS of the `syncd verify` process (sampled every 20 ms): it should not grow with the table.

    python benchmarks/bench_verify.py [--sizes 100000,1000000] [--page 5000]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psycopg
from bench_run import peak_rss

from syncd.devserver.launcher import RunningDevServer, launch

TARGET_SQL = """
DROP TABLE IF EXISTS public.bench_verify;
CREATE TABLE public.bench_verify (id bigint PRIMARY KEY, name text, qty integer, price double precision,
                                  doc jsonb, made timestamptz);
GRANT ALL ON public.bench_verify TO service_role;
NOTIFY pgrst, 'reload schema';
"""


def build(scratch: Path, server: RunningDevServer, rows: int, page: int) -> Path:
    db = scratch / f"app{rows}.sqlite3"
    conn = sqlite3.connect(db)
    conn.executescript("PRAGMA journal_mode=WAL; CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
                       "price REAL, doc TEXT, made INTEGER)")
    values = [(i, f"name-{i}", i % 97, i * 0.5, json.dumps({"i": i, "tags": ["a", "b"]}), 1_700_000_000 + i)
              for i in range(rows)]
    with conn:
        conn.executemany("INSERT INTO item VALUES (?, ?, ?, ?, ?, ?)", values)
    with psycopg.connect(server.pg_url, autocommit=True) as pg:
        pg.execute(TARGET_SQL)
        with pg.cursor().copy("COPY public.bench_verify FROM STDIN") as copy:
            for i, name, qty, price, doc, made in values:
                copy.write_row((i, name, qty, price, doc, datetime.fromtimestamp(made, UTC)))
    config = scratch / f"syncd{rows}.toml"
    config.write_text(f'[source]\npath = "{db}"\n[target]\nurl = "{server.url}"\njwt_secret = "{server.jwt_secret}"\n'
                      '[[table]]\nname = "item"\ntarget = "bench_verify"\n[table.columns.doc]\ntransform = "json"\n'
                      '[table.columns.made]\ntransform = "timestamp"\n')
    subprocess.run([sys.executable, "-m", "syncd", "install", "--config", str(config)], check=True,
                   capture_output=True)
    time.sleep(1.0)  # the schema cache reload
    return config


def run_verify(config: Path, page: int) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, last line of output) of one `syncd verify` process."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "syncd", "verify", "--config", str(config), "--page-size",
                                str(page)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = peak_rss(process, every=0.02)
    out = process.stdout.read() if process.stdout else ""
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"verify failed ({process.returncode}): {out}")
    return elapsed, peak / 2**20, out.strip().splitlines()[-1]


def stream_raw(server: RunningDevServer, db: Path, page: int) -> float:
    """Read both sides with the same pages and do nothing with the rows: the floor of any comparison."""
    started = time.perf_counter()
    conn = sqlite3.connect(db)
    last = -1
    while rows := conn.execute("SELECT quote(id), id, name, qty, price, doc, made FROM item WHERE id > ? "
                               "ORDER BY id LIMIT ?", (last, page)).fetchall():
        last = rows[-1][1]
    with httpx.Client(headers={"Authorization": f"Bearer {server.service_key}"}) as client:
        after = None
        while True:
            url = (f"{server.url}/bench_verify?select=doc,id,made,name,price,qty&order=id.asc&limit={page}"
                   + (f"&or=(id.gt.\"{after}\")" if after is not None else ""))
            rows = client.get(url).json()
            if len(rows) < page:
                break
            after = rows[-1]["id"]
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--page", type=int, default=5000)
    args = parser.parse_args()
    server = launch(["--port", "0"])
    try:
        with tempfile.TemporaryDirectory() as scratch:
            print(f"{'rows':>10} {'verify s':>9} {'raw s':>7} {'verify/raw':>10} {'rows/s':>9} {'peak RSS':>9}")
            for rows in (int(size) for size in args.sizes.split(",")):
                config = build(Path(scratch), server, rows, args.page)
                raw = stream_raw(server, Path(scratch) / f"app{rows}.sqlite3", args.page)
                seconds, rss, last = run_verify(config, args.page)
                assert "1 table(s) equal" in last, last
                print(f"{rows:>10,} {seconds:>9.1f} {raw:>7.1f} {seconds / raw:>10.2f} {rows / seconds:>9,.0f} "
                      f"{rss:>7.0f}MB", flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
