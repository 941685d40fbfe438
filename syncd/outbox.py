"""The outbox side that the daemon and the operators share: the lease, and what is pending.

The lease is a row of `_syncd_meta` written in a short IMMEDIATE transaction: one daemon holds it
and renews it; a holder that died stops renewing, and once `expires_at` has passed another may take it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass

import apsw

from syncd.capture import unix_time
from syncd.sqlite import immediate

LEASE_KEY = "lease"
DEFAULT_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    expires_at: float

    def alive(self, now: float) -> bool:
        return self.expires_at > now


def read_lease(conn: apsw.Connection) -> LeaseInfo | None:
    row = conn.execute("SELECT value FROM _syncd_meta WHERE key = ?", (LEASE_KEY,)).fetchone()
    if row is None:
        return None
    data = json.loads(row[0])
    return LeaseInfo(data["holder"], data["host"], int(data["pid"]), float(data["expires_at"]))


class Lease:
    """The right to drain one database file. `acquire` and `renew` are the same step: take or extend."""

    def __init__(self, conn: apsw.Connection, seconds: float = DEFAULT_LEASE_SECONDS,
                 holder: str | None = None) -> None:
        self.conn = conn
        self.seconds = seconds
        self.holder = holder or uuid.uuid4().hex

    def acquire(self, now: float | None = None) -> bool:
        """Take the lease if it is free, expired or already ours; False while another live holder has it."""
        now = time.time() if now is None else now
        with immediate(self.conn):
            current = read_lease(self.conn)
            if current is not None and current.holder != self.holder and current.alive(now):
                return False
            value = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                     "expires_at": now + self.seconds}
            self.conn.execute("INSERT OR REPLACE INTO _syncd_meta (key, value) VALUES (?, ?)",
                              (LEASE_KEY, json.dumps(value)))
        return True

    renew = acquire

    def release(self) -> None:
        """Give the lease up at a clean shutdown so the next daemon need not wait for expiry."""
        with self.conn:
            self.conn.execute("DELETE FROM _syncd_meta WHERE key = ? AND json_extract(value, '$.holder') = ?",
                              (LEASE_KEY, self.holder))


@dataclass(frozen=True)
class Pending:
    count: int
    oldest_at: float | None  # unix seconds


def pending_by_table(conn: apsw.Connection) -> dict[str, Pending]:
    rows = conn.execute("SELECT tbl, count(*), min(at) FROM _syncd_outbox GROUP BY tbl")
    return {table: Pending(count, unix_time(oldest) if oldest is not None else None) for table, count, oldest in rows}


def dead_letters_by_table(conn: apsw.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT tbl, count(*) FROM _syncd_dead_letter GROUP BY tbl").fetchall())


def table_state(conn: apsw.Connection, table: str) -> dict[str, object]:
    """What the daemon last recorded for a table: last_shipped_at, last_error, halted (written by `run`)."""
    row = conn.execute("SELECT value FROM _syncd_meta WHERE key = ?", (f"state:{table}",)).fetchone()
    return json.loads(row[0]) if row else {}
