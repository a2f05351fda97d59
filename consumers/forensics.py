"""Forensic questions over the audit tables; every answer is ``(columns, rows)``.

The SQL is fixed text; filters add fixed conditions whose values travel as server-side
parameters (``{name:Type}``), never spliced into SQL. Audit tables are read with FINAL,
so duplicates from at-least-once delivery or a replay never show up in an answer.
``sql()`` runs user-written SQL through ``AuditStore.forensic_query``: checked on the
engine's own parse tree (``consumers.sqlguard``), then run under ``readonly=1`` and the
``[store] query_*`` limits.
"""

from __future__ import annotations

import contextlib
import csv
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, Any

import orjson

from consumers.store.base import Answer, AuditStore, ReadOnlyError, equal_filters
from eventlog.base import EventLog

__all__ = ["ReadOnlyError", "calls", "denials", "parse_since", "render", "sql", "who"]

ALLOWED = ("allow",)
REFUSED = ("deny", "rate_limited", "invalid_arguments")
_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str | datetime, now: datetime | None = None) -> datetime:
    """ "7d", "1h", "30m", "45s", "2w" (before ``now``) or an ISO 8601 date/datetime
    (naive means UTC) -> an aware UTC datetime."""
    if isinstance(text, datetime):
        return text.replace(tzinfo=UTC) if text.tzinfo is None else text.astimezone(UTC)
    m = _REL.match(text)
    if m:
        base = now or datetime.now(UTC)
        return base - timedelta(**{_UNIT[m.group(2).lower()]: float(m.group(1))})
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a duration (7d, 1h, 30m) nor an ISO datetime: {text!r}") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _when(value: str | datetime | None) -> datetime | None:
    return None if value is None else parse_since(value)


def _filters(
    *,
    tool: str | None = None,
    server: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    decision: str | None = None,
    agent: str | None = None,
    grant: str | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """WHERE conditions on ``audit_calls AS c`` and their parameters."""
    where, params = equal_filters(
        {"server": server, "agent": agent, "grant": grant, "decision": decision}, alias="c."
    )
    if tool is not None:  # a tool name, or a JSON-RPC method for other requests
        where.append("(c.tool = {tool:String} OR (c.tool = '' AND c.method = {tool:String}))")
        params["tool"] = tool
    if since is not None:
        where.append("c.ts >= {since:DateTime64(3, 'UTC')}")
        params["since"] = _when(since)
    if until is not None:
        where.append("c.ts < {until:DateTime64(3, 'UTC')}")
        params["until"] = _when(until)
    return where, params


def _where(conds: list[str]) -> str:
    return f"WHERE {' AND '.join(conds)}\n" if conds else ""


def _in(values: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"  # fixed constants, not user text


async def who(
    store: AuditStore,
    tool: str,
    server: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    decision: str | None = None,
) -> Answer:
    """Who called ``tool``: one row per (agent, grant) with allowed / refused counts and
    first / last call time. Refused = deny, rate_limited, invalid_arguments."""
    conds, params = _filters(tool=tool, server=server, since=since, until=until, decision=decision)
    text = (
        "SELECT c.agent AS agent, c.`grant` AS `grant`,\n"
        f"  countIf(c.decision IN {_in(ALLOWED)}) AS allowed,\n"
        f"  countIf(c.decision IN {_in(REFUSED)}) AS refused,\n"
        "  min(c.ts) AS first, max(c.ts) AS last\n"
        "FROM audit_calls AS c FINAL\n"
        f"{_where(conds)}"
        "GROUP BY agent, `grant`\n"
        "ORDER BY agent, `grant`"
    )
    return await store.query(text, params)


async def calls(
    store: AuditStore,
    tool: str | None = None,
    server: str | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    decision: str | None = None,
    agent: str | None = None,
    grant: str | None = None,
    limit: int = 100,
) -> Answer:
    """Each call (newest first): its decision joined with its outcome, if any."""
    conds, params = _filters(
        tool=tool, server=server, since=since, until=until, decision=decision, agent=agent, grant=grant
    )
    params["limit"] = int(limit)
    outcome_since = "WHERE o.ts >= {since:DateTime64(3, 'UTC')}\n" if "since" in params else ""
    text = (
        "SELECT c.ts AS ts, c.call_id AS call_id, c.server AS server,\n"
        "  if(c.tool = '', c.method, c.tool) AS tool, c.`grant` AS `grant`, c.agent AS agent,\n"
        "  c.session AS session, c.arguments AS arguments, c.decision AS decision,\n"
        "  c.rule AS rule, c.reason AS reason, o.outcome AS outcome, o.upstream_ms AS upstream_ms\n"
        "FROM (\n"
        "  SELECT c.ts, c.call_id, c.server, c.tool, c.method, c.`grant`, c.agent, c.session,\n"
        "    c.arguments, c.decision, c.rule, c.reason\n"
        "  FROM audit_calls AS c FINAL\n"
        f"  {_where(conds)}"
        "  ORDER BY c.ts DESC, c.call_id LIMIT {limit:UInt32}\n"
        ") AS c\n"
        "LEFT JOIN (\n"
        "  SELECT o.call_id AS call_id, argMax(o.outcome, o.ts) AS outcome,\n"
        "    argMax(o.upstream_ms, o.ts) AS upstream_ms\n"
        "  FROM audit_outcomes AS o FINAL\n"
        f"  {outcome_since}"
        "  GROUP BY o.call_id\n"
        ") AS o ON c.call_id = o.call_id\n"
        "ORDER BY ts DESC, call_id\n"
        "SETTINGS join_use_nulls = 1"
    )
    return await store.query(text, params)


UNAUTHENTICATED = "(unauthenticated)"  # the agent of failed authentication in denials
AUTH_RULE = "auth"


async def denials(
    store: AuditStore,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    server: str | None = None,
    tool: str | None = None,
    agent: str | None = None,
) -> Answer:
    """Refusals grouped by (agent, tool, rule): count, first, last; most frequent first.

    Failed authentication (auth.failed) is a refusal too, asked about as "who tried to get
    in": rows with agent ``(unauthenticated)``, tool empty, rule ``auth``, grouped by source
    address (``remote``) and ``reason``, ``count`` summing the aggregated events. Call
    refusals leave remote and reason empty. A tool filter, or an agent filter naming
    someone else, leaves them out."""
    conds, params = _filters(tool=tool, server=server, since=since, until=until, agent=agent)
    conds.append(f"c.decision IN {_in(REFUSED)}")
    text = (
        "SELECT c.agent AS agent, if(c.tool = '', c.method, c.tool) AS tool, c.rule AS rule,\n"
        "  count() AS count, min(c.ts) AS first, max(c.ts) AS last,\n"
        "  '' AS remote, '' AS reason\n"
        "FROM audit_calls AS c FINAL\n"
        f"{_where(conds)}"
        "GROUP BY agent, tool, rule\n"
    )
    if tool is None and agent in (None, UNAUTHENTICATED):
        auth: list[str] = []
        if server is not None:
            auth.append("a.server = {server:String}")
        if since is not None:
            auth.append("a.last_ts >= {since:DateTime64(3, 'UTC')}")
        if until is not None:
            auth.append("a.first_ts < {until:DateTime64(3, 'UTC')}")
        text = (
            f"SELECT * FROM (\n{text}"
            "UNION ALL\n"
            f"SELECT '{UNAUTHENTICATED}' AS agent, '' AS tool, '{AUTH_RULE}' AS rule,\n"
            "  sum(a.`count`) AS count, min(a.first_ts) AS first, max(a.last_ts) AS last,\n"
            "  a.remote AS remote, toString(a.reason) AS reason\n"
            "FROM audit_auth_failures AS a FINAL\n"
            f"{_where(auth)}"
            "GROUP BY remote, reason\n"
            ")\n"
        )
    text += "ORDER BY count DESC, agent, tool, rule, remote, reason"
    return await store.query(text, params)


async def sql(store: AuditStore, text: str, params: Mapping[str, Any] | None = None) -> Answer:
    """User-written SQL with ``{name:Type}`` parameters: one SELECT over ledgergate's tables.
    Raises ReadOnlyError for anything else (writes, DDL, table functions such as file() or
    url(), other databases, SETTINGS / FORMAT / INTO OUTFILE). ``rows.note`` says when a
    limit cut the answer."""
    return await store.forensic_query(text, params or {})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat(sep=" ", timespec="milliseconds").replace("+00:00", "Z")
    return str(value)


def render(
    columns: list[str], rows: list[tuple[Any, ...]], fmt: str = "table", out: IO[str] | None = None
) -> None:
    """Print an answer as a rich table, JSON (a list of objects) or CSV with a header."""
    import sys

    out = out or sys.stdout
    if fmt == "json":
        doc = [dict(zip(columns, row, strict=True)) for row in rows]
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NAIVE_UTC).decode() + "\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow([_cell(v) for v in row])
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table

        table = Table(show_header=True, header_style="bold")
        for col in columns:
            table.add_column(col, overflow="fold")
        for row in rows:
            table.add_row(*(_cell(v) for v in row))
        Console(file=out, width=200 if not getattr(out, "isatty", lambda: False)() else None).print(table)
        out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")
    else:
        raise ValueError(f"format must be table, json or csv, not {fmt!r}")


# ---------------------------------------------------------------- lag behind the log


@dataclass(frozen=True, slots=True)
class Lag:
    """How far the tables an answer was read from are behind the event log."""

    events: int  # records on the log not yet folded into the tables
    seconds: float  # age of the oldest record not yet folded (0 when unknown)

    def as_json(self) -> dict[str, float | int]:
        return {"events": self.events, "seconds": round(self.seconds, 3)}

    def note(self) -> str:
        return (
            f"note: the audit tables are {self.events} event{'s' if self.events != 1 else ''} "
            f"({self.seconds:.1f} s) behind the log; this answer does not include them yet"
        )


class LaggedAnswer(tuple):
    """An ``Answer`` (unpacks as ``columns, rows``) that also says how far behind it is."""

    lag: Lag | None

    def __new__(cls, columns: list[str], rows: list[tuple[Any, ...]], lag: Lag | None) -> LaggedAnswer:
        self = super().__new__(cls, (columns, rows))
        self.lag = lag
        return self


async def lag_behind(eventlog: EventLog, consumers: list[str], now_ms: int) -> Lag | None:
    """The lag of the slowest of ``consumers`` (their committed offsets) behind the log end,
    None when they are all caught up. Seconds come from the oldest unfolded event's ``ts``."""
    end = await eventlog.end_position()
    behind = 0
    starts: list[tuple[int, int]] = []  # (partition, first unfolded offset) of the slowest
    for name in consumers:
        at = await eventlog.committed_position(name)
        n = sum(max(0, o - at.get(p, 0)) for p, o in end.items())
        if n > behind:
            behind = n
            starts = [(p, at.get(p, 0)) for p, o in end.items() if at.get(p, 0) < o]
    if behind <= 0:
        return None
    oldest: int | None = None
    for partition, offset in starts:
        first = await eventlog.read_partition(partition, offset, 1)
        if first:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                ts = orjson.loads(first[0].payload).get("ts")
                if isinstance(ts, int) and (oldest is None or ts < oldest):
                    oldest = ts
    seconds = max(0.0, (now_ms - oldest) / 1000) if oldest is not None else 0.0
    return Lag(behind, seconds)
