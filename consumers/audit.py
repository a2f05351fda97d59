"""The audit consumer: folds the event log into the ClickHouse audit tables.

At-least-once: a batch is read from the consumer's committed offset, inserted, and only
then is the next offset committed; a crash in between re-inserts the batch on restart.
That is harmless because the writes are idempotent (see schemas/clickhouse/001_audit.sql:
ReplacingMergeTree keyed by the event's own fields ending in event_id, read with FINAL),
so ``replay()`` from offset 0 never changes a forensic answer.

Speed: payloads are validated as JSON objects (``decode_raw``) and then handed to
ClickHouse as-is (JSONEachRow into the Null table ``audit_events_in``; materialized views
route each kind into its table), so Python does no per-field work. Payloads that do
not look like the gateway's compact JSON are parsed with ``decode_raw`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from consumers.runner import LogConsumer
from consumers.store.base import AuditStore
from eventlog.base import EventLog

log_ = logging.getLogger(__name__)

Progress = Callable[[int, int], Any]


class AuditConsumer(LogConsumer):
    """Every event kind -> audit_calls / audit_outcomes / audit_sessions / audit_policy_loads."""

    table = "audit_events_in"

    def __init__(self, log: EventLog, store: AuditStore, name: str = "audit", *, batch: int = 50_000) -> None:
        super().__init__(log, store, name, batch=batch)
