"""Capped exponential backoff with full jitter (the delay before the next try after `failures` failures)."""

from __future__ import annotations

import random
from collections.abc import Callable


def delay(failures: int, *, base: float = 0.1, cap: float = 30.0, retry_after: float | None = None,
          rand: Callable[[], float] = random.random) -> float:
    """Uniform in [0, min(cap, base * 2**(failures-1))], but never less than the server's Retry-After."""
    ceiling: float = min(cap, base * 2 ** min(max(0, failures - 1), 64))  # 2**1024 is past a float: an outage of hours
    jittered = ceiling * rand()
    return max(jittered, min(retry_after, cap)) if retry_after is not None else jittered
