"""The counters consumer: per-minute call counts in ClickHouse, replay-safe.

``call.decided`` payloads go as-is into the Null table ``counters_in``; a materialized
view folds them into ``counters_minute`` (AggregatingMergeTree keyed by minute, server,
tool, grant, agent, decision) as ``uniqExactState(event_id)``. A count is the number of
DISTINCT event ids in its key, and merging states is a set union, so re-delivering or
replaying events never changes a count (no FINAL needed, merges keep it exact). The
price is ~16 bytes of state per call, fine for audit volumes; a deployment that wants
less can drop old partitions (one per month). ``tool`` is the JSON-RPC method for
requests that are not tools/call.
"""

from __future__ import annotations

from datetime import datetime

from consumers.runner import LogConsumer
from consumers.store.base import Answer, AuditStore, equal_filters
from eventlog.base import EventLog

COUNT_COLUMNS = ("minute", "server", "tool", "grant", "agent", "decision", "count")


class CountersConsumer(LogConsumer):
    table = "counters_in"
    kinds = frozenset({"call.decided"})

    def __init__(
        self, log: EventLog, store: AuditStore, name: str = "counters", *, batch: int = 50_000
    ) -> None:
        super().__init__(log, store, name, batch=batch)


async def minute_counts(
    store: AuditStore,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    server: str | None = None,
    tool: str | None = None,
    agent: str | None = None,
    grant: str | None = None,
    decision: str | None = None,
) -> Answer:
    """(minute, server, tool, grant, agent, decision, count), oldest minute first."""
    where, params = equal_filters(
        {"server": server, "tool": tool, "agent": agent, "grant": grant, "decision": decision}
    )
    if since is not None:
        where.append("minute >= toStartOfMinute({since:DateTime64(3, 'UTC')})")
        params["since"] = since
    if until is not None:
        where.append("minute < {until:DateTime64(3, 'UTC')}")
        params["until"] = until
    sql = (
        "SELECT minute, server, tool, `grant`, agent, decision, uniqExactMerge(calls) AS count\n"
        "FROM counters_minute\n"
        + (f"WHERE {' AND '.join(where)}\n" if where else "")
        + "GROUP BY minute, server, tool, `grant`, agent, decision\n"
        "ORDER BY minute, server, tool, `grant`, agent, decision"
    )
    return await store.query(sql, params)
