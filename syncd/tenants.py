"""Multi-file mode's sources (`[source] glob`): which files match, the tenant id of each, and the shard a file
belongs to.

A tenant id comes from the file's name through `[source] tenant`: `{stem}` (the name without its last suffix, the
default), `{name}` (the whole name) or `{parent}` (the directory's name, for `tenants/*/app.sqlite3`) are taken as
they are; any other pattern is matched against the file name, each `{part}` standing for one or more characters,
and the tenant id is the parts joined by `-` (`tenant-{id}.db` gives `42` for `tenant-42.db`; `{org}_{site}.db`
gives `acme-paris` for `acme_paris.db`). A file whose name does not match has no tenant: it is reported, not served.

Shards (`[source] shard = "i/N"`) split the files by a stable hash of the file's name (SHA-1 of its path relative to
the glob's fixed directory), the same in every process and after every restart, so N processes on one glob
serve disjoint sets without talking to each other.
"""

from __future__ import annotations

import glob as globbing
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TenantFile", "TenantPattern", "discover", "in_shard", "select", "shard_index"]

WHOLE = {"stem": lambda path: path.stem, "name": lambda path: path.name, "parent": lambda path: path.parent.name}
# SQLite's companions of a database file: never a tenant of their own.
COMPANIONS = ("-wal", "-shm", "-journal", "-syncd", "-syncd-wal", "-syncd-shm", "-syncd-journal")


@dataclass(frozen=True)
class TenantPattern:
    """A parsed `[source] tenant`: either one whole part of the path (`whole`) or a regular expression of the file
    name with one group per named part."""

    text: str
    whole: str | None
    regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: str) -> TenantPattern:
        """Raises ValueError (with the fix) for a pattern without a part, or with two parts side by side."""
        bare = re.fullmatch(r"\{(\w+)\}", text)
        if bare and bare[1] in WHOLE:
            return cls(text, bare[1], None)
        pieces = re.split(r"\{(\w*)\}", text)
        names = pieces[1::2]
        if not names:
            raise ValueError(f"the tenant pattern {text!r} has no {{part}}; use {{stem}}, {{name}}, {{parent}}, or "
                             "the file name with named parts, e.g. tenant-{id}.sqlite3")
        if any(not name for name in names) or len(set(names)) != len(names):
            raise ValueError(f"the tenant pattern {text!r} needs a distinct name in each {{part}}, "
                             "e.g. {org}_{site}")
        if any(not literal for literal in pieces[2:-1:2]):
            raise ValueError(f"the tenant pattern {text!r} has two parts side by side; put a separator between "
                             "them, e.g. {org}_{site}")
        regex = "".join(re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>.+?)" for i, piece in enumerate(pieces))
        return cls(text, None, re.compile(regex))

    def tenant_of(self, path: Path) -> str | None:
        """The tenant id of `path`, or None when its name does not match the pattern (or gives an empty id)."""
        if self.whole is not None:
            value = WHOLE[self.whole](path)
            return value or None
        assert self.regex is not None
        match = self.regex.fullmatch(path.name)
        if match is None:
            return None
        return "-".join(match.groups()) or None


@dataclass(frozen=True)
class TenantFile:
    """One matching file: its path, its name relative to the configuration's directory (what status, metrics and
    the shard hash use), and its tenant id (None: its name does not give one)."""

    path: Path
    name: str
    tenant: str | None


def shard_index(name: str, count: int) -> int:
    """The shard (0..count-1) of a file named `name` (relative path): SHA-1, stable across processes and restarts
    (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()[:8], "big") % count


def in_shard(name: str, shard: tuple[int, int]) -> bool:
    """Whether the file named `name` belongs to shard (i, N)."""
    index, count = shard
    return count <= 1 or shard_index(name, count) == index


def discover(pattern: str, base: Path, tenant: TenantPattern, shard: tuple[int, int] = (0, 1)) -> list[TenantFile]:
    """The files matching `pattern` (absolute, or relative to `base`) now, sorted by name, in this shard; SQLite's
    companion files (-wal, -shm, -journal, syncd's state file) and directories are left out."""
    full = pattern if os.path.isabs(pattern) else str(base / pattern)
    found: list[TenantFile] = []
    for match in sorted(globbing.glob(full, recursive=True)):
        path = Path(match)
        if match.endswith(COMPANIONS) or not path.is_file():
            continue
        name = relative_name(path, base)
        if in_shard(name, shard):
            found.append(TenantFile(path, name, tenant.tenant_of(path)))
    return found


def relative_name(path: Path, base: Path) -> str:
    """`path` relative to `base` when it is below it, else the absolute path."""
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def watched_directories(pattern: str, base: Path) -> list[Path]:
    """The directories to watch for files matching `pattern`: the longest path before its first wildcard (watched
    recursively when the pattern has a wildcard in a directory part)."""
    full = pattern if os.path.isabs(pattern) else str(base / pattern)
    parts = Path(full).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    return [Path(*fixed) if fixed else Path("/")]


def recursive(pattern: str) -> bool:
    """Whether matching files may sit in subdirectories (a wildcard before the file name)."""
    return any(c in part for part in Path(pattern).parts[:-1] for c in "*?[")


def select(files: list[TenantFile], *, name: str | None = None, tenant: str | None = None) -> list[TenantFile]:
    """The files a command's `--file NAME` (its name as status shows it, or its path) and `--tenant ID` narrow
    `files` to (every file when neither is given). Raises ValueError, with what matches, when none is left."""
    chosen = [file for file in files
              if (name is None or name in (file.name, str(file.path)) or Path(name).resolve() == file.path.resolve())
              and (tenant is None or file.tenant == tenant)]
    if not chosen:
        asked = " and ".join(part for part in (f"--file {name}" if name else "", f"--tenant {tenant}" if tenant
                                               else "") if part)
        shown = ", ".join(f"{file.name} ({file.tenant})" for file in files[:5]) + (" ..." if len(files) > 5 else "")
        raise ValueError(f"no file matching source.glob has {asked}" + (f"; the files: {shown}" if files
                                                                        else "; no file matches source.glob"))
    return chosen
