"""`syncd cutover`: the seed's "Phase 3: switch the primary to Supabase", checked before it is done.

Wait until the outbox is empty (the daemon ships it), refuse while dead letters remain or a table is
halted, verify every table, and only then say exactly what to change in the application's environment.
Nothing is written: the operator makes the switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import apsw

from syncd import outbox
from syncd.config import REST_PATH, Config
from syncd.lease import read_lease
from syncd.progress import ReporterFactory, Silent
from syncd.target import PostgrestTarget
from syncd.verify import Verification, verify

POLL_SECONDS = 0.5


@dataclass
class Readiness:
    """The verdict of `check_readiness`: why the cutover must wait, and the verification when one ran."""

    reasons: list[str] = field(default_factory=list)  # why not; empty when ready
    verification: Verification | None = None

    @property
    def ready(self) -> bool:
        """Nothing stands in the way of the cutover."""
        return not self.reasons


def wait_until_drained(conn: apsw.Connection, timeout: float, progress: ReporterFactory = Silent, *,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> int:
    """Wait until the outbox is empty or `timeout` seconds passed; the entries still pending (0 when drained)."""
    pending = outbox.pending_total(conn)
    if not pending:
        return 0
    deadline = clock() + timeout
    report = progress("waiting for the outbox to drain", pending, "changes")
    total = pending
    while pending and clock() < deadline:
        sleep(POLL_SECONDS)
        pending = outbox.pending_total(conn)
        total = max(total, pending)  # the app may still be writing
        report.set_total(total)
        report(total - pending)
    report.close()
    return pending


def check_readiness(conn: apsw.Connection, config: Config, target: PostgrestTarget, *, timeout: float,
                    progress: ReporterFactory = Silent) -> Readiness:
    """Whether the application can switch to the secondary now: syncd installed, the outbox drained within `timeout`
    seconds (a daemon must be shipping it), no dead letters, no table halted, and `verify` finding every table equal.
    Every reason against is collected in the answer. Raises TargetError when PostgREST's OpenAPI description of the
    secondary cannot be read (transient failures are retried first)."""
    if not outbox.installed(conn):
        return Readiness([f"syncd is not installed in {config.source.path}: nothing was shipped (syncd install, "
                          "syncd resync --table T, syncd run)"])
    readiness = Readiness()
    left = wait_until_drained(conn, timeout, progress)
    if left:
        lease = read_lease(conn)
        if lease is None or not lease.alive(time.time()):
            readiness.reasons.append(f"{left:,} change(s) pending and no daemon holds the lease, so nothing drains "
                                     "the outbox: start `syncd run` (or `syncd run --once`)")
        else:
            readiness.reasons.append(f"{left:,} change(s) still pending after {timeout:g}s: is the secondary "
                                     "reachable? (`syncd status` says why)")
        return readiness
    for name, count in sorted(outbox.dead_letters_by_table(conn).items()):
        readiness.reasons.append(f"{name}: {count:,} dead letter(s) never reached the secondary: fix the cause "
                                 f"(`syncd status`), then `syncd replay --dead-letters --table {name}`")
    for table in config.tables:
        state = outbox.table_state(conn, table.name)
        if state.get("halted"):
            readiness.reasons.append(f"{table.name}: halted by the daemon ({state.get('last_error', 'no reason')}): "
                                     "fix it, then SIGHUP or restart `syncd run`")
    readiness.verification = verify(conn, config, target, progress=progress)
    if not readiness.verification.equal:
        readiness.reasons.append("verify found differences (below): `syncd verify --repair`, let `syncd run` ship "
                                 "them, then run cutover again; if the app is still writing, stop its writes first")
    return readiness


def instructions(config: Config) -> str:
    """What to change in the application's environment, in the seed's variable names."""
    url = config.target.url.rstrip("/")
    supabase_url = url.removesuffix(REST_PATH) if url.endswith(REST_PATH) else None
    lines = ["Change the application's environment (.env.local), then restart it:",
             "  DB_BACKEND=supabase",
             "  SUPABASE_DUAL_WRITE=false"]
    if supabase_url:
        lines.append(f"  SUPABASE_URL={supabase_url}")
    else:
        lines.append(f"  SUPABASE_URL=<the URL whose /rest/v1 is {url}>")
    if config.target.schema_name != "public":
        lines.append(f"  SUPABASE_SCHEMA={config.target.schema_name}")
    lines += ["Keep SUPABASE_ANON_KEY and SUPABASE_SERVICE_KEY as they are (syncd never prints them).",
              "",
              "Stop the application's writes to SQLite before the restart; keep `syncd run` going until then, so",
              "what it writes meanwhile ships too. Once the application runs on Supabase and `syncd status` shows",
              "nothing pending, stop syncd and archive its tables (Phase 4):",
              f"  syncd uninstall --archive {config.source.path.with_suffix('.syncd-archive.sqlite3')}"]
    return "\n".join(lines)


def render(readiness: Readiness, config: Config) -> str:
    """What `syncd cutover` prints: the verification, then READY with the instructions, or NOT READY with
    every reason."""
    lines = [readiness.verification.render()] if readiness.verification is not None else []
    if not readiness.ready:
        lines += ["", "NOT READY to cut over:", *(f"  - {reason}" for reason in readiness.reasons)]
    else:
        lines += ["", "READY to cut over: the outbox is empty, no dead letters, every table equal.", "",
                  instructions(config)]
    return "\n".join(lines)
