"""DESIGN.md's invariant 4, end to end: syncd never makes the application's own transactions fail. The app is a
separate process (as beside the sidecar) running read-then-write transactions that begin DEFERRED (Django's
atomic(), an explicit BEGIN): SQLite refuses such a transaction's write at once when another connection
committed after its read, so every commit syncd makes to the app's file is a chance to break one
(../shared/field-cases/24)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.e2e import App, pending, poll, source, target, wait_converged

APP = r"""
import json, sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
ok = failed = 0
end, i = time.time() + float(sys.argv[2]), 0
while time.time() < end:
    i += 1
    try:
        conn.execute("BEGIN")
        (v,) = conn.execute("SELECT name FROM parent WHERE id = ?", (i % 50,)).fetchone()
        conn.execute("UPDATE parent SET name = ? WHERE id = ?", (f"{v[:20]}.{i}", i % 50))
        conn.execute("COMMIT")
        ok += 1
    except sqlite3.OperationalError:
        conn.execute("ROLLBACK")
        failed += 1
    time.sleep(0.005)
print(json.dumps({"ok": ok, "failed": failed}))
"""

pytestmark = pytest.mark.serial  # failed app transactions are counted: no other test may load the CPU


def run_app(db: Path, seconds: float) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", APP, str(db), str(seconds)], capture_output=True, text=True,
                          check=True, timeout=seconds + 30)
    return json.loads(done.stdout)


def test_deferred_read_then_write_transactions_never_fail_while_syncd_ships(app: App, pg: psycopg.Connection):
    """Field case 24: ~150 transactions/s; with syncd shipping every one of them, none fails (without syncd none
    does either), and the secondary ends equal."""
    app.connect().executemany("INSERT INTO parent VALUES (?, 'p')", [(i,) for i in range(50)])
    assert run_app(app.db, 2)["failed"] == 0  # the app alone
    daemon = app.start()
    try:
        poll(f"http://{app.metrics}/readyz", lambda r: r.status_code == 200)
        result = run_app(app.db, 8)
        assert result["ok"] > 500 and result["failed"] == 0, result
        wait_converged(app, pg)
        assert target(pg, "SELECT id, name FROM e2e_parents") == source(app.db, "SELECT id, name FROM parent")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    assert pending(app) == 0  # and the shipped entries have left the app's outbox

