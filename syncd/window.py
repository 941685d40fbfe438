"""The in-flight window: the batches claimed and on their way to the secondary, not yet acknowledged, and where
the next claim starts (DESIGN.md, "The drain loop, as a story").

What it promises: a key is never in two requests at once (each claim leaves out every key of the batches in
flight: `in_flight`); a batch holding a table related by a foreign key to a table of a batch in flight waits for
that batch (`related`), so parents still land before children; an entry claimed and not settled is never passed
by the claims for good: a claim reads the entries after the highest seq read so far, and names the open ones below
it that are not in flight (`claim_from`: passed over for a key in flight, of an interrupted or dropped batch), so
an interrupted batch is claimed again while the cost of a claim does not grow with the window.
"""

from __future__ import annotations

import functools
import math
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from syncd.outbox import Change, Claim, InFlight
from syncd.shipping import Batch, Interrupted

__all__ = ["Shipment", "Window", "moving_average"]


@dataclass
class Shipment:
    """One batch on its way: claimed on the loop's thread, shipped (maybe on another), finished back."""

    changes: list[Change]
    claimed: int
    started: float = field(default_factory=time.monotonic)
    batch: Batch = field(default_factory=Batch)
    interrupted: Interrupted | None = None
    shipping_seconds: float = 0.0  # how long its requests took

    @functools.cached_property
    def held(self) -> InFlight:
        """Its keys and seqs, as the claims beside it leave them out (made once: it stays in flight for several)."""
        return InFlight.of(self.changes)


class Window:
    """The batches in flight (`batches`, in the order they were claimed), the seqs claimed (or passed over) and
    not settled (`open_seqs`), and the highest seq a claim read since the floor was last reset (`seen_upto`). Its
    size follows the moving averages of claiming a batch and of shipping one."""

    def __init__(self) -> None:
        self.batches: deque[tuple[Shipment, Future[Shipment]]] = deque()
        self.open_seqs: set[int] = set()
        self.seen_upto = 0
        self.claim_seconds = 0.0
        self.shipping_seconds = 0.0
        self.cap: int | None = None  # what the secondary's answers allow (None: no limit learned)

    def begin(self) -> deque[tuple[Shipment, Future[Shipment]]]:
        """A drain starts with no batch in flight (one left early by the last drain, shipped but never acknowledged,
        is claimed again: its seqs stop being kept open at the next `reset_floor`)."""
        self.batches = deque()
        return self.batches

    def in_flight(self) -> InFlight:
        """The keys and seqs of every batch in flight: the next claim leaves them out."""
        return InFlight.joined(shipment.held for shipment, _ in self.batches)

    def claim_from(self) -> tuple[int, list[int]]:
        """Where the next claim reads: (the seq after which every entry is new to the claims, the open seqs below it
        that no batch in flight holds, in order: they are read again)."""
        if not self.open_seqs:
            return self.seen_upto, []
        return self.seen_upto, sorted(self.open_seqs - self.in_flight().seqs())

    def claimed(self, claimed: Claim, changes: list[Change]) -> Shipment | None:
        """Take a claim in: `changes` are those of `claimed` that ship now (the others are held back by a halt and
        stay in the outbox, claimed again once it ends). The batch to ship, None when nothing does. A claim that
        `restarted` from the first seq (entries deleted behind this window) resets the floor first."""
        if claimed.restarted:
            self.reset_floor()
        if len(changes) < len(claimed.changes):
            shipping = {id(c) for c in changes}
            self.open_seqs.difference_update(e.seq for c in claimed.changes if id(c) not in shipping for e in c.entries)
        self.open_seqs.update(e.seq for c in changes for e in c.entries)
        self.open_seqs.update(claimed.passed_over)
        self.open_seqs.difference_update(claimed.vanished)
        self.seen_upto = max(self.seen_upto, claimed.last_seq)
        return Shipment(changes, sum(len(c.entries) for c in changes)) if changes else None

    def settled(self, changes: Iterable[Change]) -> None:
        """These changes were acknowledged, dead-lettered or requeued: their seqs are open no more."""
        self.open_seqs.difference_update(e.seq for c in changes for e in c.entries)

    def reset_floor(self) -> None:
        """Claims start from the first seq again (tables resumed, entries flushed or requeued, the file replaced).
        The seqs of batches still in flight stay open: one of them may yet be interrupted, and its entries must be
        claimed again (a flush comes between two batches of a drain)."""
        self.seen_upto = 0
        self.open_seqs.intersection_update(self.in_flight().seqs())

    def flushed(self, highest: int) -> None:
        """A flush deleted settled entries, the highest seqs maybe among them: SQLite hands out the next seq above the
        highest left (`highest`, 0 for an empty outbox; https://sqlite.org/autoinc.html), so claims go on from
        there at the lowest, not from the first seq (which would read again, after every flush, the backlog of a
        halted table)."""
        self.seen_upto = min(self.seen_upto, highest)

    def size(self, max_in_flight: int) -> int:
        """How many batches to keep in flight: enough that claiming the next one takes as long as a batch's requests
        (a remote secondary's round trip is hidden: rate x round trip / batch), no more (each one more shares the
        CPU), at most `max_in_flight` and what the secondary's answers allow (`overloaded`)."""
        if self.claim_seconds <= 0:
            return 1
        wanted = max(1, min(max_in_flight, math.ceil(self.shipping_seconds / self.claim_seconds) + 1))
        return wanted if self.cap is None else min(wanted, self.cap)

    def overloaded(self, max_in_flight: int) -> None:
        """The secondary failed a batch as a whole (a 503, a 429, a timeout, a reset): halve the batches in flight
        (multiplicative decrease, as TCP's congestion window); `recovered` grows them back one by one."""
        self.cap = max(1, self.size(max_in_flight) // 2)

    def recovered(self, max_in_flight: int) -> None:
        """A batch was acknowledged whole: one more batch in flight is allowed (additive increase), up to no cap."""
        if self.cap is not None:
            self.cap = None if self.cap + 1 >= max_in_flight else self.cap + 1

    def related(self, upcoming: Shipment, relatives: dict[str, set[str]]) -> bool:
        """Whether a table of `upcoming` is a foreign-key parent or child of a table in a batch in flight."""
        mine = upcoming.held.tables()
        theirs = self.in_flight().tables()
        return any(relatives.get(table, set()) & theirs for table in mine)

    def claim_took(self, seconds: float) -> None:
        """A claim of the drain took `seconds` (the window follows it)."""
        self.claim_seconds = moving_average(self.claim_seconds, seconds)

    def arrived(self, shipment: Shipment) -> Shipment:
        """Note how long a batch's requests took (the window follows it)."""
        self.shipping_seconds = moving_average(self.shipping_seconds, shipment.shipping_seconds)
        return shipment


def moving_average(average: float, sample: float) -> float:
    """An exponential moving average over about 8 samples; the first sample alone when there is none yet."""
    return sample if average <= 0 else average + (sample - average) / 8
