"""`syncd status` in multi-file mode (`[source] glob`): every file's status (`syncd.status.collect`, from the file
alone), totals, and the files that need an operator or are behind first, in output bounded for 10,000 files.

Each daemon that holds a live lease is asked its /readyz once, for all its files (its answer names every file it
does not ship, with why), not once per file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import apsw

from syncd import status
from syncd.config import Config
from syncd.tenants import TenantFile
from syncd.timeparse import format_age

__all__ = ["FileStatus", "FleetStatus", "collect", "render"]

SHOWN = 20  # files listed by the text form (troubled first, then the most behind)


@dataclass
class FileStatus:
    """One file of the glob: its tenant, its status (None: it could not be read, `error` says why)."""

    file: str
    tenant: str | None
    status: status.Status | None
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(t.pending for t in self.status.tables) if self.status else 0

    @property
    def dead_letters(self) -> int:
        return sum(t.dead_letters for t in self.status.tables) if self.status else 0

    @property
    def oldest_pending_age(self) -> float | None:
        ages = [t.oldest_pending_age for t in self.status.tables if t.oldest_pending_age is not None] \
            if self.status else []
        return max(ages, default=None)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"file": self.file, "tenant": self.tenant, "healthy": self.healthy, "pending": self.pending,
                "oldest_pending_age": self.oldest_pending_age, "dead_letters": self.dead_letters,
                "problems": self.problems, "error": self.error,
                "status": self.status.as_dict() if self.status else None}


@dataclass
class FleetStatus:
    """Every file's status and the totals."""

    glob: str
    files: list[FileStatus]

    @property
    def healthy(self) -> bool:
        return all(file.healthy for file in self.files)

    def totals(self) -> dict[str, object]:
        ages = [age for file in self.files if (age := file.oldest_pending_age) is not None]
        return {"files": len(self.files), "healthy": sum(f.healthy for f in self.files),
                "behind": sum(1 for f in self.files if f.pending), "troubled": sum(not f.healthy for f in self.files),
                "pending": sum(f.pending for f in self.files), "dead_letters": sum(f.dead_letters for f in self.files),
                "oldest_pending_age": max(ages, default=None)}

    def as_dict(self) -> dict[str, object]:
        """The `--json` form: totals, and every file (its whole single-file status under "status")."""
        return {"glob": self.glob, "healthy": self.healthy, "totals": self.totals(),
                "files": [file.as_dict() for file in self.files]}


def collect(config: Config, files: list[TenantFile], open_file: Callable[[Config], apsw.Connection], *,
            max_lag: float = status.DEFAULT_MAX_LAG_SECONDS) -> FleetStatus:
    """The status of each of `files` (`open_file` opens one, read-only, for its narrowed configuration), then each
    live daemon's readiness, asked once per daemon."""
    found: list[FileStatus] = []
    for file in files:
        if file.tenant is None:
            found.append(FileStatus(file.name, None, None, problems=[
                f"its name gives no tenant by source.tenant = {config.source.tenant!r}: not served; rename it or "
                "change source.tenant"]))
            continue
        narrowed = config.for_file(file.path, file.tenant)
        try:
            one = status.collect(open_file(narrowed), narrowed, max_lag=max_lag, ask_daemon=False)
        except apsw.Error as exc:  # locked past the wait, damaged: this file, not the report
            found.append(FileStatus(file.name, file.tenant, None, f"{type(exc).__name__}: {exc}",
                                    [f"cannot read it: {type(exc).__name__}: {exc}"]))
            continue
        problems = one.problems + [f"{t.name}: {p}" for t in one.tables for p in t.problems]
        found.append(FileStatus(file.name, file.tenant, one, problems=problems))
    ask_daemons(found, config)
    return FleetStatus(str(config.source.glob), found)


def ask_daemons(files: list[FileStatus], config: Config) -> None:
    """Each live lease holder's /readyz, once per address; its reasons go to the files it names."""
    answers: dict[str, dict[str, object]] = {}
    for file in files:
        lease = file.status.lease if file.status else None
        if not lease or not lease.get("alive") or lease.get("holder_gone"):
            continue
        address = str(lease.get("metrics") or config.worker.metrics_addr)
        if address not in answers:
            answers[address] = status.daemon_readiness(address)
        answer = answers[address]
        assert file.status is not None
        file.status.daemon = answer
        reasons = answer.get("files")
        if isinstance(reasons, dict) and file.file in reasons:
            file.problems.append(f"the daemon does not ship it: {reasons[file.file]}")


def render(fleet: FleetStatus, shown: int = SHOWN) -> str:
    """The human form: totals, then up to `shown` files (those that need attention, then the most behind)."""
    t = fleet.totals()
    age = t["oldest_pending_age"]
    lines = [f"glob:     {fleet.glob}",
             f"files:    {t['files']} ({t['healthy']} healthy, {t['behind']} behind, {t['troubled']} need attention)",
             f"pending:  {t['pending']} change(s), oldest {format_age(age if isinstance(age, float) else None)}"
             f", {t['dead_letters']} dead letter(s)"]
    ranked = sorted(fleet.files, key=lambda f: (f.healthy, -(f.oldest_pending_age or 0.0), -f.pending, f.file))
    listed = [f for f in ranked if not f.healthy or f.pending or f.dead_letters][:shown]
    if listed:
        header = ("FILE", "TENANT", "PENDING", "OLDEST", "DEAD", "PROBLEM")
        rows = [header] + [(f.file, f.tenant or "-", str(f.pending), format_age(f.oldest_pending_age),
                            str(f.dead_letters), f.problems[0] if f.problems else "") for f in listed]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines += ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]]).rstrip()
                  for row in rows]
        rest = sum(1 for f in ranked if not f.healthy or f.pending or f.dead_letters) - len(listed)
        if rest > 0:
            lines.append(f"... and {rest} more file(s): syncd status --json lists every file, --file NAME shows one")
    lines.append("healthy" if fleet.healthy else f"needs attention: {t['troubled']} file(s)")
    return "\n".join(lines)
