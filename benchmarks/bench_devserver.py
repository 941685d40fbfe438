"""Benchmark: rows/s of 1,000-row bulk upserts of 5-column rows through `syncd dev-server`.

Measured side by side in one run, rounds interleaved, against the floor that no HTTP layer can beat:
the very same SQL statement (INSERT ... SELECT FROM json_populate_recordset ... ON CONFLICT DO UPDATE)
sent by psycopg straight to the same PostgreSQL. The ratio says how much of PostgreSQL's own upsert
throughput reaches a client through the dev server; the absolute figure says whether the dev server
could be what limits syncd (the aim is 20,000 rows/s or more on 2 cores).

    python benchmarks/bench_devserver.py [--batches 20] [--rows 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import httpx
import psycopg

from syncd.devserver.launcher import launch

TABLE_SQL = """
DROP TABLE IF EXISTS public.bench_upsert;
CREATE TABLE public.bench_upsert (id bigint PRIMARY KEY, a text, b integer, c double precision, d boolean);
GRANT ALL ON public.bench_upsert TO service_role;
NOTIFY pgrst, 'reload schema';
"""
DIRECT_SQL = """
INSERT INTO public.bench_upsert AS t (id, a, b, c, d)
SELECT r.id, r.a, r.b, r.c, r.d FROM json_populate_recordset(NULL::public.bench_upsert, %s::json) AS r
ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id, a = EXCLUDED.a, b = EXCLUDED.b, c = EXCLUDED.c, d = EXCLUDED.d
"""


def batch_bodies(batches: int, rows: int, round_no: int) -> list[str]:
    """Half of each batch's keys are new and half already exist, so both insert and update paths run."""
    bodies = []
    for n in range(batches):
        base = (n * rows) // 2 + round_no * 10_000_000
        body = [{"id": base + i, "a": f"text-{base + i}", "b": i, "c": i / 3, "d": i % 2 == 0} for i in range(rows)]
        bodies.append(json.dumps(body))
    return bodies


def timed(run: Callable[[list[str]], None], bodies: list[str]) -> float:
    started = time.perf_counter()
    run(bodies)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    server = launch(["--port", "0"])
    try:
        with psycopg.connect(server.pg_url, autocommit=True) as admin:
            admin.execute(TABLE_SQL)
        time.sleep(0.5)  # let the schema cache reload
        headers = {"Prefer": "resolution=merge-duplicates, return=minimal", "Content-Type": "application/json"}
        client = httpx.Client(base_url=server.url, timeout=60,
                              headers={"Authorization": f"Bearer {server.service_key}", **headers})
        direct = psycopg.connect(server.pg_url, autocommit=True)

        def via_http(bodies: list[str]) -> None:
            for body in bodies:
                response = client.post("/bench_upsert?on_conflict=id", content=body)
                assert response.status_code in (200, 201), response.text

        def via_sql(bodies: list[str]) -> None:
            for body in bodies:
                direct.execute(DIRECT_SQL, [body])

        via_http(batch_bodies(3, args.rows, 99))  # warm up both paths
        via_sql(batch_bodies(3, args.rows, 98))
        rows = args.batches * args.rows
        http_rates, sql_rates = [], []
        for round_no in range(args.rounds):
            http_rates.append(rows / timed(via_http, batch_bodies(args.batches, args.rows, 2 * round_no)))
            sql_rates.append(rows / timed(via_sql, batch_bodies(args.batches, args.rows, 2 * round_no + 1)))
        direct.close()
        client.close()
    finally:
        server.stop()

    http_rate, sql_rate = statistics.median(http_rates), statistics.median(sql_rates)
    print(f"{args.rounds} rounds x {args.batches} upserts of {args.rows} rows (5 columns), medians:")
    print(f"  dev server over HTTP : {http_rate:10,.0f} rows/s")
    print(f"  same SQL, direct     : {sql_rate:10,.0f} rows/s")
    print(f"  ratio HTTP / direct  : {http_rate / sql_rate:10.2f}")


if __name__ == "__main__":
    main()
