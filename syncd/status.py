"""`syncd status`: how far behind the secondary is, and whether anything needs an operator.

Read from the SQLite file (outbox, dead letters, meta, the schema), in one read transaction, so it works with
the secondary unreachable and while the daemon runs. When a live daemon holds the lease, its `/readyz` (at
`worker.metrics_addr`) is asked too, so what only the running daemon knows (the app holding the write lock, a
disk fault, the file gone, a table halted) shows here as well.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import apsw
import httpx

from syncd import capture, outbox
from syncd.auth import KeyInfo
from syncd.config import Config
from syncd.lease import read_lease
from syncd.metrics import local_url
from syncd.timeparse import format_age

DEFAULT_MAX_LAG_SECONDS = 300.0
READYZ_TIMEOUT_SECONDS = 1.0


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
    waiting: str | None = None  # which of its changes wait for a halted table they depend on (foreign keys)
    triggers: str = "ok"  # ok | missing | outdated | not installed | invalid
    reconcile: str | None = None  # why this table needs a reconcile with the secondary (None: it does not)
    last_repair: dict[str, object] | None = None  # the daemon's last repair of capture: {"at": unix s, "what": ...}
    last_reconcile: dict[str, object] | None = None  # {"at": unix seconds, "keys": enqueued}
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
    daemon: dict[str, object] | None = None  # the live daemon's /readyz answer: {"ready", "reason"} or {"error"}
    key: KeyInfo | None = None  # the kind of key syncd sends and its role ({"kind", "role"} in JSON), never the key
    consistency: str = "key"  # what a reader of the secondary may see: key or snapshot ([worker] consistency)

    @property
    def healthy(self) -> bool:
        """No problem anywhere (`syncd status` exits 1 otherwise)."""
        return not self.problems and not any(t.problems for t in self.tables)

    def as_dict(self) -> dict[str, object]:
        """The `--json` form: every field (tables as dicts too), and `healthy`."""
        return {**asdict(self), "healthy": self.healthy}


def collect(conn: apsw.Connection, config: Config, *, max_lag: float = DEFAULT_MAX_LAG_SECONDS,
            now: float | None = None, ask_daemon: bool = True) -> Status:
    """The status, read from the SQLite file alone in one read transaction: each configured table's backlog, dead
    letters, triggers and recorded state. A change pending longer than `max_lag` seconds is a problem; `now` is unix
    seconds (default the current time). `ask_daemon`: ask the live lease holder's /readyz (multi-file status asks
    each daemon once, for all its files)."""
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
    gone = lease is not None and live and lease.holder_gone()
    status = Status(str(config.source.path), True,
                    {**asdict(lease), "alive": live, "holder_gone": gone} if lease else None, tables)
    if gone and lease is not None:
        live = False
        status.problems.append(
            f"the daemon that holds the lease (pid {lease.pid}) no longer runs; its lease expires in "
            f"{max(0, lease.expires_at - now):.0f} s, then a new `syncd run` takes over (start one now: it waits "
            "for that)")
    status.key = config.target.key
    status.consistency = config.worker.consistency
    if config.target.key.kind == "publishable":
        status.problems.append("the key is a Supabase publishable key (sb_publishable_...): it acts as the anon role, "
                               "which RLS and the grants keep from writing what syncd ships; put a secret key "
                               "(sb_secret_...) in SUPABASE_SERVICE_KEY")
    configured = {t.name for t in tables}
    strays = sorted({table for table, _ in current.values()} - configured)
    status.problems += [f"table {t!r} has syncd triggers but is not configured (its changes pile up in the outbox); "
                        "configure it, or run syncd uninstall and install again" for t in strays]
    if live and lease is not None and ask_daemon:
        status.daemon = daemon_readiness(lease.metrics or config.worker.metrics_addr)
        if status.daemon.get("ready") is False:
            status.problems.append(f"the daemon is not ready: {status.daemon.get('reason')}")
    return status


def daemon_readiness(address: str) -> dict[str, object]:
    """The running daemon's `/readyz` at `address` (host:port; a wildcard host is asked on loopback): {"ready":
    bool, "reason": str}, or {"error": why it could not be asked} (another host or container, say)."""
    url = local_url(address, "/readyz")
    try:
        answer = httpx.get(url, timeout=READYZ_TIMEOUT_SECONDS).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": f"{url}: {type(exc).__name__}"}
    if not isinstance(answer, dict) or "ready" not in answer:
        return {"error": f"{url}: not syncd's /readyz"}
    readiness: dict[str, object] = {"ready": bool(answer["ready"]), "reason": str(answer.get("reason", ""))}
    if isinstance(answer.get("files"), dict):  # multi-file mode: {file: why it does not ship}
        readiness["files"] = {str(name): str(why) for name, why in answer["files"].items()}
    return readiness


def not_installed(config: Config) -> Status:
    """The status of a file where syncd is not installed: every table "not installed", with the command that installs
    it."""
    hint = "syncd is not installed in this database; run: syncd install"
    tables = [TableStatus(t.name, t.target_name, triggers="not installed", problems=[hint]) for t in config.tables]
    return Status(str(config.source.path), False, None, tables, [] if tables else ["no tables configured"],
                  consistency=config.worker.consistency)


def table_status(conn: apsw.Connection, name: str, target: str, config: Config,
                 current: dict[str, tuple[str, str]], pending: dict[str, outbox.Pending], dead: dict[str, int],
                 now: float, max_lag: float) -> TableStatus:
    """One table's status: its triggers against what the config and schema need now (`current`: {trigger name:
    (table, sql)}), its backlog in `pending` ({table: Pending}) and `dead` ({table: count}), and the daemon's
    recorded state; `now` in unix seconds, `max_lag` in seconds."""
    status = TableStatus(name, target)
    table_config = config.table(name)
    if table_config is None:
        raise KeyError(f"table {name!r} is not configured")
    health = capture.examine(conn, table_config, current)
    status.triggers = health.triggers
    if health.problem:
        status.problems.append(health.problem)
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
    status.last_shipped_at = recorded_number(state, "last_shipped_at")
    status.last_error = recorded_text(state, "last_error")
    status.halted = bool(state.get("halted"))
    if status.halted:
        status.problems.append(f"shipping is halted: {status.last_error or 'see the daemon log'}")
    status.waiting = recorded_text(state, "waiting")
    if status.waiting and not status.halted:
        status.problems.append(f"changes wait: {status.waiting} (foreign keys: shipped now, the secondary would "
                               "refuse them); they stay in the outbox and ship once it resumes (see its halt)")
    status.reconcile = recorded_text(state, "reconcile")
    if status.reconcile:
        when = ("once the table ships again (see the halt above)" if status.halted else
                f"`syncd run` does it; or run: syncd verify --repair --table {name}")
        status.problems.append(f"needs a reconcile with the secondary: {status.reconcile}; changes made meanwhile may "
                               f"be missing there: {when}")
    status.last_repair = recorded_record(state, "last_repair")
    status.last_reconcile = recorded_record(state, "last_reconcile")
    return status


def recorded_number(state: dict[str, object], name: str) -> float | None:
    """`state[name]` when the daemon recorded a number there, else None. The state is JSON in a file, which a syncd
    of another version may have written: what it holds is checked, not assumed."""
    value = state.get(name)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def age_of(record: dict[str, object], now: float) -> str:
    """How long ago (`now`, unix seconds) a recorded event ({"at": unix seconds, ...}) happened, as `status` says it."""
    at = recorded_number(record, "at")
    return format_age(None if at is None else now - at, " ago")


def recorded_text(state: dict[str, object], name: str) -> str | None:
    """`state[name]` when the daemon recorded a text there, else None (see `recorded_number`)."""
    value = state.get(name)
    return value if isinstance(value, str) else None


def recorded_record(state: dict[str, object], name: str) -> dict[str, object] | None:
    """`state[name]` when the daemon recorded an object there, else None (see `recorded_number`)."""
    value = state.get(name)
    return value if isinstance(value, dict) else None


CONSISTENCY_SHOWN = {
    "key": "per key (consistency = \"key\"): each row converges; a reader may see part of an app transaction",
    "snapshot": "whole snapshots (consistency = \"snapshot\"): every state of the secondary is one the file had",
}


def render(status: Status, now: float | None = None) -> str:
    """The human form of `syncd status`."""
    now = time.time() if now is None else now
    lines = [f"database: {status.database}"]
    lease = status.lease
    if lease and lease.get("holder_gone"):
        lines.append(f"daemon:   NOT RUNNING: pid {lease['pid']} on {lease['host']} died holding the lease")
    elif lease and lease["alive"]:
        lines.append(f"daemon:   running on {lease['host']} pid {lease['pid']} (lease held)")
        if status.daemon and "error" not in status.daemon:
            lines.append(f"          {'ready' if status.daemon['ready'] else 'NOT READY'}: {status.daemon['reason']}")
        elif status.daemon:
            lines.append(f"          its readiness is unknown: could not ask {status.daemon['error']} (another host "
                         "or container? ask its /readyz there)")
    else:
        lines.append("daemon:   no daemon holds the lease")
    if status.key:
        lines.append(f"key:      {status.key.describe()}")
    lines.append(f"ships:    {CONSISTENCY_SHOWN[status.consistency]}")
    header = ("TABLE", "TARGET", "PENDING", "OLDEST", "DEAD", "LAST SHIPPED", "TRIGGERS")
    rows = [header] + [(t.name, t.target, str(t.pending), format_age(t.oldest_pending_age), str(t.dead_letters),
                        format_age(now - t.last_shipped_at if t.last_shipped_at else None, " ago"), t.triggers)
                       for t in status.tables]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    for t in status.tables:
        if t.last_repair:
            lines.append(f"{t.name}: capture repaired {age_of(t.last_repair, now)}: "
                         f"{t.last_repair['what']}")
        if t.last_reconcile:
            lines.append(f"{t.name}: reconciled {age_of(t.last_reconcile, now)}: "
                         f"{t.last_reconcile['keys']} key(s) enqueued")
    problems = status.problems + [f"{t.name}: {p}" for t in status.tables for p in t.problems]
    lines.append("healthy" if not problems else "needs attention:")
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
