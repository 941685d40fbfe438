"""The in-flight window's depth: what the measured round trip needs, halved when the secondary fails a batch as a
whole, grown back one batch per acknowledged one; what the batches in flight hold, as a claim leaves it out (the
rest of the window: tests/test_worker.py)."""

from __future__ import annotations

from concurrent.futures import Future

from syncd.outbox import Change, Entry, InFlight
from syncd.window import Shipment, Window


def window_for(claim_seconds: float, shipping_seconds: float) -> Window:
    window = Window()
    window.claim_took(claim_seconds)
    window.arrived(Shipment([], 0, shipping_seconds=shipping_seconds))
    return window


def test_depth_follows_the_round_trip_up_to_the_maximum() -> None:
    assert window_for(0.007, 0.0035).size(8) == 2  # a local secondary: the claim is the limit
    assert window_for(0.007, 0.050).size(8) == 8  # 50 ms away: 8 claims to cover one round trip (ceil(7.1) + 1)
    assert window_for(0.007, 0.050).size(4) == 4


def test_a_failed_batch_halves_the_depth_and_clean_ones_grow_it_back_one_by_one() -> None:
    window = window_for(0.007, 0.050)
    window.overloaded(8)
    assert window.size(8) == 4
    window.overloaded(8)
    window.overloaded(8)
    window.overloaded(8)
    assert window.size(8) == 1  # never below one batch
    sizes = []
    for _ in range(8):
        window.recovered(8)
        sizes.append(window.size(8))
    assert sizes == [2, 3, 4, 5, 6, 7, 8, 8] and window.cap is None


def change(table: str, key: str, *seqs: int) -> Change:
    return Change(table, key, [Entry(seq, "U", 0.0) for seq in seqs], key=(int(key),))


def test_what_is_in_flight_is_made_once_per_batch_and_answers_per_batch() -> None:
    """`Window.in_flight` joins each batch's keys, seqs and tables (made when the batch is first asked): a key of
    any batch is held, the seqs above a floor are those of a batch claimed before a window reset, and the open seqs
    that no batch holds are the ones a claim reads again."""
    window = Window()
    first = Shipment([change("parent", "1", 1, 4), change("parent", "2", 2)], 3)
    second = Shipment([change("child", "1", 3), change("child", "7", 9)], 2)
    for shipment in (first, second):
        window.batches.append((shipment, Future()))
    window.open_seqs.update({1, 2, 3, 4, 5, 6, 9})  # 5 and 6: passed over, their keys were in flight
    held = window.in_flight()
    assert held.holds(("parent", b"1")) and held.holds(("child", b"7")) and not held.holds(("child", b"2"))
    assert held.seqs() == {1, 2, 3, 4, 9} and held.tables() == {"parent", "child"}
    assert held.seqs_after(3) == [4, 9] and held.seqs_after(9) == []
    assert window.claim_from() == (0, [5, 6])
    assert first.held is first.held  # made once
    assert InFlight.of([]) == InFlight() and not InFlight().holds(("parent", b"1"))
    window.batches.popleft()
    assert window.in_flight().tables() == {"child"} and window.claim_from() == (0, [1, 2, 4, 5, 6])
