"""Projections check themselves against the log (issue 17 item 2).

The ClickHouse tables are projections of the event log, and a damaged store does not say so:
a truncated part is moved to ``detached/`` and its rows vanish from every answer; a table whose
definition was lost comes back empty. ``ProjectionCheck`` compares, per table, how many events
of its kinds the log holds below the consumer's committed offset with how many rows the table
holds (distinct events: ``FINAL``). Counting the log is incremental (only records past the last
check are scanned), so a periodic check costs a few small queries. A table holding FEWER rows
than the log has events is damaged: the consumer replays the log in the background (idempotent
writes: nothing is duplicated) while the gateway keeps serving, and answers say
"rebuilding: N %" until it is done. A table holding more (after a log gap) is left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from consumers.runner import LogConsumer
from consumers.store.base import AuditStore, StoreError
from eventlog.base import EventLog

log = logging.getLogger("ledgergate")

_KIND = b'"kind":"'
_EVENT_ID = b'"event_id":"'

# table -> (kinds it holds, SQL counting its distinct events)
AUDIT_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "audit_calls": (("call.decided",), "SELECT count() FROM audit_calls FINAL"),
    "audit_outcomes": (("call.completed",), "SELECT count() FROM audit_outcomes FINAL"),
    "audit_sessions": (("session.opened", "session.closed"), "SELECT count() FROM audit_sessions FINAL"),
    "audit_policy_loads": (("policy.loaded",), "SELECT count() FROM audit_policy_loads FINAL"),
    "audit_auth_failures": (("auth.failed",), "SELECT count() FROM audit_auth_failures FINAL"),
    "audit_admin": (("admin.query", "admin.reload"), "SELECT count() FROM audit_admin FINAL"),
}
COUNTER_TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "counters_minute": (
        ("call.decided",),
        "SELECT toUInt64(sum(n)) FROM (SELECT uniqExactMerge(calls) AS n FROM counters_minute "
        "GROUP BY minute, server, tool, `grant`, agent, decision)",
    ),
}


@dataclass
class Rebuild:
    """A running rebuild: which tables, how far."""

    tables: list[str]
    done: int = 0
    total: int = 0

    @property
    def percent(self) -> int:
        return 0 if self.total <= 0 else min(99, self.done * 100 // self.total)

    def as_json(self) -> dict[str, object]:
        return {"tables": self.tables, "percent": self.percent}

    def note(self) -> str:
        return (
            f"note: rebuilding: {self.percent} % (the tables {', '.join(self.tables)} were damaged and are "
            "being rebuilt from the event log); this answer is partial until the rebuild ends"
        )


class LogCounts:
    """Events per kind in the log below ``upto``, advanced incrementally."""

    def __init__(self) -> None:
        self.upto = 0
        self.kinds: dict[str, int] = {}

    async def advance(self, eventlog: EventLog, to: int, batch: int = 50_000) -> None:
        if to < self.upto:  # the log went backwards (a gap): count afresh
            self.upto, self.kinds = 0, {}
        while self.upto < to:
            records = await eventlog.read(self.upto, min(batch, to - self.upto))
            if not records:
                return
            kinds = self.kinds
            for rec in records:
                p = rec.payload
                k = p.find(_KIND)
                if k < 0 or _EVENT_ID not in p:
                    continue
                end = p.find(b'"', k + 8)
                kind = p[k + 8 : end].decode("utf-8", "replace")
                kinds[kind] = kinds.get(kind, 0) + 1
            self.upto = records[-1].offset + 1
            await asyncio.sleep(0)  # a long log: let calls through between batches


class ProjectionCheck:
    """Checks the tables of ``consumers`` against the log; rebuilds damaged ones in the background."""

    def __init__(self, eventlog: EventLog, store: AuditStore, consumers: dict[LogConsumer, dict]) -> None:
        self.log = eventlog
        self.store = store
        self.consumers = consumers  # consumer -> its tables (AUDIT_TABLES / COUNTER_TABLES)
        self.counts = LogCounts()
        self.rebuilds: dict[str, Rebuild] = {}  # consumer name -> running rebuild
        self._tasks: set[asyncio.Task[None]] = set()
        self._given_up: dict[str, tuple[int, int]] = {}  # table -> (store, log) after a rebuild

    def rebuilding(self) -> Rebuild | None:
        """The running rebuilds merged into one (None when none runs)."""
        if not self.rebuilds:
            return None
        rs = list(self.rebuilds.values())
        return Rebuild(
            sorted({t for r in rs for t in r.tables}), sum(r.done for r in rs), sum(r.total for r in rs)
        )

    async def damaged(self, consumer: LogConsumer) -> dict[str, tuple[int, int]]:
        """table -> (rows in the store, events in the log) for the tables holding fewer rows
        than the log has events below the consumer's committed offset."""
        committed = await self.log.committed(consumer.name)  # first: the store only grows after it
        await self.counts.advance(self.log, committed)
        if self.counts.upto < committed:
            return {}
        out = {}
        for table, (kinds, sql) in self.consumers[consumer].items():
            expected = sum(self.counts.kinds.get(k, 0) for k in kinds)
            try:
                _, rows = await self.store.query(sql)
                have = int(rows[0][0] or 0) if rows else 0
            except StoreError as exc:  # e.g. the table is gone: it holds nothing
                log.warning("projection check: cannot count %s: %s", table, exc)
                have = 0
            if have < expected:
                out[table] = (have, expected)
        return out

    async def check(self, *, background: bool = True) -> dict[str, tuple[int, int]]:
        """One check of every consumer's tables; damaged ones are rebuilt (in a background
        task, or here when ``background`` is False). Returns what was found damaged."""
        found: dict[str, tuple[int, int]] = {}
        for consumer in self.consumers:
            if consumer.name in self.rebuilds:
                continue
            bad = await self.damaged(consumer)
            bad = {t: v for t, v in bad.items() if self._given_up.get(t) != v}
            if not bad:
                continue
            found.update(bad)
            log.error(
                "projection check: %s; the table%s %s rebuilt from the event log in the background "
                "(the gateway keeps enforcing policy; answers say 'rebuilding' until it ends)",
                "; ".join(f"{t} holds {h} rows but the log has {e} events" for t, (h, e) in bad.items()),
                "s are" if len(bad) > 1 else " is",
                "being",
            )
            job = self._rebuild(consumer, bad)
            if background:
                task = asyncio.create_task(job, name=f"rebuild-{consumer.name}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                await job
        return found

    async def _rebuild(self, consumer: LogConsumer, bad: dict[str, tuple[int, int]]) -> None:
        r = self.rebuilds[consumer.name] = Rebuild(sorted(bad))

        def progress(done: int, total: int) -> None:
            r.done, r.total = done, total

        try:
            n = await consumer.replay(0, progress)
            still = await self.damaged(consumer)
            for t, v in still.items():
                self._given_up[t] = v
                log.error(
                    "projection check: %s still holds %d rows for %d events after a rebuild; not retried "
                    "until the counts change (are some log records not valid events?)",
                    t,
                    *v,
                )
            log.warning("projection rebuilt from the log: %s (%d records replayed)", ", ".join(r.tables), n)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("projection rebuild of %s failed: %s; the next check retries", ", ".join(r.tables), exc)
        finally:
            self.rebuilds.pop(consumer.name, None)

    async def run(self, interval_s: float) -> None:
        """Check at once, then every ``interval_s`` (0: only at start-up)."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: the consumers' supervisor says so
                log.warning("projection check failed: %s", exc)
            if interval_s <= 0:
                return
            await asyncio.sleep(interval_s)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
