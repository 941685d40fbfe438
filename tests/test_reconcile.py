"""The reconciler's thread (syncd/reconcile.py): its jobs, retries and what it logs; in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_capture import installed
from tests.test_source import SCHEMA


def test_the_reconcilers_thread_survives_an_unexpected_error_and_retries(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """A reconcile that fails in a way nobody foresaw is logged and retried with backoff: the thread must never die
    silently, leaving every later reconcile undone while the daemon looks healthy."""
    from syncd import verify
    from syncd.metrics import Metrics
    from syncd.observer import Observer
    from syncd.reconcile import Reconciler

    path, _ = installed(tmp_path, SCHEMA, {"name": "parent"})
    calls: list[str] = []

    def fails_once(*args: object, **kwargs: object) -> object:
        calls.append("verify")
        raise KeyError("a bug")

    monkeypatch.setattr(verify, "verify", fails_once)
    now = [0.0]
    reconciler = Reconciler(path, lambda: (None, None), Observer(Metrics()), clock=lambda: now[0])  # type: ignore[arg-type,return-value]
    reconciler.request("parent", "a test")
    assert reconciler.run_next() and calls == ["verify"]
    assert reconciler.busy() and not reconciler.run_next()  # waits out its backoff, still queued
    now[0] += 120
    assert reconciler.run_next() and calls == ["verify", "verify"]
