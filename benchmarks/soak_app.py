"""The application side of benchmarks/soak.py: processes that use the app's SQLite file as an application does.

Each role is its own process (the app and syncd are separate processes in production), through the stdlib sqlite3
with a busy timeout of 30 s and PRAGMA foreign_keys=ON:

- `write`: writes continuously with a seeded RNG until SIGTERM: inserts, updates, updates that change a primary
  key (parent's id alone, or with its children in one transaction; tagged's composite key), deletes (a parent's
  cascade to its children), multi-row and multi-table transactions, deferred `BEGIN; SELECT; UPDATE; COMMIT`.
  "database is locked" is retried, a refused write (a constraint) is counted, any other SQLite error is counted
  with its message: nothing ends the writer but SIGTERM. Every choice of a row is read from the file at the time
  (by offset, drawn from the RNG), so after a restore it goes on from the restored content. On exit it prints one
  JSON line of counts.
- `hold`: keeps one connection open, reads now and then, reopens when the file at the path was replaced (another
  inode); stdin commands `close`, `open` (answered `closed`, `opened`) and `quit` (answered with its counts).
- `lock`: `BEGIN IMMEDIATE`, one write, prints `locked`, holds the write lock for `--seconds`, COMMIT.

    python benchmarks/soak_app.py write --db app.sqlite3 --seed 1:2:1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

BUSY_TIMEOUT = 30.0
BASE_COLUMNS = {"parent": ("id", "v", "n"), "tagged": ("a", "b", "v"), "child": ("id", "parent_id", "v")}
ORDER = {"parent": "id", "tagged": "a, b", "child": "id"}
TAG_A = [f"a{i}" for i in range(8)] + ["a 8", "a.9", "a,10", "é11", "a'12"]
TAG_B = [f"b{i}" for i in range(10)] + ["b (10)", 'b"11', "b%12"]
TEXTS = ["plain", "ünïcødé ✓", "emoji 🚀", "quote ' and \"", "back\\slash", "line\nbreak", "comma, dot.",
         "(paren)", "%25 percent", " spaced ", ""]
MAX_PARENTS = 300
RETRIES = 8


def connect(db: Path) -> sqlite3.Connection:
    """The app's connection: autocommit (explicit BEGINs), busy timeout, foreign keys enforced."""
    conn = sqlite3.connect(db, timeout=BUSY_TIMEOUT, isolation_level=None)
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def inode(db: Path) -> int | None:
    """The inode of the file at `db` now (None while there is none)."""
    try:
        return os.stat(db).st_ino
    except FileNotFoundError:
        return None


def is_locked(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED, which a retry may get past."""
    text = str(exc)
    return "locked" in text or "busy" in text


class Writer:
    """The writing app: one connection, a seeded RNG, counts of what it committed and what failed."""

    def __init__(self, db: Path, seed: str) -> None:
        self.db = db
        self.rng = random.Random(seed)
        self.conn = connect(db)
        self.ino = inode(db)
        self.stopping = False
        self.commits: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.actions: list[tuple[Callable[[], bool], int]] = [
            (self.insert_family, 12), (self.insert_parent, 6), (self.update_parent, 12), (self.update_extra, 6),
            (self.change_parent_key, 5), (self.move_family, 4), (self.delete_parent, 7), (self.insert_child, 8),
            (self.update_child, 8), (self.delete_child, 5), (self.upsert_tagged, 10), (self.change_tagged_key, 5),
            (self.delete_tagged, 4), (self.deferred_increment, 6), (self.mixed, 5), (self.bulk_update, 3)]

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Write until asked to stop."""
        functions, weights = zip(*self.actions, strict=True)
        while not self.stopping:
            self.reopen_if_replaced()
            self.attempt(self.rng.choices(functions, weights)[0])
            time.sleep(self.rng.uniform(0, 0.02))

    def reopen_if_replaced(self) -> None:
        """A file restored by rename is another inode: the app reconnects, as it would after a restart."""
        now = inode(self.db)
        if now is not None and now != self.ino:
            self.conn.close()
            self.conn = connect(self.db)
            self.ino = now
            self.failures["reopened"] += 1

    def attempt(self, action: Callable[[], bool]) -> None:
        """Run one transaction, retrying it while the database is locked; count how it ended."""
        name = action.__name__
        for _ in range(RETRIES):
            before = self.conn.total_changes
            try:
                if action() and self.conn.total_changes > before:
                    self.commits[name] += 1
                return
            except sqlite3.IntegrityError:
                self.rollback()
                self.failures["refused"] += 1
                return
            except sqlite3.Error as exc:
                self.rollback()
                if not is_locked(exc):
                    self.errors[f"{name}: {exc}"] += 1
                    return
                self.failures["locked"] += 1
                time.sleep(self.rng.uniform(0.01, 0.1))
        self.failures["gave_up"] += 1

    def rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def report(self) -> dict[str, object]:
        return {"commits": sum(self.commits.values()), "by_action": dict(self.commits), **dict(self.failures),
                "errors": dict(self.errors)}

    # -- reading what is there -------------------------------------------------------------------------------

    def pick(self, table: str, columns: str = "id", where: str = "") -> tuple | None:
        """A row of `table` chosen by the RNG among those there now (by offset in key order), or None."""
        count = self.conn.execute(f"SELECT count(*) FROM {table} {where}").fetchone()[0]
        if not count:
            return None
        return self.conn.execute(f"SELECT {columns} FROM {table} {where} ORDER BY {ORDER[table]} LIMIT 1 OFFSET ?",
                                 (self.rng.randrange(count),)).fetchone()

    def next_id(self, table: str) -> int:
        top = self.conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0]
        return top + 1 + self.rng.randrange(3)

    def count(self, table: str) -> int:
        return self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def text(self) -> str | None:
        if self.rng.random() < 0.08:
            return None
        return f"{self.rng.choice(TEXTS)}{self.rng.randrange(10**6)}"

    def number(self) -> int | None:
        if self.rng.random() < 0.05:
            return None
        return self.rng.choice([self.rng.randrange(-1000, 1000), self.rng.randrange(-(2**62), 2**62)])

    def extra_columns(self, table: str) -> list[tuple[str, str]]:
        """(name, declared type) of the columns added to `table` beyond the soak's own."""
        return [(r[1], r[2].upper()) for r in self.conn.execute(f"PRAGMA table_info({table})")
                if r[1] not in BASE_COLUMNS[table]]

    # -- the transactions ------------------------------------------------------------------------------------

    def insert_family(self) -> bool:
        """A parent and its children in one transaction."""
        if self.count("parent") > MAX_PARENTS:
            return self.delete_parent()
        self.conn.execute("BEGIN IMMEDIATE")
        parent = self.next_id("parent")
        self.conn.execute("INSERT INTO parent (id, v, n) VALUES (?, ?, ?)", (parent, self.text(), self.number()))
        for _ in range(self.rng.randint(0, 3)):
            self.conn.execute("INSERT INTO child (id, parent_id, v) VALUES (?, ?, ?)",
                              (self.next_id("child"), parent, self.text()))
        self.conn.execute("COMMIT")
        return True

    def insert_parent(self) -> bool:
        if self.count("parent") > MAX_PARENTS:
            return self.delete_parent()
        self.conn.execute("INSERT INTO parent (id, v, n) VALUES (?, ?, ?)",
                          (self.next_id("parent"), self.text(), self.number()))
        return True

    def update_parent(self) -> bool:
        row = self.pick("parent")
        if row is None:
            return False
        self.conn.execute("UPDATE parent SET v = ?, n = ? WHERE id = ?", (self.text(), self.number(), row[0]))
        return True

    def update_extra(self) -> bool:
        """Set a column added by a migration (on a random table), when there is one."""
        table = self.rng.choice(list(BASE_COLUMNS))
        extras = self.extra_columns(table)
        if not extras:
            return self.update_parent()
        name, declared = self.rng.choice(extras)
        value = self.number() if "INT" in declared else self.text()
        keys = ("a", "b") if table == "tagged" else ("id",)
        row = self.pick(table, ", ".join(keys))
        if row is None:
            return False
        where = " AND ".join(f"{k} = ?" for k in keys)
        self.conn.execute(f'UPDATE {table} SET "{name}" = ? WHERE {where}', (value, *row))
        return True

    def change_parent_key(self) -> bool:
        """UPDATE parent SET id = ...: a parent without children (the key of one with children cannot change)."""
        self.conn.execute("BEGIN IMMEDIATE")
        row = self.pick("parent", where="WHERE id NOT IN (SELECT parent_id FROM child)")
        if row is None:
            self.conn.execute("ROLLBACK")
            return False
        self.conn.execute("UPDATE parent SET id = ? WHERE id = ?", (self.next_id("parent") + self.rng.randrange(5),
                                                                    row[0]))
        self.conn.execute("COMMIT")
        return True

    def move_family(self) -> bool:
        """A parent's key changed with its children's references, in one transaction (foreign keys deferred)."""
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("PRAGMA defer_foreign_keys=ON")
        row = self.pick("parent")
        if row is None:
            self.conn.execute("ROLLBACK")
            return False
        new = self.next_id("parent")
        self.conn.execute("UPDATE parent SET id = ? WHERE id = ?", (new, row[0]))
        self.conn.execute("UPDATE child SET parent_id = ? WHERE parent_id = ?", (new, row[0]))
        self.conn.execute("COMMIT")
        return True

    def delete_parent(self) -> bool:
        """Deleting a parent deletes its children in SQLite (ON DELETE CASCADE)."""
        row = self.pick("parent")
        if row is None:
            return False
        self.conn.execute("DELETE FROM parent WHERE id = ?", row)
        return True

    def insert_child(self) -> bool:
        parent = self.pick("parent")
        if parent is None:
            return False
        self.conn.execute("INSERT INTO child (id, parent_id, v) VALUES (?, ?, ?)",
                          (self.next_id("child"), parent[0], self.text()))
        return True

    def update_child(self) -> bool:
        """A child's value, or its parent (moved to another one)."""
        row = self.pick("child")
        if row is None:
            return False
        if self.rng.random() < 0.3:
            parent = self.pick("parent")
            if parent is not None:
                self.conn.execute("UPDATE child SET parent_id = ? WHERE id = ?", (parent[0], row[0]))
                return True
        self.conn.execute("UPDATE child SET v = ? WHERE id = ?", (self.text(), row[0]))
        return True

    def delete_child(self) -> bool:
        row = self.pick("child")
        if row is None:
            return False
        self.conn.execute("DELETE FROM child WHERE id = ?", row)
        return True

    def upsert_tagged(self) -> bool:
        self.conn.execute("INSERT INTO tagged (a, b, v) VALUES (?, ?, ?) ON CONFLICT (a, b) DO UPDATE SET v = "
                          "excluded.v", (self.rng.choice(TAG_A), self.rng.choice(TAG_B), self.text()))
        return True

    def change_tagged_key(self) -> bool:
        """UPDATE tagged SET a = ..., b = ...: the composite key changes (to one not taken)."""
        self.conn.execute("BEGIN IMMEDIATE")
        row = self.pick("tagged", "a, b")
        if row is None:
            self.conn.execute("ROLLBACK")
            return False
        a, b = row
        if self.rng.random() < 0.6:
            b = self.rng.choice(TAG_B)
        else:
            a = self.rng.choice(TAG_A)
        if (a, b) == row or self.conn.execute("SELECT 1 FROM tagged WHERE a = ? AND b = ?", (a, b)).fetchone():
            self.conn.execute("ROLLBACK")
            return False
        self.conn.execute("UPDATE tagged SET a = ?, b = ? WHERE a = ? AND b = ?", (a, b, *row))
        self.conn.execute("COMMIT")
        return True

    def delete_tagged(self) -> bool:
        row = self.pick("tagged", "a, b")
        if row is None:
            return False
        self.conn.execute("DELETE FROM tagged WHERE a = ? AND b = ?", row)
        return True

    def deferred_increment(self) -> bool:
        """BEGIN; SELECT; UPDATE; COMMIT, deferred: refused at once with "database is locked" when another
        connection committed between the read and the write (retried)."""
        self.conn.execute("BEGIN")
        row = self.pick("parent", "id, n")
        if row is None:
            self.conn.execute("ROLLBACK")
            return False
        n = row[1] if isinstance(row[1], int) and abs(row[1]) < 2**62 else 0
        self.conn.execute("UPDATE parent SET n = ? WHERE id = ?", (n + 1, row[0]))
        self.conn.execute("COMMIT")
        return True

    def mixed(self) -> bool:
        """One transaction over the three tables."""
        self.conn.execute("BEGIN IMMEDIATE")
        parent = self.pick("parent")
        if parent is not None:
            self.conn.execute("UPDATE parent SET v = ? WHERE id = ?", (self.text(), parent[0]))
        self.conn.execute("INSERT INTO tagged (a, b, v) VALUES (?, ?, ?) ON CONFLICT (a, b) DO UPDATE SET v = "
                          "excluded.v", (self.rng.choice(TAG_A), self.rng.choice(TAG_B), self.text()))
        child = self.pick("child")
        if child is not None:
            self.conn.execute("DELETE FROM child WHERE id = ?", child)
        self.conn.execute("COMMIT")
        return True

    def bulk_update(self) -> bool:
        """Many rows in one statement."""
        modulus = self.rng.randint(5, 20)
        self.conn.execute("UPDATE parent SET v = ? WHERE id % ? = ?", (self.text(), modulus,
                                                                       self.rng.randrange(modulus)))
        return True


def write(args: argparse.Namespace) -> None:
    """The `write` role: until SIGTERM, then one JSON line of counts."""
    writer = Writer(args.db, args.seed)

    def stop(signum: int, frame: object) -> None:
        writer.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    writer.run()
    writer.conn.close()
    print(json.dumps(writer.report()), flush=True)


def hold(args: argparse.Namespace) -> None:
    """The `hold` role: a connection open all along, read now and then, reopened after a restore by rename."""
    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    conn: sqlite3.Connection | None = connect(args.db)
    ino = inode(args.db)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the soak stops it (Ctrl-C reaches the soak only)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], rng.uniform(0.2, 1.5))
        if ready:
            command = sys.stdin.readline().strip()
            if command in ("quit", ""):
                break
            if command == "close" and conn is not None:
                conn.close()
                conn = None
            elif command == "open" and conn is None:
                conn, ino = connect(args.db), inode(args.db)
            print("closed" if conn is None else "opened", flush=True)
            continue
        if conn is None:
            continue
        now = inode(args.db)
        if now is not None and now != ino:
            conn.close()
            conn, ino = connect(args.db), now
            counts["reopened"] += 1
        try:
            conn.execute("SELECT count(*) FROM parent").fetchone()
            counts["reads"] += 1
        except sqlite3.Error as exc:
            counts[f"error: {exc}"] += 1
    if conn is not None:
        conn.close()
    print(json.dumps(dict(counts)), flush=True)


def lock(args: argparse.Namespace) -> None:
    """The `lock` role: hold the write lock (with one write in it) for `--seconds`."""
    conn = connect(args.db)
    started = time.monotonic()
    for _ in range(RETRIES):
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if not is_locked(exc):
                raise
    else:
        raise SystemExit("could not take the write lock")
    waited = time.monotonic() - started
    conn.execute("UPDATE parent SET v = 'held the lock' WHERE id = (SELECT min(id) FROM parent)")
    print("locked", flush=True)
    time.sleep(args.seconds)
    conn.execute("COMMIT")
    conn.close()
    print(json.dumps({"waited": round(waited, 2), "held": args.seconds}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("write", "hold", "lock"))
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--seed", default="0")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    {"write": write, "hold": hold, "lock": lock}[args.role](args)


if __name__ == "__main__":
    main()
