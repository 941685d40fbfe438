"""The loop's timers: what it does now and then rather than at every turn. The backlog measured and the journal
expired (`housekeeping`), and, while idle, a read of no rows that tells whether the secondary answers (`probe`):
an idle daemon still says in /readyz and `syncd_target_up` when the secondary is down."""

from __future__ import annotations

import time

import apsw

from syncd import outbox
from syncd.observer import Observer
from syncd.plan import Plan
from syncd.settings import Settings
from syncd.target import TargetError

__all__ = ["HOUSEKEEPING_EVERY", "JOURNAL_EXPIRY_EVERY", "PROBE_EVERY", "PROBE_RETRY", "Timers"]

HOUSEKEEPING_EVERY = 2.0
JOURNAL_EXPIRY_EVERY = 300.0
PROBE_EVERY = 30.0  # seconds without an exchange before an idle daemon checks that the secondary answers
PROBE_RETRY = 5.0  # ... and while it does not


class Timers:
    """When housekeeping, journal expiry (unix seconds) and the next probe (monotonic seconds) are due."""

    def __init__(self, plan: Plan, settings: Settings, observer: Observer) -> None:
        self.plan = plan
        self.settings = settings
        self.observer = observer
        self.next_housekeeping = 0.0
        self.next_journal_expiry = 0.0
        self.next_probe = 0.0

    def housekeeping(self, conn: apsw.Connection) -> None:
        """Measure the backlog and expire old journal rows, now and then (both scan tables: a backlog of millions
        is measured less often, so that counting it never takes more than a tenth of the loop's time)."""
        now = time.time()
        if now >= self.next_housekeeping:
            self.observer.backlog(self.plan.mappings, outbox.pending_by_table(conn), outbox.dead_letters_by_table(conn),
                                  now)
            took = time.time() - now
            self.next_housekeeping = time.time() + max(HOUSEKEEPING_EVERY, 10 * took)
        if now >= self.next_journal_expiry:
            self.next_journal_expiry = now + JOURNAL_EXPIRY_EVERY
            outbox.expire_journal(conn, now - self.settings.config.worker.journal_retention_days * 86400)

    def exchanged(self) -> None:
        """The secondary just answered a request: no probe for PROBE_EVERY seconds."""
        self.next_probe = time.monotonic() + PROBE_EVERY

    def probe_due(self) -> bool:
        return time.monotonic() >= self.next_probe

    def probe(self, table: str) -> None:
        """Read no rows of `table` (PROBE_RETRY seconds before the next try while it fails, else PROBE_EVERY)."""
        now = time.monotonic()
        try:
            self.settings.target.ping(self.plan.mappings[table].target)
        except TargetError as error:
            self.next_probe = now + PROBE_RETRY
            self.observer.secondary_checked(table, error)
            return
        self.next_probe = now + PROBE_EVERY
        self.observer.secondary_checked(table, None)
