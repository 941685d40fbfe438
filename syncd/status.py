"""`syncd status`: how far behind the secondary is, and whether anything needs an operator.

Read from the SQLite file alone (outbox, dead letters, meta, the schema), in one read transaction, so
it works with the secondary unreachable and while the daemon runs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import apsw

from syncd import capture, outbox
from syncd.config import Config
from syncd.lease import read_lease
from syncd.timeparse import format_age

DEFAULT_MAX_LAG_SECONDS = 300.0


@dataclass
class TableStatus:
    """One configured table in `syncd status`: its backlog, dead letters, last shipment, triggers, and the problems
    an operator must act on."""

    name: str
    target: str
    pending: int = 0
    oldest_pending_age: float | None = None  # seconds
    dead_letters: int = 0
    last_shipped_at: float | None = None  # unix seconds
    last_error: str | None = None
    halted: bool = False
    triggers: str = "ok"  # ok | missing | outdated | not installed | invalid
    problems: list[str] = field(default_factory=list)


@dataclass
class Status:
    """What `syncd status` reports about one database file: whether syncd is installed, the lease as recorded (with
    `alive`), each configured table, and problems not tied to a table."""

    database: str
    installed: bool
    lease: dict[str, object] | None
    tables: list[TableStatus]
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No problem anywhere (`syncd status` exits 1 otherwise)."""
        return not self.problems and not any(t.problems for t in self.tables)

    def as_dict(self) -> dict[str, object]:
        """The `--json` form: every field (tables as dicts too), and `healthy`."""
        return {**asdict(self), "healthy": self.healthy}


def collect(conn: apsw.Connection, config: Config, *, max_lag: float = DEFAULT_MAX_LAG_SECONDS,
            now: float | None = None) -> Status:
    """The status, read from the SQLite file alone in one read transaction: each configured table's backlog, dead
    letters, triggers and recorded state. A change pending longer than `max_lag` seconds is a problem; `now` is unix
    seconds (default the current time)."""
    now = time.time() if now is None else now
    with conn:  # one read snapshot for every figure
        if not outbox.installed(conn):
            return not_installed(config)
        pending = outbox.pending_by_table(conn)
        dead = outbox.dead_letters_by_table(conn)
        lease = read_lease(conn)
        current = capture.existing_triggers(conn)
        tables = [table_status(conn, t.name, t.target_name, config, current, pending, dead, now, max_lag)
                  for t in config.tables]
    live = lease is not None and lease.alive(now)
    status = Status(str(config.source.path), True, {**asdict(lease), "alive": live} if lease else None, tables)
    configured = {t.name for t in tables}
    strays = sorted({table for table, _ in current.values()} - configured)
    status.problems += [f"table {t!r} has syncd triggers but is not configured (its changes pile up in the outbox); "
                        "configure it, or run syncd uninstall and install again" for t in strays]
    return status


def not_installed(config: Config) -> Status:
    """The status of a file where syncd is not installed: every table "not installed", with the command that installs
    it."""
    hint = "syncd is not installed in this database; run: syncd install"
    tables = [TableStatus(t.name, t.target_name, triggers="not installed", problems=[hint]) for t in config.tables]
    return Status(str(config.source.path), False, None, tables, [] if tables else ["no tables configured"])


def table_status(conn: apsw.Connection, name: str, target: str, config: Config,
                 current: dict[str, tuple[str, str]], pending: dict[str, outbox.Pending], dead: dict[str, int],
                 now: float, max_lag: float) -> TableStatus:
    """One table's status: its triggers against what the config and schema need now (`current`: {trigger name:
    (table, sql)}), its backlog in `pending` ({table: Pending}) and `dead` ({table: count}), and the daemon's
    recorded state; `now` in unix seconds, `max_lag` in seconds."""
    status = TableStatus(name, target)
    try:
        planned = capture.plan_table(conn, config.table(name))  # type: ignore[arg-type]
        expected = planned.triggers()
    except capture.CaptureError as exc:
        status.triggers = "invalid"
        status.problems.append(f"{exc} (the key column may have been renamed or dropped)")
        expected = {}
    installed_key = outbox.installed_key(conn, name)
    if expected and installed_key is not None and installed_key != planned.key:
        status.triggers = "outdated"
        status.problems.append(f"the key was {', '.join(installed_key)} at install and is now "
                               f"{', '.join(planned.key)} (renamed?); map the new name to the secondary's column "
                               "(rename in the config), then run: syncd install")
    if expected:
        missing = [n for n in expected if n not in current]
        outdated = [n for n in expected if n in current and current[n][1] != expected[n]]
        if missing:
            status.triggers = "missing"
            status.problems.append(f"trigger(s) {', '.join(missing)} missing: changes are NOT being captured; "
                                   "run: syncd install")
        elif outdated:
            status.triggers = "outdated"
            status.problems.append(f"trigger(s) {', '.join(outdated)} differ from what the config and schema need "
                                   "(key column renamed, key or unique index changed); run: syncd install")
    mine = pending.get(name)
    if mine:
        status.pending = mine.count
        status.oldest_pending_age = max(0.0, now - mine.oldest_at) if mine.oldest_at is not None else None
    if status.oldest_pending_age is not None and status.oldest_pending_age > max_lag:
        status.problems.append(f"oldest pending change is {status.oldest_pending_age:.0f} s old (more than "
                               f"{max_lag:.0f} s): is the daemon running and the secondary reachable?")
    status.dead_letters = dead.get(name, 0)
    if status.dead_letters:
        status.problems.append(f"{status.dead_letters} dead letter(s); fix the cause, then run: "
                               f"syncd replay --dead-letters --table {name}")
    state = outbox.table_state(conn, name)
    status.last_shipped_at = state.get("last_shipped_at")  # type: ignore[assignment]
    status.last_error = state.get("last_error")  # type: ignore[assignment]
    status.halted = bool(state.get("halted"))
    if status.halted:
        status.problems.append(f"shipping is halted: {status.last_error or 'see the daemon log'}")
    return status


def render(status: Status, now: float | None = None) -> str:
    """The human form of `syncd status`."""
    now = time.time() if now is None else now
    lines = [f"database: {status.database}"]
    lease = status.lease
    if lease and lease["alive"]:
        lines.append(f"daemon:   running on {lease['host']} pid {lease['pid']} (lease held)")
    else:
        lines.append("daemon:   no daemon holds the lease")
    header = ("TABLE", "TARGET", "PENDING", "OLDEST", "DEAD", "LAST SHIPPED", "TRIGGERS")
    rows = [header] + [(t.name, t.target, str(t.pending), format_age(t.oldest_pending_age), str(t.dead_letters),
                        format_age(now - t.last_shipped_at if t.last_shipped_at else None, " ago"), t.triggers)
                       for t in status.tables]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    problems = status.problems + [f"{t.name}: {p}" for t in status.tables for p in t.problems]
    lines.append("healthy" if not problems else "needs attention:")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
