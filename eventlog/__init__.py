"""Event-log transports: the one persistence interface of ledgergate and its backends."""

from __future__ import annotations

from pathlib import Path

from eventlog.base import Durability, EventLog, LogUnavailable, Record
from eventlog.sqlite import SqliteEventLog

__all__ = [
    "BACKENDS",
    "Durability",
    "EventLog",
    "LogUnavailable",
    "Record",
    "SqliteEventLog",
    "open_log",
]

BACKENDS = ("embedded",)


def open_log(
    backend: str,
    data_dir: Path,
    durability: Durability = "strict",
    flush_interval_ms: float = 5.0,
) -> EventLog:
    """Build the configured event log (not yet opened: `await log.open()` or `async with log`).

    backend "embedded": SqliteEventLog at data_dir / "events.db" (the directory is
    created by open()).
    """
    if backend == "embedded":
        return SqliteEventLog(Path(data_dir) / "events.db", durability, flush_interval_ms)
    raise ValueError(f"unknown event log backend {backend!r} (known: {', '.join(BACKENDS)})")
