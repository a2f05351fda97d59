"""Event-log transports: the one persistence interface of ledgergate and its backends."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eventlog.base import Durability, EventLog, LogUnavailable, Position, Record
from eventlog.sqlite import SqliteEventLog

__all__ = [
    "BACKENDS",
    "Durability",
    "EventLog",
    "LogUnavailable",
    "Position",
    "Record",
    "SqliteEventLog",
    "open_log",
]

BACKENDS = ("embedded", "kafka")


def open_log(
    backend: str,
    data_dir: Path,
    durability: Durability = "strict",
    flush_interval_ms: float = 5.0,
    *,
    bootstrap: str | None = None,
    topic: str = "ledgergate.decisions",
    partitions: int = 6,
    replication: int = 1,
    spool_after_ms: float = 1000.0,
    **kafka_options: Any,
) -> EventLog:
    """Build the configured event log (not yet opened: `await log.open()` or `async with log`).

    backend "embedded": SqliteEventLog at data_dir / "events.db" (the directory is
    created by open()).
    backend "kafka": KafkaEventLog on `topic` at `bootstrap` (HOST:PORT[,HOST:PORT...]),
    spooling to data_dir / "spool.db" while the broker is down or slow. aiokafka is
    imported only here (the `kafka` extra).
    """
    if backend == "embedded":
        return SqliteEventLog(Path(data_dir) / "events.db", durability, flush_interval_ms)
    if backend == "kafka":
        if not bootstrap:
            raise ValueError("the kafka event log needs bootstrap = HOST:PORT ([eventlog] bootstrap)")
        from eventlog.kafka import KafkaEventLog

        return KafkaEventLog(
            bootstrap,
            topic,
            durability,
            flush_interval_ms,
            spool_path=Path(data_dir) / "spool.db",
            partitions=partitions,
            replication=replication,
            spool_after_ms=spool_after_ms,
            **kafka_options,
        )
    raise ValueError(f"unknown event log backend {backend!r} (known: {', '.join(BACKENDS)})")
