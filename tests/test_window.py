"""The in-flight window's depth: what the measured round trip needs, halved when the secondary fails a batch as a
whole, grown back one batch per acknowledged one (the rest of the window: tests/test_worker.py)."""

from __future__ import annotations

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
