"""What PostgreSQL's constraints make of a batch that was valid in SQLite.

SQLite checks a transaction's end state; PostgreSQL checks an upsert's rows one by one against its (non-deferrable)
unique constraints and refuses a request that names one conflict key twice (21000, "ON CONFLICT DO UPDATE command
cannot affect row a second time"; PostgreSQL docs, INSERT, "ON CONFLICT Clause"). So before a batch is sent:

- keys that are distinct in SQLite but one key in the secondary (`1` and `'1'` in an untyped key column, one
  instant spelt two ways under a `timestamp` transform) are collapsed: the newest state is sent, the older ones are
  acknowledged with it (`collapse`);
- a delete of a target key that a present row of the same batch maps to is dropped: the row is there in SQLite;
- rows refused for a unique value that another row of the batch still holds are sent again after the rest of the
  batch (its deletes and other updates may free the value); a cycle (two rows swapping a value) is applied by
  deleting the rows and inserting them again, but only when no foreign key of the secondary points at the table
  (a delete would cascade) — see `Worker.hand_off`.

The collapse is best effort (PostgreSQL's casts decide equality: `'01'` and `1` are one bigint); what it misses
PostgreSQL answers with 21000, a row error, and bisection sends the rows apart, newest last.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from syncd.outbox import Change

Identity = tuple[object, ...]
FK_NOTE = re.compile(r"<fk table='([^']*)' column='[^']*'/>")


@dataclass
class Collapsed:
    """A table's upserts and deletes with each target key once; `superseded` are acknowledged unsent (a newer
    change of the same target key, or a present row of it, carries their state), `examples` name a few for the
    log: (older SQLite key, newer SQLite key)."""

    present: list[Change]
    gone: list[Change]
    superseded: list[Change] = field(default_factory=list)
    examples: list[tuple[object, object]] = field(default_factory=list)


def identity(values: Sequence[object]) -> Identity:
    """A target key as PostgreSQL compares it, as far as the JSON tells: a number and its text are one value
    (`1` and `"1"` into bigint or text are both 1), a BLOB is its bytes."""
    if len(values) == 1:  # the common key, without a generator per key
        value = values[0]
        return (value if isinstance(value, str | bytes) or value is None else str(value),)
    return tuple(value if isinstance(value, str | bytes) or value is None else str(value) for value in values)


def newest_seq(change: Change) -> int:
    entries = change.entries
    return entries[0].seq if len(entries) == 1 else max(entry.seq for entry in entries)


def collapse(present: list[Change], gone: list[Change],
             target_key: Callable[[Change], Sequence[object] | None]) -> Collapsed:
    """`present` and `gone` with one change per target key. `target_key(change)` gives the key as it will be sent
    (None when it cannot be mapped: such a change is left for the mapping to dead-letter)."""
    result = Collapsed([], [])
    kept: dict[Identity, Change] = {}
    for change in sorted(present, key=newest_seq):
        values = target_key(change)
        if values is None:
            result.present.append(change)
            continue
        key = identity(values)
        older = kept.get(key)
        if older is not None:
            result.superseded.append(older)
            result.examples.append((older.key, change.key))
        kept[key] = change
    result.present.extend(kept.values())
    deleted: set[Identity] = set()
    for change in gone:
        values = target_key(change)
        gone_key = identity(values) if values is not None else None
        if gone_key is not None and (gone_key in kept or gone_key in deleted):
            result.superseded.append(change)
            if gone_key in kept:
                result.examples.append((change.key, kept[gone_key].key))
            continue
        if gone_key is not None:
            deleted.add(gone_key)
        result.gone.append(change)
    return result


def referenced_tables(spec: Mapping[str, object]) -> set[str]:
    """The tables some foreign key of the secondary points at, from PostgREST's OpenAPI description (each FK column's
    description ends with `<fk table='parent' column='id'/>`; PostgREST's OpenAPI output, v12)."""
    definitions = spec.get("definitions")
    found: set[str] = set()
    if not isinstance(definitions, dict):
        return found
    for definition in definitions.values():
        properties = definition.get("properties") if isinstance(definition, dict) else None
        for prop in (properties or {}).values():
            description = prop.get("description") if isinstance(prop, dict) else None
            if isinstance(description, str):
                found.update(FK_NOTE.findall(description))
    return found
