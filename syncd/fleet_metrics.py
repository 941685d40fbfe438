"""Metrics and health of multi-file mode, at a cardinality that does not grow with the number of files.

Each file's worker announces to its own `Observer` as in single-file mode; that observer writes into a
`FileMetrics`: the counters and histograms are the daemon's own (they add up across files), the gauges of a file's
state (pending, oldest age, dead letters, halted, waiting, source ok) are kept per file in memory, and the health
(/readyz's reasons) is the file's. At each scrape, `FleetCollector` exposes those gauges summed (or, for an age,
the maximum) over the files under their usual names, plus per-file series for a bounded set only: the
`FILE_SERIES` files most behind and every file halted, failing or not installed (up to `FILE_SERIES` more).
`FleetHealth` answers /healthz from the drive threads' heartbeat and /readyz from every file's health.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from syncd.metrics import Health, Metrics

__all__ = ["FILE_SERIES", "FileMetrics", "FileState", "FleetCollector", "FleetHealth", "fleet_metrics"]

FILE_SERIES = 20  # files with series of their own: the most behind, then those with a problem
# The gauges kept per file and aggregated at a scrape: name -> how files add up. halted and waiting stay 0/1 (1: in
# some file), as the alerts read them; how many files: syncd_files and syncd_file_problem.
AGGREGATED = {"pending": "sum", "oldest_age": "max", "dead_letters": "sum", "halted": "max", "waiting": "max",
              "source_ok": "min"}
READY_REASONS = 3  # files named in /readyz's reason


class LocalGauge:
    """A gauge of one file, in memory: `labels(table=...)` and `set` as prometheus_client's Gauge (the subset the
    Observer uses)."""

    def __init__(self, values: dict[str, float], label: str = "") -> None:
        self.values = values
        self.label = label

    def labels(self, **labels: str) -> LocalGauge:
        return LocalGauge(self.values, next(iter(labels.values()), ""))

    def set(self, value: float) -> None:
        self.values[self.label] = float(value)


@dataclass
class FileHealth(Health):
    """One file's health; remembers when the last exchange with the secondary was told (`target_at`, unix
    seconds), so that the daemon's readiness follows the latest exchange of any file."""

    target_at: float = 0.0  # set after target_ok by the dataclass's __init__: 0.0 means never told

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name == "target_ok" and "target_at" in self.__dict__:  # not in __init__: never told yet
            super().__setattr__("target_at", time.time())


@dataclass
class FileState:
    """What the daemon knows of one file now: its gauges ({gauge: {table or '': value}}), its health, and the
    problem that keeps it from being served at all (not installed, cannot be opened, its drain failed)."""

    name: str
    tenant: str | None
    gauges: dict[str, dict[str, float]] = field(default_factory=lambda: {name: {} for name in AGGREGATED})
    health: FileHealth = field(default_factory=FileHealth)
    problem: str | None = None
    served: bool = True  # False: another daemon holds its lease, or it is not in this daemon's shard

    def pending(self) -> float:
        return sum(self.gauges["pending"].values())

    def oldest_age(self) -> float:
        return max(self.gauges["oldest_age"].values(), default=0.0)

    def trouble(self) -> str | None:
        """Why this file does not ship now (None: it does, or waits its turn): its problem, a fault of the file, a
        halted table."""
        if self.problem is not None:
            return self.problem
        health = self.health
        if health.failed is not None:
            return f"the drain loop stopped: {health.failed}"
        if health.source_problem is not None:
            return health.source_problem
        if health.halted:
            return "halted: " + "; ".join(f"{t}: {r}" for t, r in sorted(health.halted.items()))
        return None


class FileMetrics(Metrics):
    """The `Metrics` an Observer of one file writes into: the daemon's counters and histograms, this file's gauges
    (`FileState.gauges`) and health. The target's gauges (up, last success) are the daemon's: one secondary."""

    def __init__(self, shared: Metrics, state: FileState) -> None:  # no super().__init__: nothing is registered
        self.registry = shared.registry
        for name, value in vars(shared).items():
            if name not in ("registry", "health"):
                setattr(self, name, value)
        for name in AGGREGATED:
            setattr(self, name, cast(Gauge, LocalGauge(state.gauges[name])))
        self.state = state
        self.health = state.health


class FleetHealth(Health):
    """/healthz: a drive thread beat within `alive_within` and the daemon has not died. /readyz: every served file
    ships (the reason names the first files that do not, with why) and the last exchange with the secondary
    succeeded."""

    def __init__(self, files: Callable[[], list[FileState]]) -> None:
        super().__init__()
        self.files = files

    def ready(self) -> tuple[bool, str]:
        if self.failed is not None:
            return False, f"the drain loop stopped: {self.failed}"
        states = [state for state in self.files() if state.served]
        troubled = [(state.name, reason) for state in states if (reason := state.trouble()) is not None]
        if troubled:
            shown = "; ".join(f"{name}: {reason}" for name, reason in troubled[:READY_REASONS])
            more = f"; and {len(troubled) - READY_REASONS} more (syncd status)" if len(troubled) > READY_REASONS else ""
            return False, f"{len(troubled)} of {len(states)} files not shipping: {shown}{more}"
        latest = max((state.health for state in states), key=lambda health: health.target_at, default=None)
        if latest is None or latest.target_at == 0.0:
            return False, self.reason
        return (True, "ok") if latest.target_ok else (False, latest.reason)

    def troubled(self) -> dict[str, str]:
        """{file: why it does not ship} for every served file with a problem (/readyz's JSON)."""
        return {state.name: reason for state in self.files() if state.served and (reason := state.trouble())}


class FleetCollector(Collector):
    """At a scrape: the per-file gauges aggregated under their usual names, `syncd_files{state}`, and per-file
    series (`syncd_file_pending`, `syncd_file_oldest_age_seconds`, `syncd_file_problem`) for a bounded set."""

    def __init__(self, shared: Metrics, files: Callable[[], list[FileState]]) -> None:
        self.shared = shared
        self.files = files
        self.lock = threading.Lock()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        states = self.files()
        for name, how in AGGREGATED.items():
            gauge = getattr(self.shared, name)
            family = GaugeMetricFamily(gauge._name, gauge._documentation, labels=list(gauge._labelnames))
            totals: dict[str, float] = {}
            for state in states:
                for label, value in state.gauges[name].items():
                    if label not in totals:
                        totals[label] = value
                    elif how == "sum":
                        totals[label] += value
                    elif how == "max":
                        totals[label] = max(totals[label], value)
                    else:
                        totals[label] = min(totals[label], value)
            if name == "source_ok" and not totals:
                totals[""] = 1.0
            for label, value in sorted(totals.items()):
                family.add_metric([label] if gauge._labelnames else [], value)
            yield family
        yield from self.file_families(states)

    def file_families(self, states: list[FileState]) -> Iterator[GaugeMetricFamily]:
        counts = GaugeMetricFamily("syncd_files", "Files matching source.glob, by state (shipping: served without "
                                   "a problem; troubled: halted, failing or not installed; not_served: another "
                                   "daemon holds the lease)", labels=["state"])
        troubled = [(state, reason) for state in states if state.served and (reason := state.trouble())]
        served = sum(1 for state in states if state.served)
        counts.add_metric(["shipping"], served - len(troubled))
        counts.add_metric(["troubled"], len(troubled))
        counts.add_metric(["not_served"], len(states) - served)
        yield counts
        behind = sorted((s for s in states if s.pending() > 0), key=lambda s: (-s.oldest_age(), -s.pending()))
        pending = GaugeMetricFamily("syncd_file_pending", f"Outbox entries waiting, for the {FILE_SERIES} files "
                                    "most behind", labels=["file", "tenant"])
        age = GaugeMetricFamily("syncd_file_oldest_age_seconds", f"Age of the oldest waiting change, for the "
                                f"{FILE_SERIES} files most behind", labels=["file", "tenant"])
        for state in behind[:FILE_SERIES]:
            pending.add_metric([state.name, state.tenant or ""], state.pending())
            age.add_metric([state.name, state.tenant or ""], state.oldest_age())
        problem = GaugeMetricFamily("syncd_file_problem", f"1 for each file that does not ship (up to {FILE_SERIES}): "
                                    "halted, failing, not installed; the reason is in syncd status",
                                    labels=["file", "tenant"])
        for state, _ in troubled[:FILE_SERIES]:
            problem.add_metric([state.name, state.tenant or ""], 1)
        yield from (pending, age, problem)


def fleet_metrics(files: Callable[[], list[FileState]]) -> Metrics:
    """The daemon's Metrics for multi-file mode: the per-file gauges come from `files` at each scrape (summed), and
    health from `FleetHealth`."""
    metrics = Metrics()
    for name in AGGREGATED:
        metrics.registry.unregister(getattr(metrics, name))
    metrics.registry.register(FleetCollector(metrics, files))
    metrics.health = FleetHealth(files)
    metrics.health.heartbeat = time.time()
    return metrics
