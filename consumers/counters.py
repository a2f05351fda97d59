"""The counters consumer: per-minute call counts in ClickHouse, replay-safe.

``call.decided`` payloads go as-is into the Null table ``counters_in``; a materialized
view folds them into ``counters_minute`` (AggregatingMergeTree keyed by minute, server,
tool, grant, agent, decision) as ``uniqExactState(event_id)``. A count is the number of
DISTINCT event ids in its key, and merging states is a set union, so re-delivering or
replaying events never changes a count (no FINAL needed, merges keep it exact). The
price is ~16 bytes of state per call, fine for audit volumes; a deployment that wants
less can drop old partitions (one per month). ``tool`` is the JSON-RPC method for
requests that are not tools/call.

The audit insert fills ``counters_minute`` too (009_counters_from_audit.sql). So in
``ledgergate run`` the counters consumer rides on the audit consumer
(``LogConsumer.ride_on``): it commits what audit stored in this process without reading or
inserting those records itself, and inserts on its own only what audit does not store in
time (audit down or retrying) or what precedes audit's start in this process. Run alone
(``ledgergate consume``, ``replay``, the projection check's rebuild) it inserts as above.
"""

from __future__ import annotations

from consumers.runner import LogConsumer
from consumers.store.base import AuditStore
from eventlog.base import EventLog


class CountersConsumer(LogConsumer):
    table = "counters_in"
    kinds = frozenset({"call.decided"})

    def __init__(
        self, log: EventLog, store: AuditStore, name: str = "counters", *, batch: int = 50_000
    ) -> None:
        super().__init__(log, store, name, batch=batch)
