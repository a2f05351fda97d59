"""The audit consumer: folds the event log into the ClickHouse audit tables.

At-least-once: a batch is read from the consumer's committed offset, inserted, and only
then is the next offset committed; a crash in between re-inserts the batch on restart.
That is harmless because the writes are idempotent (see schemas/clickhouse/001_audit.sql:
ReplacingMergeTree keyed by the event's own fields ending in event_id, read with FINAL),
so ``replay()`` from offset 0 never changes a forensic answer.

Speed: payloads are validated as JSON objects (``decode_raw``) and then handed to
ClickHouse as-is (JSONEachRow into the Null table ``audit_events_in``, or
``security_events_in`` for auth.failed / admin.*; materialized views route each kind into
its table), so Python does no per-field work. Payloads that do
not look like the gateway's compact JSON are parsed with ``decode_raw`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from consumers.runner import LogConsumer
from consumers.store import AuditStore
from eventlog.base import EventLog, Record
from schemas.events import (
    ALERT_KINDS,
    APPROVAL_KINDS,
    CALL_KINDS,
    EVENT_ID_MARKER,
    KIND_MARKER,
    SECURITY_KINDS,
    decode_raw,
)

log_ = logging.getLogger(__name__)

Progress = Callable[[int, int], Any]

_KIND_LEN = len(KIND_MARKER)


def event_kind(payload: bytes) -> str | None:
    """The kind of one event payload: the FIRST ``"kind":"`` of the gateway's compact JSON,
    which precedes every agent-controlled field (an argument object holding ``"kind":
    "auth.failed"`` must not move a call.decided to another table); else parsed."""
    k = payload.find(KIND_MARKER)
    if k >= 0:
        end = payload.find(b'"', k + _KIND_LEN)
        if end > 0:
            return payload[k + _KIND_LEN : end].decode("utf-8", "replace")
    try:
        ev = decode_raw(payload)
    except orjson.JSONDecodeError:
        return None
    kind = ev.get("kind") if isinstance(ev, dict) else None
    return kind if isinstance(kind, str) else None


class AuditConsumer(LogConsumer):
    """Every event kind -> audit_calls / audit_outcomes / audit_sessions / audit_policy_loads
    (through audit_events_in), and auth.failed / admin.* -> audit_auth_failures /
    audit_admin (through security_events_in, 003_security.sql)."""

    table = "audit_events_in"
    security_table = "security_events_in"
    alerts_table = "alert_events_in"  # alert.* -> audit_alerts / audit_alert_deliveries (005_alerts.sql)
    _security = frozenset(SECURITY_KINDS)
    _alerts = frozenset(ALERT_KINDS)
    _calls = frozenset(CALL_KINDS)
    # approval.* / config.loaded -> audit_approval_requests / _resolutions / audit_config_loads (008)
    approvals_table = "approval_events_in"
    _approvals = frozenset(APPROVAL_KINDS)

    def route(self, payloads: list[bytes]) -> list[tuple[str, list[bytes]]]:
        calls: list[bytes] = []
        security: list[bytes] = []
        alerts: list[bytes] = []
        approvals: list[bytes] = []
        for p in payloads:
            kind = event_kind(p)
            if kind in self._security:
                security.append(p)
            elif kind in self._calls:
                calls.append(p)
            elif kind in self._alerts:
                alerts.append(p)
            elif kind in self._approvals:
                approvals.append(p)
        routed = (
            (self.table, calls),
            (self.security_table, security),
            (self.alerts_table, alerts),
            (self.approvals_table, approvals),
        )
        return [(t, part) for t, part in routed if part]

    def __init__(self, log: EventLog, store: AuditStore, name: str = "audit", *, batch: int = 50_000) -> None:
        super().__init__(log, store, name, batch=batch)
        # the kind's bytes as they sit in a compact payload -> its table
        self._tables: dict[bytes, str] = {}
        for table, kinds in (
            (self.security_table, self._security),
            (self.table, self._calls),
            (self.alerts_table, self._alerts),
            (self.approvals_table, self._approvals),
        ):
            for kind in kinds:
                self._tables.setdefault(kind.encode(), table)

    def routed(self, records: Sequence[Record], *, strict: bool = False) -> list[tuple[str, list[bytes]]]:
        """select() and route() in one pass (loop thread, every record): the gateway's compact
        payloads go by the kind at their FIRST marker straight to its table, as route() would
        send them; anything else (and everything when ``strict``) takes select() + route()."""
        if strict:
            return super().routed(records, strict=True)
        tables = self._tables
        parts: dict[str, list[bytes]] = {}
        rest: list[Record] = []
        for rec in records:
            p = rec.payload
            if p[:1] == b"{" and EVENT_ID_MARKER in p:
                k = p.find(KIND_MARKER)
                if k >= 0:
                    end = p.find(b'"', k + _KIND_LEN)
                    table = tables.get(p[k + _KIND_LEN : end]) if end > 0 else None
                    if table is not None:
                        part = parts.get(table)
                        if part is None:
                            part = parts[table] = []
                        part.append(p)
                    # else: a kind without a table; select() may keep it, route() drops it
                    continue
            rest.append(rec)
        if rest:
            for table, part in self.route(self.select(rest)):
                parts.setdefault(table, []).extend(part)
        return list(parts.items())
