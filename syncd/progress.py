"""Progress of the long-running commands (resync, replay, verify, cutover).

On a terminal: a bar with count, rate and time left (rich), redrawn in place on stderr. Otherwise (a
job's log, CI): a plain line at most every `every` seconds and one at the end, so logs stay readable.
A `Progress` is also the `Callable[[int], None]` the operations take: call it with the count done so far.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any, Protocol

PLAIN_EVERY_SECONDS = 2.0


class Reporter(Protocol):
    """What the operations report progress to: called with the count done so far."""

    def __call__(self, done: int) -> None: ...

    def set_total(self, total: int | None) -> None:
        """The total became known or changed (None: unknown)."""
        ...

    def close(self) -> None:
        """The work is over: leave the final state shown."""
        ...


class ReporterFactory(Protocol):
    """What the long operations take to report progress with: called with a label, the total when known and the unit
    counted, it gives a Reporter (`Progress` and `Silent` are such factories)."""

    def __call__(self, label: str, total: int | None = None, unit: str = "keys") -> Reporter: ...


class Silent:
    """A Reporter that says nothing (library calls and tests)."""

    def __init__(self, label: str = "", total: int | None = None, unit: str = "keys") -> None:
        pass

    def __call__(self, done: int) -> None:
        pass

    def set_total(self, total: int | None) -> None:
        """Ignored."""
        pass

    def close(self) -> None:
        """Nothing to close."""
        pass


class Progress:
    """A Reporter for people: a rich bar on a terminal, else a plain line at most every `every` seconds and one at
    close; closed on leaving a `with` block."""

    def __init__(self, label: str, total: int | None = None, unit: str = "keys", *, stream: IO[str] | None = None,
                 every: float = PLAIN_EVERY_SECONDS) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.every = every
        self.done = 0
        self.started = time.monotonic()
        self.printed_at = 0.0
        self.closed = False
        self.bar: Any = None
        if self.stream.isatty():
            self.bar, self.task = start_bar(label, total, self.stream)

    def __call__(self, done: int) -> None:
        self.done = done
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=self.total)
        elif time.monotonic() - self.printed_at >= self.every:
            self.print_line()

    def set_total(self, total: int | None) -> None:
        """Change the total (None: unknown) and report again."""
        self.total = total
        self(self.done)

    def close(self) -> None:
        """The final line (plain) or the bar left at its last state (terminal); only once."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.stop()
        else:
            self.print_line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None and self.done == 0 and self.bar is None:
            self.closed = True  # refused before any work (a bad flag): the error alone says it
        self.close()

    def line(self) -> str:
        """The plain line: `label: done/total unit (pct%), rate/s, time left`, or without a total `label: done unit,
        rate/s`."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total is not None:
            text += f"/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {rate:,.0f}/s"
        if self.total is not None and rate > 0 and self.done < self.total:
            text += f", {format_seconds((self.total - self.done) / rate)} left"
        return text

    def print_line(self) -> None:
        """Print `line()` on the stream now."""
        self.printed_at = time.monotonic()
        print(self.line(), file=self.stream, flush=True)


def format_seconds(seconds: float) -> str:
    """Seconds, rounded, as `42s`, `4m05s` or `2h03m`."""
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def start_bar(label: str, total: int | None, stream: IO[str]) -> tuple[Any, Any]:
    """Start a rich progress bar on `stream` (rich is imported here: only terminals pay for it); (the bar, its task
    id)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.progress import (
        Progress as RichProgress,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:,.0f}/s" if task.speed else "", style="progress.data.speed")

    bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                       RateColumn(), TimeRemainingColumn(), console=Console(file=stream))
    bar.start()
    return bar, bar.add_task(label, total=total)
