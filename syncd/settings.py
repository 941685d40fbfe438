"""The configuration and the secondary in force for one daemon. A SIGHUP swaps both at once
(`Worker.reload_if_requested`); every part of the drain loop reads them through one `Settings`, so none keeps
an old copy."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from syncd.config import Config, differences

__all__ = ["Settings", "Target"]


class Target(Protocol):
    """A secondary that can upsert rows and delete keys (`syncd.target.PostgrestTarget` is the real one).
    Every failure is a TargetError, already classified; an expired token is renewed inside."""

    def upsert(self, table: str, key: Sequence[str], rows: Sequence[dict[str, object] | str]) -> None:
        """Insert or update `rows` ({column: value}, or a JSON object's text) of `table` by its `key` columns, all
        or none."""
        ...

    def delete(self, table: str, key: Sequence[str], keys: Sequence[dict[str, object]]) -> int:
        """Delete the rows of `table` whose `key` columns hold these values ({key column: value} each); the
        number of requests it took."""
        ...

    def ping(self, table: str) -> None:
        """Read no rows of `table`: returns when the secondary answers, raises TargetError when not."""
        ...

    def describe(self) -> dict[str, object]:
        """The secondary's schema (PostgREST's OpenAPI document); raises TargetError."""
        ...


@dataclass
class Settings:
    """The configuration and the target in force (both replaced together by a reload). `reload` reads the
    configuration and builds a target anew, raising ConfigError when the configuration is bad (None: nothing to
    reload from, as in unit tests); `requested` is set by SIGHUP."""

    config: Config
    target: Target
    reload: Callable[[], tuple[Config, Target]] | None = None
    requested: threading.Event = field(default_factory=threading.Event)

    def swap(self, config: Config, target: Target) -> list[str]:
        """Put `config` and `target` in force and close the old target; the keys that changed (`differences`)."""
        changed = differences(self.config, config)
        old = self.target
        self.config, self.target = config, target
        close = getattr(old, "close", None)
        if close is not None:
            close()
        return changed
