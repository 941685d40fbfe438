"""Progress of long-running commands: plain lines (not a terminal) with count, share, rate and time left."""

from __future__ import annotations

import io

import pytest

from syncd import progress as module
from syncd.progress import Progress, format_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(module.time, "monotonic", clock)
    return clock


def test_plain_lines_are_throttled_and_say_rate_and_time_left(clock: Clock):
    out = io.StringIO()
    with Progress("resync t", 1000, "keys", stream=out, every=2.0) as report:
        clock.now += 1
        report(100)  # first line at once
        clock.now += 1
        report(200)  # within 2 s of the last line: quiet
        clock.now += 2
        report(400)
    lines = out.getvalue().splitlines()
    assert lines == ["resync t: 100/1,000 keys (10%), 100/s, 9s left",
                     "resync t: 400/1,000 keys (40%), 100/s, 6s left",
                     "resync t: 400/1,000 keys (40%), 100/s, 6s left"]


def test_unknown_total_and_a_total_set_later(clock: Clock):
    out = io.StringIO()
    report = Progress("verify t: secondary", None, "rows", stream=out)
    clock.now += 2
    report(50)
    report.set_total(200)
    report.close()
    report.close()
    assert out.getvalue().splitlines() == ["verify t: secondary: 50 rows, 25/s",
                                           "verify t: secondary: 50/200 rows (25%), 25/s, 6s left"]


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59.6, "1m00s"), (61, "1m01s"), (3725, "1h02m")])
def test_format_seconds(seconds: float, text: str):
    assert format_seconds(seconds) == text
