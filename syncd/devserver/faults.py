"""Fault injection for tests (`--faults`): errors, resets, timeouts, latency and a whole-server outage.

A draw decides each API request's fate before it runs. `timeout` is the dangerous one for a sync
client: the request is applied and committed, then no answer comes (the connection is held for
`delay_ms` and closed), so the client cannot know whether the write happened.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Fate = Literal["ok", "down", "error", "reset", "timeout"]


class FaultSettings(BaseModel):
    """What to inject (PUT /_dev/faults): shares (0 to 1) of requests answered with `error_status`, reset, or timed
    out; latency; a whole-server outage; the random seed."""

    model_config = ConfigDict(extra="forbid")

    error_rate: float = Field(0.0, ge=0, le=1, description="share of requests answered with error_status")
    error_status: int = Field(503, ge=400, le=599)
    reset_rate: float = Field(0.0, ge=0, le=1, description="share of requests whose connection is closed unanswered")
    delay_ms: int = Field(0, ge=0, le=600_000, description="latency added to every answer; how long timeouts hold")
    timeout_rate: float = Field(0.0, ge=0, le=1, description="share applied, then held for delay_ms and dropped")
    down: bool = Field(False, description="answer every request 503 PGRST000 with Retry-After")
    retry_after: int = Field(1, ge=0, le=32, description="Retry-After seconds while down")
    seed: int = 0


class Faults:
    """The current settings, the random source drawn from, and what was injected so far."""

    def __init__(self) -> None:
        self.settings = FaultSettings()
        self.random = random.Random(0)
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.injected: Counter[str] = Counter()

    def configure(self, changes: dict[str, object]) -> FaultSettings:
        """Apply a partial update, validated as a whole (raises pydantic's ValidationError, a ValueError); the
        random sequence restarts from the seed."""
        self.settings = FaultSettings.model_validate({**self.settings.model_dump(), **changes})
        self.random = random.Random(self.settings.seed)
        return self.settings

    def draw(self) -> Fate:
        """The fate of the next request: "down" while down, else reset, error or timeout by their shares, else "ok";
        counts what it injects."""
        s = self.settings
        if s.down:
            fate: Fate = "down"
        else:
            roll = self.random.random()
            if roll < s.reset_rate:
                fate = "reset"
            elif roll < s.reset_rate + s.error_rate:
                fate = "error"
            elif roll < s.reset_rate + s.error_rate + s.timeout_rate:
                fate = "timeout"
            else:
                fate = "ok"
        if fate != "ok":
            self.injected[fate] += 1
        return fate

    def count(self, method: str, status: int | str) -> None:
        """Count one answered request by method and status."""
        self.requests[method][str(status)] += 1

    def stats(self) -> dict[str, object]:
        """{"requests": {method: {status: count}}, "faults": {fate: count}} (GET /_dev/stats)."""
        return {"requests": {m: dict(c) for m, c in self.requests.items()}, "faults": dict(self.injected)}

    def reset_stats(self) -> None:
        """Forget the counts (DELETE /_dev/stats)."""
        self.requests.clear()
        self.injected.clear()
