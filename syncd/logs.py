"""Structured logs: JSON lines by default (for machines), `--log-format console` for people."""

from __future__ import annotations

import logging
import sys
from typing import cast

import structlog

from syncd import redact


def configure(log_format: str = "json", level: int = logging.INFO) -> None:
    """Set up structlog for the whole process: JSON lines (`log_format` "json") or plain text for people ("console"),
    on stderr, with the level and an ISO 8601 UTC timestamp, dropping events below `level` (a `logging` level)."""
    console = log_format == "console"
    renderer = structlog.dev.ConsoleRenderer(colors=False) if console else structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, redact.processor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger() -> structlog.typing.FilteringBoundLogger:
    """The logger every syncd module logs through (structlog's, named "syncd")."""
    return cast(structlog.typing.FilteringBoundLogger, structlog.get_logger("syncd"))
