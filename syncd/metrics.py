"""Prometheus metrics of the daemon, and the small HTTP server for /metrics, /healthz and /readyz.

The metric names are a contract (dashboards and alerts use them). Labels carry table names and
classes only, never a key, a value or a secret.
"""

from __future__ import annotations

import bisect
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from syncd import __version__

SNAPSHOT_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


@dataclass
class Health:
    """What /healthz and /readyz answer from: the loop's heartbeat, its last exchange with the secondary, the state
    of the application's file, halted tables, and whether the loop died."""

    heartbeat: float = field(default_factory=time.time)  # unix seconds of the loop's last beat
    target_ok: bool = False
    reason: str = "no exchange with the secondary yet"
    halted: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)  # table -> which of its changes wait for a halted table
    source_problem: str | None = None  # why the application's file cannot be used now (busy, disk fault, gone)
    standby: str | None = None  # why this daemon does not drain (another one holds the lease)
    failed: str | None = None  # the loop ended with an error: not alive
    alive_within: float = 60.0  # seconds

    def alive(self) -> bool:
        """Whether the loop beat within the last `alive_within` seconds and has not died (/healthz)."""
        return self.failed is None and time.time() - self.heartbeat < self.alive_within

    def ready(self) -> tuple[bool, str]:
        """(ready, reason) for /readyz: not ready while the loop is dead, this daemon stands by, the application's
        file cannot be used, a table is halted (the reason names each) or the last exchange with the secondary
        failed."""
        if self.failed is not None:
            return False, f"the drain loop stopped: {self.failed}"
        if self.standby is not None:
            return False, self.standby
        if self.source_problem is not None:
            return False, self.source_problem
        if self.halted:
            waiting = "".join(f"; {t}: {r}" for t, r in sorted(self.waiting.items()))
            return False, "halted: " + "; ".join(f"{t}: {r}" for t, r in sorted(self.halted.items())) + waiting
        return (True, "ok") if self.target_ok else (False, self.reason)


class BatchHistogram:
    """A histogram fed a whole batch of observations at once (the lag of every outbox entry acknowledged):
    one lock and a bisect per value, where prometheus_client's Histogram takes a lock per bucket and per sum
    for each value (a tenth of the drain's CPU at 500-entry batches). Exposed exactly as a Histogram."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Count every value (seconds, for the lag) at once, under one lock."""
        counts = [0] * len(self.counts)
        total = 0.0
        for value in values:
            counts[bisect.bisect_left(self.bounds, value)] += 1  # le: a value equal to a bound falls in it
            total += value
        with self.lock:
            self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
            self.sum += total

    def observe(self, value: float) -> None:
        """Count one value."""
        self.observe_many((value,))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The histogram for prometheus_client's registry: one family with cumulative buckets up to +Inf, and the
        sum."""
        with self.lock:
            counts, total = list(self.counts), self.sum
        cumulative = list(itertools.accumulate(counts))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], [(floatToGoString(b), c) for b, c in zip(self.bounds, cumulative, strict=False)]
                          + [("+Inf", cumulative[-1])], total)
        yield family

    def describe(self) -> list[HistogramMetricFamily]:
        """The family without samples: the registry takes the metric's names from it when registering."""
        return [HistogramMetricFamily(self.name, self.documentation)]


class Metrics:
    """The daemon's Prometheus registry with every metric syncd exposes (their names and labels are the contract),
    and the `Health` that /healthz and /readyz answer from."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pending = Gauge("syncd_outbox_pending", "Outbox entries waiting to ship", ["table"], registry=r)
        self.oldest_age = Gauge("syncd_outbox_oldest_age_seconds", "Age of the oldest waiting change", ["table"],
                                registry=r)
        self.shipped = Counter("syncd_rows_shipped_total", "Rows acknowledged by the secondary", ["table", "op"],
                               registry=r)
        self.failures = Counter("syncd_ship_failures_total", "Failed exchanges by class", ["table", "class"],
                                registry=r)
        self.retries = Counter("syncd_retries_total", "Retried exchanges", ["table"], registry=r)
        self.requeued = Counter("syncd_requeued_total", "Changes sent to the outbox's tail behind what they depend on "
                                "(reason: foreign key, unique value); not failures", ["table", "reason"], registry=r)
        self.dead_letters = Gauge("syncd_dead_letters", "Rows in the dead-letter table", ["table"], registry=r)
        self.batch_duration = Histogram("syncd_batch_duration_seconds", "Claim to acknowledge of one batch",
                                        registry=r)
        self.lag = BatchHistogram("syncd_replication_lag_seconds",
                                  "Commit in SQLite to acknowledgement by the secondary", LAG_BUCKETS, r)
        self.last_success = Gauge("syncd_last_success_timestamp_seconds", "Last successful exchange", registry=r)
        self.target_up = Gauge("syncd_target_up", "1 when the last exchange with the secondary succeeded",
                               registry=r)
        self.halted = Gauge("syncd_table_halted", "1 while shipping a table is halted (bad key, RLS denial, "
                            "schema mismatch, capture lost its key)", ["table"], registry=r)
        self.waiting = Gauge("syncd_table_waiting", "1 while some changes of a table wait for a halted table they "
                             "depend on by a foreign key (a parent's deletes, a child's upserts)", ["table"],
                             registry=r)
        self.capture_repairs = Counter("syncd_capture_repairs_total", "Triggers reinstalled by the daemon after a "
                                       "schema change lost or outdated them", ["table"], registry=r)
        self.reconciles = Counter("syncd_reconciles_total", "Reconciles of a table with the secondary, by outcome "
                                  "(done, failed)", ["table", "outcome"], registry=r)
        self.reconciled_keys = Counter("syncd_reconciled_keys_total", "Keys a reconcile found different and enqueued",
                                       ["table"], registry=r)
        self.source_ok = Gauge("syncd_source_ok", "1 while the application's SQLite file can be read and written "
                               "(0: busy past the timeout, disk full, read-only, I/O error, gone)", registry=r)
        self.source_errors = Counter("syncd_source_errors_total", "Failed steps on the application's file, by kind "
                                     "(busy, full, readonly, io, gone)", ["kind"], registry=r)
        self.source_replaced = Counter("syncd_source_replaced_total", "Times the application's file was replaced "
                                       "under the daemon (a restore) and reopened", registry=r)
        self.snapshots = Counter("syncd_snapshots_total", "Snapshots of the file sent in snapshot mode, by outcome "
                                 "(applied; repeated: a retry of one applied before; refused: none of it applied)",
                                 ["outcome"], registry=r)
        self.snapshot_entries = Histogram("syncd_snapshot_entries", "Outbox entries per snapshot applied",
                                          buckets=SNAPSHOT_BUCKETS, registry=r)
        self.snapshot_staged = Counter("syncd_snapshot_chunks_staged_total", "Chunks of large snapshots staged in the "
                                       "secondary before their apply", registry=r)
        self.build_info = Gauge("syncd_build_info", "syncd version", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self.health = Health()

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format: the body of /metrics."""
        return generate_latest(self.registry)


WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]", "": "127.0.0.1"}  # a server on every interface, asked here


def local_url(address: str, path: str) -> str:
    """The URL of `path` (/healthz, /readyz) on the metrics server at `address` (host:port), as asked from this host:
    a wildcard host (0.0.0.0, [::], none) is asked on loopback."""
    host, _, port = address.rpartition(":")
    return f"http://{WILDCARD_HOSTS.get(host, host)}:{port}{path}"


def serve(metrics: Metrics, address: str) -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on `address` (host:port) in a daemon thread."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self.answer(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                alive = metrics.health.alive()
                self.answer(200 if alive else 503, json.dumps({"alive": alive}).encode())
            elif self.path == "/readyz":
                ready, reason = metrics.health.ready()
                answer: dict[str, object] = {"ready": ready, "reason": reason}
                troubled = getattr(metrics.health, "troubled", None)  # multi-file mode: each file not shipping
                if troubled is not None:
                    answer["files"] = troubled()
                self.answer(200 if ready else 503, json.dumps(answer).encode())
            else:
                self.answer(404, b'{"error": "not found"}')

        def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server_class = ThreadingHTTPServer
    if host.startswith("["):  # an IPv6 literal: [::1]:9464
        host = host[1:-1]
        server_class = cast(type[ThreadingHTTPServer],
                            type("IPv6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6}))
    server = server_class((host, int(port)), Handler)
    # A short poll interval: shutdown() waits for it, and `syncd run --once` should exit promptly.
    threading.Thread(target=server.serve_forever, args=(0.05,), name="syncd-metrics", daemon=True).start()
    return server
