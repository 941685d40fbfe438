"""The lag histogram fed a batch at a time is exposed exactly as prometheus_client's own Histogram."""

from __future__ import annotations

import math
import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from syncd.metrics import LAG_BUCKETS, Metrics


def lag_lines(exposition: bytes) -> list[str]:
    return [line for line in exposition.decode().splitlines() if "replication_lag" in line and "_created" not in line]


def test_batch_histogram_matches_prometheus_histogram():
    values = [0.0, 0.01, 0.0100001, 2.5, 3600, 5000, *(random.Random(3).expovariate(2) for _ in range(1000))]
    metrics = Metrics()
    metrics.lag.observe_many(values[:500])
    metrics.lag.observe_many(values[500:])
    metrics.lag.observe(1.0)
    reference = CollectorRegistry()
    histogram = Histogram("syncd_replication_lag_seconds", "Commit in SQLite to acknowledgement by the secondary",
                          buckets=LAG_BUCKETS, registry=reference)
    for value in [*values, 1.0]:
        histogram.observe(value)
    ours, theirs = lag_lines(metrics.exposition()), lag_lines(generate_latest(reference))
    assert [line for line in ours if "_sum" not in line] == [line for line in theirs if "_sum" not in line]
    (our_sum,), (their_sum,) = ([float(line.split()[-1]) for line in lines if "_sum" in line]
                                for lines in (ours, theirs))
    assert math.isclose(our_sum, their_sum, rel_tol=1e-12)  # added in another order
    assert 'syncd_replication_lag_seconds_bucket{le="+Inf"} 1007.0' in lag_lines(metrics.exposition())
