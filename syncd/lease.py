"""The lease: the right to drain one database file, so two daemons never drain it at once (DESIGN.md,
invariant 5). Modelled on litestream's leaser: a lease that is acquired, renewed and released, and an error
that says another holder has it.

The lease is one meta row of the state file (never the app's file), taken or renewed by one atomic
compare-and-set statement: one daemon holds it and renews it; a holder that died stops renewing, and once
`expires_at` has passed another may take it. A daemon that finds it held stands by and tries again every third
of the lease's lifetime.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import apsw

from syncd import outbox

__all__ = ["DEFAULT_LEASE_SECONDS", "Lease", "LeaseHeld", "LeaseInfo", "read_lease"]

LEASE_KEY = "lease"
DEFAULT_LEASE_SECONDS = 30.0


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds the lease (a random id, the host and pid for people) and until when (unix seconds)."""

    holder: str
    host: str
    pid: int
    expires_at: float
    metrics: str | None = None  # the holder's metrics address (host:port), where `syncd status` asks /readyz

    def alive(self, now: float) -> bool:
        """Whether the lease is still held at `now` (unix seconds): it has not expired."""
        return self.expires_at > now

    def holder_gone(self) -> bool:
        """Whether the holder is known to have died: it ran on this host and its pid runs no more (a lease outlives a
        killed daemon until it expires). False when it cannot be told (another host or container)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # it exists, but is another user's
            return False
        return False


class LeaseHeld(Exception):
    """Another live daemon holds the lease (litestream: ErrLeaseAlreadyHeld); `holder` says which."""

    def __init__(self, holder: LeaseInfo | None) -> None:
        where = f" ({holder.host} pid {holder.pid})" if holder else ""
        super().__init__(f"another daemon holds the lease{where}")
        self.holder = holder


def read_lease(conn: apsw.Connection) -> LeaseInfo | None:
    """The lease as recorded, alive or expired; None when nobody has taken it (or it was released)."""
    value = outbox.get_meta(conn, LEASE_KEY)
    if value is None:
        return None
    data = json.loads(value)
    return LeaseInfo(data["holder"], data["host"], int(data["pid"]), float(data["expires_at"]), data.get("metrics"))


class Lease:
    """One daemon's lease on a database file, `seconds` long, held as `holder` (a random id by default).
    `acquire` and `renew` are the same step: take or extend; `keep` is what the drain loop calls: renew when a
    third of the lifetime has passed (measured on `clock`)."""

    def __init__(self, conn: apsw.Connection, seconds: float = DEFAULT_LEASE_SECONDS, holder: str | None = None,
                 clock: Callable[[], float] = time.monotonic, metrics: str | None = None) -> None:
        self.conn = conn
        self.metrics = metrics
        self.seconds = seconds
        self.holder = holder or uuid.uuid4().hex
        self._clock = clock
        self._renew_at = 0.0

    @property
    def retry_after(self) -> float:
        """Seconds a daemon standing by waits before trying again."""
        return self.seconds / 3

    def acquire(self, now: float | None = None) -> bool:
        """Take the lease until `now` + `seconds` (unix seconds; `now` defaults to the current time) if it is
        free, expired or already ours; False while another live holder has it. Raises apsw.BusyError when the
        app holds the write lock past the busy timeout."""
        now = time.time() if now is None else now
        value = {"holder": self.holder, "host": socket.gethostname(), "pid": os.getpid(),
                 "expires_at": now + self.seconds, "metrics": self.metrics}
        return outbox.take_meta(self.conn, LEASE_KEY, json.dumps(value), unless_held_by_other=(self.holder, now))

    renew = acquire

    def keep(self) -> None:
        """Hold the lease: renew it when a third of its lifetime has passed since the last renewal (each
        renewal is a write the app may wait for), otherwise nothing. Raises LeaseHeld while another daemon
        holds it, apsw.BusyError when the app holds the write lock past the busy timeout."""
        now = self._clock()
        if now < self._renew_at:
            return
        if not self.renew():
            self._renew_at = 0.0
            raise LeaseHeld(read_lease(self.conn))
        self._renew_at = now + self.retry_after

    def ours(self, now: float | None = None) -> bool:
        """Whether the lease is this daemon's now, alive (`now`: unix seconds, the current time by default)."""
        held = read_lease(self.conn)
        return held is not None and held.holder == self.holder and held.alive(time.time() if now is None else now)

    def release(self) -> None:
        """Give the lease up at a clean shutdown so the next daemon need not wait for expiry."""
        outbox.delete_meta(self.conn, LEASE_KEY, holder=self.holder)
