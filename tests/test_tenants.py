"""Multi-file mode's parts, without a daemon: the configuration keys, tenant ids from file names, discovery and
shards, `--file`/`--tenant` selection, requests scoped to a tenant, the fleet's metrics (their cardinality bounded)
and readiness, its status text (bounded), and the scheduler's turns (fair among files with work)."""

from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

import pytest

from syncd.config import ConfigError, load_config
from syncd.fleet import Fleet, Unit
from syncd.fleet_metrics import FILE_SERIES, FileState, fleet_metrics
from syncd.fleet_status import FileStatus, FleetStatus, render
from syncd.target import PostgrestTarget
from syncd.tenants import TenantFile, TenantPattern, discover, in_shard, select, shard_index, watched_directories
from syncd.worker import Pause

BASE = """
[target]
url = "http://127.0.0.1:9/rest/v1"
service_key = "k"

[[table]]
name = "note"
"""


def load(tmp_path: Path, source: str, extra: str = ""):  # type: ignore[no-untyped-def]
    path = tmp_path / "syncd.toml"
    path.write_text(f"[source]\n{source}\n{extra}\n{BASE}")
    return load_config(path, env={})


def problems(tmp_path: Path, source: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, source, extra)
    return "\n".join(caught.value.problems or [str(caught.value)])


# ---- configuration --------------------------------------------------------------------------------------------


def test_glob_is_relative_to_the_config_and_narrows_to_one_file(tmp_path: Path) -> None:
    config = load(tmp_path, 'glob = "tenants/*.sqlite3"\nshard = "1/4"')
    assert config.source.glob == str(tmp_path / "tenants/*.sqlite3")
    assert config.source.shard_of == (1, 4)
    assert config.tenant is None
    narrowed = config.for_file(tmp_path / "tenants" / "acme.sqlite3", "acme")
    assert narrowed.tenant == "acme" and narrowed.source.path == tmp_path / "tenants" / "acme.sqlite3"
    assert config.tenant is None  # the fleet's own stays unscoped


@pytest.mark.parametrize(("source", "extra", "expected"), [
    ('glob = "tenants/a.sqlite3"', "", "with *, ? or [...]"),
    ('glob = "t/*.db"\npath = "app.db"', "", "not both"),
    ('glob = "t/*.db"\nshard = "4/4"', "", "0 <= i < N"),
    ('glob = "t/*.db"\nshard = "two"', "", "write i/N"),
    ('glob = "t/*.db"\ntenant = "x.db"', "", "has no {part}"),
    ('glob = "t/*.db"\ntenant = "{a}{b}.db"', "", "side by side"),
    ('glob = "t/*.db"', '[worker]\nconsistency = "snapshot"', "snapshot mode serves one file"),
])
def test_bad_multi_file_settings_name_the_key_and_the_fix(tmp_path: Path, source: str, extra: str,
                                                         expected: str) -> None:
    assert expected in problems(tmp_path, source, extra)


def test_a_column_mapped_onto_the_tenant_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text('[source]\nglob = "t/*.db"\n' + BASE + '[table.columns.owner]\nrename = "tenant_id"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert "tenant_id" in "\n".join(caught.value.problems or [])


# ---- tenant ids, discovery, shards, selection -----------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "tenant"), [
    ("{stem}", "t/acme.sqlite3", "acme"),
    ("{name}", "t/acme.sqlite3", "acme.sqlite3"),
    ("{parent}", "t/acme/app.db", "acme"),
    ("tenant-{id}.db", "t/tenant-42.db", "42"),
    ("{org}_{site}.db", "t/acme_paris.db", "acme-paris"),
    ("tenant-{id}.db", "t/other.db", None),
])
def test_tenant_ids_come_from_the_file_name(pattern: str, path: str, tenant: str | None) -> None:
    assert TenantPattern.parse(pattern).tenant_of(Path(path)) == tenant


def test_discover_leaves_companions_out_and_shards_split_the_files(tmp_path: Path) -> None:
    directory = tmp_path / "tenants"
    directory.mkdir()
    names = [f"t{i}.db" for i in range(40)]
    for name in names:
        (directory / name).write_bytes(b"")
    for companion in ("-wal", "-shm", "-journal", "-syncd", "-syncd-wal"):
        (directory / f"t0.db{companion}").write_bytes(b"")
    pattern = str(directory / "*.db*")
    found = discover(pattern, directory, TenantPattern.parse("{stem}"))
    assert sorted(f.name for f in found) == sorted(names)
    shards = [{f.name for f in discover(pattern, directory, TenantPattern.parse("{stem}"), (i, 3))}
              for i in range(3)]
    assert set().union(*shards) == set(names) and sum(map(len, shards)) == len(names)
    assert all(shards)  # 40 names over 3 shards: none empty
    assert shard_index("t7.db", 3) == shard_index("t7.db", 3)  # stable: SHA-1, not Python's salted hash
    assert in_shard("t7.db", (shard_index("t7.db", 3), 3)) and in_shard("anything", (0, 1))
    assert watched_directories(pattern, tmp_path) == [directory]


def test_select_by_file_or_tenant_names_what_exists_when_nothing_matches(tmp_path: Path) -> None:
    files = [TenantFile(tmp_path / f"{t}.db", f"{t}.db", t) for t in ("acme", "globex")]
    assert select(files) == files
    assert select(files, name="globex.db") == [files[1]]
    assert select(files, tenant="acme") == [files[0]]
    with pytest.raises(ValueError, match=r"--tenant initech.*acme\.db \(acme\)"):
        select(files, tenant="initech")


# ---- requests scoped to a tenant ------------------------------------------------------------------------------


def test_a_scoped_target_carries_the_tenant_in_rows_keys_and_filters() -> None:
    target = PostgrestTarget("http://127.0.0.1:9/rest/v1", "k")
    scoped = target.scoped("tenant_id", 'a,"b')
    try:
        assert scoped.scoped_key(["id"]) == ["tenant_id", "id"]
        assert scoped.scoped_rows([{"id": 1, "tenant_id": "spoof"}]) == [{"id": 1, "tenant_id": 'a,"b'}]
        assert scoped.scoped_rows(['{"id":1}']) == ['{"id":1,"tenant_id":"a,\\"b"}']
        assert urllib.parse.unquote(scoped.scope_filter()) == 'tenant_id=in.("a,\\"b")'
        assert target.scope_filter() == "" and target.scoped_key(["id"]) == ["id"]
        assert not scoped.owner and target.owner
    finally:
        target.close()


# ---- metrics, readiness, status -------------------------------------------------------------------------------


def state(i: int, *, pending: float = 0, age: float = 0, problem: str | None = None,
          halted: str | None = None) -> FileState:
    one = FileState(f"t{i}.db", f"t{i}", problem=problem)
    one.gauges["pending"]["note"] = pending
    one.gauges["oldest_age"]["note"] = age
    one.gauges["halted"]["note"] = 1.0 if halted else 0.0
    if halted:
        one.health.halted["note"] = halted
    return one


def test_fleet_metrics_are_totals_plus_a_bounded_set_of_files() -> None:
    states = [state(i, pending=i, age=float(i)) for i in range(200)]
    states += [state(1000 + i, problem="not installed") for i in range(30)]
    states.append(state(2000, halted="PGRST204"))
    metrics = fleet_metrics(lambda: states)
    text = metrics.exposition().decode()
    assert f'syncd_outbox_pending{{table="note"}} {float(sum(range(200)))}' in text
    assert 'syncd_outbox_oldest_age_seconds{table="note"} 199.0' in text
    assert 'syncd_table_halted{table="note"} 1.0' in text  # 0/1: halted in some file
    assert 'syncd_files{state="troubled"} 31.0' in text and 'syncd_files{state="shipping"} 200.0' in text
    per_file = [line for line in text.splitlines() if line.startswith("syncd_file_pending{")]
    assert len(per_file) == FILE_SERIES and 'file="t199.db"' in per_file[0]  # the most behind first
    assert sum(line.startswith("syncd_file_problem{") for line in text.splitlines()) == FILE_SERIES
    ready, reason = metrics.health.ready()
    assert not ready and reason.startswith("31 of 231 files not shipping: t1000.db: not installed")
    assert "and 28 more (syncd status)" in reason
    assert len(metrics.health.troubled()) == 31  # type: ignore[attr-defined]


def test_fleet_readiness_follows_the_latest_exchange_of_any_file() -> None:
    states = [state(1), state(2)]
    metrics = fleet_metrics(lambda: states)
    assert metrics.health.ready() == (False, "no exchange with the secondary yet")
    states[0].health.target_ok, states[0].health.reason = False, "503 from the secondary"
    time.sleep(0.01)
    states[1].health.target_ok, states[1].health.reason = True, "ok"
    assert metrics.health.ready() == (True, "ok")


def test_status_of_10000_files_is_bounded_and_puts_trouble_first() -> None:
    files = [FileStatus(f"t{i}.db", f"t{i}", None) for i in range(10_000)]
    files[5000].problems.append("halted: note: PGRST204")
    fleet = FleetStatus("/data/t/*.db", files)
    text = render(fleet)
    assert len(text.splitlines()) < 30
    assert "10000 (9999 healthy, 0 behind, 1 need attention)" in text
    assert "t5000.db" in text and text.endswith("needs attention: 1 file(s)")
    assert fleet.as_dict()["totals"] == {"files": 10_000, "healthy": 9999, "behind": 0, "troubled": 1, "pending": 0,
                                        "dead_letters": 0, "oldest_pending_age": None}


# ---- the scheduler --------------------------------------------------------------------------------------------


def test_turns_rotate_among_files_with_work(tmp_path: Path) -> None:
    """A file that always has more (Pause(0)) goes behind the others due now: a busy tenant never starves them."""
    fleet = Fleet(load(tmp_path, 'glob = "t/*.db"'))
    try:
        units = [Unit(TenantFile(tmp_path / f"{n}.db", f"{n}.db", n), FileState(f"{n}.db", n)) for n in "abc"]
        with fleet.lock:
            for unit in units:
                fleet.make_due(unit)
        taken = []
        for _ in range(9):
            unit = fleet.next_unit()
            assert unit is not None
            taken.append(unit.file.tenant)
            with fleet.lock:
                fleet.schedule(unit, Pause(0.0))  # more work: at once, but behind the others
        assert taken == list("abcabcabc")
        unit = fleet.next_unit()
        assert unit is not None
        with fleet.lock:
            fleet.schedule(unit, Pause(60.0, wakeable=True))  # idle: waits, unless its file changes
            assert unit.due > time.monotonic() + 50
            fleet.make_due(unit)  # a change of its file
            assert unit.due <= time.monotonic()
        taken_unit = fleet.next_unit()
        assert taken_unit is units[1]  # due before the change of a's file
        with fleet.lock:
            fleet.schedule(taken_unit, Pause(60.0))  # a backoff: a change of the file does not end it
            fleet.make_due(taken_unit)
            assert taken_unit.due > time.monotonic() + 50
    finally:
        fleet.target.close()
        fleet.pool.shutdown()


def test_a_watch_event_wakes_an_open_file_even_when_its_stat_looks_seen(tmp_path: Path) -> None:
    """An open file between turns is made due by any event on it: a commit's last write can leave the stat its turn
    began with (same mtime tick, a reused -wal of the same size) while that turn read before the commit was visible;
    dropping the event as 'seen' left the commit for the poll. A closed file with the stat it was closed with is not
    woken: that is the checkpoint of its own close."""
    import sqlite3

    from watchdog.events import FileModifiedEvent

    from syncd.fleet import signature

    (tmp_path / "t").mkdir()
    path = tmp_path / "t" / "a.db"
    db = sqlite3.connect(path)
    db.executescript("PRAGMA journal_mode = WAL; CREATE TABLE x (id INTEGER PRIMARY KEY);")
    fleet = Fleet(load(tmp_path, 'glob = "t/*.db"'))
    try:
        unit = Unit(TenantFile(path, "a.db", "a"), FileState("a.db", "a"))
        fleet.units[path] = unit
        for is_open in (True, False):
            unit.worker = object() if is_open else None  # type: ignore[assignment]
            unit.signature = signature(path)  # as its turn began (open), or as it was closed
            with fleet.lock:
                fleet.schedule(unit, Pause(60.0, wakeable=True))
            fleet.on_event(FileModifiedEvent(f"{path}-wal"))
            woken = unit.due <= time.monotonic()
            assert woken is is_open, f"open={is_open}: woken={woken}"
    finally:
        db.close()
        fleet.target.close()
        fleet.pool.shutdown()


def test_a_look_at_a_file_only_stats_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The watch and the sweep look at files the daemon may have open through SQLite: a descriptor of its own,
    opened and closed, would drop SQLite's POSIX locks on the file (https://www.sqlite.org/howtocorrupt.html, 2.2).
    A version that read the -shm's WAL index header that way had tenants fail in the suite with "file is not a
    database"."""
    import builtins
    import os
    import sqlite3

    from syncd.fleet import signature

    path = tmp_path / "a.db"
    db = sqlite3.connect(path)
    db.executescript("PRAGMA journal_mode = WAL; CREATE TABLE x (id INTEGER PRIMARY KEY); INSERT INTO x VALUES (1);")

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a file was opened: {args}")

    monkeypatch.setattr(builtins, "open", refused)
    monkeypatch.setattr(os, "open", refused)
    try:
        seen = signature(path)
    finally:
        monkeypatch.undo()
        db.close()
    assert seen is not None and len(seen) == 5  # the file's and its -wal's stat
