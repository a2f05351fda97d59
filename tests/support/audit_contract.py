"""The assertions shared by the chDB and the ClickHouse-server store tests.

A test module subclasses ``AuditStoreContract`` and provides an async ``store`` fixture
(an opened AuditStore with its schema, on an empty database); every test here then runs
against that backend unchanged.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumers import forensics
from consumers.audit import AuditConsumer
from consumers.counters import CountersConsumer
from consumers.store.base import Answer, AuditStore, ReadOnlyError, equal_filters
from eventlog.base import EventLog
from schemas import events as E

T0 = datetime(2025, 1, 6, 10, 0, 0, tzinfo=UTC)
QUOTED_AGENT = 'o\'brien "the" \\agent\t;--'
RULE_LIMIT = "/tools/open_session/limits/0"


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
    """(minute, server, tool, grant, agent, decision, count), oldest minute first: the counters
    consumer's table as an operator reads it."""
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


def ms(dt: datetime) -> int:
    return int(dt.timestamp() * 1000)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def scenario() -> list[E._Event]:
    """A small, deterministic week of gateway life (timestamps fixed)."""
    evs: list[E._Event] = []
    n = 0

    def call(
        t: float,
        agent: str,
        grant: str,
        tool: str | None,
        decision: str,
        *,
        outcome: str | None,
        rule: str | None = None,
        reason: str | None = None,
        server: str = "whatsapp",
        method: str = "tools/call",
        args: dict | None = None,
        upstream_ms: float | None = None,
    ) -> None:
        nonlocal n
        n += 1
        cid = f"call-{n:03d}"
        evs.append(
            E.CallDecided(
                ts=ms(at(t)),
                call_id=cid,
                server=server,
                method=method,
                tool=tool,
                grant=grant,
                agent=agent,
                session="sess-1",
                arguments=args,
                decision=decision,
                rule=rule,
                reason=reason,
                gateway="gw-1",
            )
        )
        if outcome is not None:
            evs.append(
                E.CallCompleted(
                    ts=ms(at(t + 0.05)),
                    call_id=cid,
                    server=server,
                    method=method,
                    tool=tool,
                    grant=grant,
                    agent=agent,
                    session="sess-1",
                    outcome=outcome,
                    upstream_ms=upstream_ms,
                    gateway="gw-1",
                )
            )

    evs.append(E.PolicyLoaded(ts=ms(at(-5)), server="whatsapp", path="policy.json", policy_version="abc"))
    evs.append(
        E.SessionOpened(
            ts=ms(at(-1)),
            session="sess-1",
            server="whatsapp",
            grant="g-alice",
            agent="agent-a",
            client_name="claude",
        )
    )
    call(0, "agent-a", "g-alice", "open_session", "allow", outcome="ok", upstream_ms=12.5)
    call(10, "agent-a", "g-alice", "open_session", "allow", outcome="ok", upstream_ms=10.0)
    call(20, "agent-b", "g-bob", "open_session", "allow", outcome="ok", upstream_ms=11.0)
    call(
        30,
        "agent-b",
        "g-bob",
        "open_session",
        "rate_limited",
        outcome="refused",
        rule=RULE_LIMIT,
        reason="open_session_rate: 10 per minute",
    )
    call(
        70,
        "agent-b",
        "g-bob",
        "open_session",
        "rate_limited",
        outcome="refused",
        rule=RULE_LIMIT,
        reason="open_session_rate: 10 per minute",
    )
    call(75, "agent-a", "g-alice", "open_session", "allow", outcome=None)  # still running
    call(
        80,
        "agent-a",
        "g-alice",
        "send_message",
        "allow",
        outcome="ok",
        upstream_ms=6000.0,
        args={"phone_number": "+100", "content": "[REDACTED]"},
    )
    call(
        90,
        "agent-b",
        "g-bob",
        "delete_chat",
        "deny",
        outcome="refused",
        rule="/default",
        reason="default deny",
    )
    call(95, "agent-a", "g-alice", None, "allow", outcome="ok", method="tools/list", upstream_ms=1.0)
    call(
        130,
        QUOTED_AGENT,
        "g-q'uote",
        "open_session",
        "deny",
        outcome="refused",
        rule="/default",
        reason='it\'s "denied"',
    )
    call(
        86400 * 3,
        "agent-a",
        "g-alice",
        "open_session",
        "allow",
        outcome="ok",
        server="whatsapp-2",
        upstream_ms=9.0,
    )
    evs.append(
        E.SessionClosed(
            ts=ms(at(200)),
            session="sess-1",
            server="whatsapp",
            grant="g-alice",
            agent="agent-a",
            reason="deleted",
        )
    )
    return evs


class MemoryEventLog(EventLog):
    """In-memory EventLog (the fallback when eventlog.sqlite is unavailable)."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.offsets: dict[str, int] = {}
        self._grew = asyncio.Event()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def flush(self) -> None: ...

    async def append(self, payloads):  # type: ignore[override]
        self.records.extend(payloads)
        self._grew.set()
        self._grew = asyncio.Event()
        return len(self.records) - 1

    async def read(self, offset, limit=10_000):  # type: ignore[override]
        from eventlog.base import Record

        return [Record(i, self.records[i]) for i in range(offset, min(len(self.records), offset + limit))]

    async def end_offset(self) -> int:
        return len(self.records)

    async def committed(self, consumer: str) -> int:
        return self.offsets.get(consumer, 0)

    async def commit(self, consumer: str, offset: int) -> None:
        self.offsets[consumer] = offset

    async def tail(self, offset, batch=10_000):  # type: ignore[override]
        while True:
            grew = self._grew
            recs = await self.read(offset, batch)
            if recs:
                offset = recs[-1].offset + 1
                yield recs
            else:
                await grew.wait()


async def open_log(tmp_path: Path) -> EventLog:
    try:
        from eventlog.sqlite import SqliteEventLog
    except ImportError:
        log: EventLog = MemoryEventLog()
    else:
        log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    return log


async def forensic_answers(store: AuditStore) -> dict[str, object]:
    return {
        "who": await forensics.who(store, "open_session"),
        "who_server": await forensics.who(store, "open_session", server="whatsapp"),
        "who_since": await forensics.who(store, "open_session", since=at(15), until=at(3600)),
        "who_list": await forensics.who(store, "tools/list"),
        "calls": await forensics.calls(store, limit=1000),
        "calls_tool": await forensics.calls(store, "open_session", since=at(0), limit=3),
        "denials": await forensics.denials(store),
        "counts": await minute_counts(store),
        "sessions": await store.query("SELECT kind, session, reason FROM audit_sessions FINAL ORDER BY ts"),
        "policy": await store.query("SELECT server, policy_version, ok FROM audit_policy_loads FINAL"),
    }


class AuditStoreContract:
    """Subclass in a test module that defines an async ``store`` fixture."""

    @pytest.fixture
    async def log(self, tmp_path: Path):
        log = await open_log(tmp_path)
        try:
            yield log
        finally:
            await log.close()

    @pytest.fixture
    async def loaded(self, store: AuditStore, log: EventLog) -> AuditStore:
        await log.append([E.encode(e) for e in scenario()])
        assert await AuditConsumer(log, store, batch=7).catch_up() == len(scenario())
        assert await CountersConsumer(log, store).catch_up() == len(scenario())
        return store

    async def test_who(self, loaded: AuditStore) -> None:
        cols, rows = await forensics.who(loaded, "open_session")
        assert cols == ["agent", "grant", "allowed", "refused", "first", "last"]
        assert rows == [
            ("agent-a", "g-alice", 4, 0, at(0), at(86400 * 3)),
            ("agent-b", "g-bob", 1, 2, at(20), at(70)),
            (QUOTED_AGENT, "g-q'uote", 0, 1, at(130), at(130)),
        ]
        _, rows = await forensics.who(loaded, "open_session", server="whatsapp", since=at(5), until=at(75))
        assert rows == [
            ("agent-a", "g-alice", 1, 0, at(10), at(10)),
            ("agent-b", "g-bob", 1, 2, at(20), at(70)),
        ]
        _, rows = await forensics.who(loaded, "open_session", decision="rate_limited")
        assert rows == [("agent-b", "g-bob", 0, 2, at(30), at(70))]
        _, rows = await forensics.who(loaded, "tools/list")  # a method, not a tool
        assert rows == [("agent-a", "g-alice", 1, 0, at(95), at(95))]
        assert (await forensics.who(loaded, "no_such_tool"))[1] == []

    async def test_calls_join_outcomes(self, loaded: AuditStore) -> None:
        cols, rows = await forensics.calls(loaded, "open_session", server="whatsapp")
        assert cols == [
            "ts",
            "call_id",
            "server",
            "tool",
            "grant",
            "agent",
            "session",
            "arguments",
            "decision",
            "rule",
            "reason",
            "outcome",
            "upstream_ms",
        ]
        assert [r[1] for r in rows] == [
            "call-010",
            "call-006",
            "call-005",
            "call-004",
            "call-003",
            "call-002",
            "call-001",
        ]
        by_id = {r[1]: dict(zip(cols, r, strict=True)) for r in rows}
        assert by_id["call-006"]["outcome"] is None and by_id["call-006"]["upstream_ms"] is None
        assert by_id["call-001"]["outcome"] == "ok" and by_id["call-001"]["upstream_ms"] == 12.5
        assert by_id["call-004"]["decision"] == "rate_limited"
        assert by_id["call-004"]["rule"] == RULE_LIMIT and by_id["call-004"]["outcome"] == "refused"
        assert by_id["call-010"]["reason"] == 'it\'s "denied"'
        _, rows = await forensics.calls(loaded, "send_message")
        assert rows[0][7] == '{"phone_number":"+100","content":"[REDACTED]"}'
        assert rows[0][0] == at(80) and rows[0][12] == 6000.0
        _, rows = await forensics.calls(loaded, limit=2)
        assert [r[1] for r in rows] == ["call-011", "call-010"]
        _, rows = await forensics.calls(loaded, agent=QUOTED_AGENT, grant="g-q'uote")
        assert [r[1] for r in rows] == ["call-010"]

    async def test_denials(self, loaded: AuditStore) -> None:
        cols, rows = await forensics.denials(loaded)
        # remote and reason are for failed authentication (auth.failed): empty for call refusals
        assert cols == ["agent", "tool", "rule", "count", "first", "last", "remote", "reason"]
        assert rows == [
            ("agent-b", "open_session", RULE_LIMIT, 2, at(30), at(70), "", ""),
            ("agent-b", "delete_chat", "/default", 1, at(90), at(90), "", ""),
            (QUOTED_AGENT, "open_session", "/default", 1, at(130), at(130), "", ""),
        ]
        _, rows = await forensics.denials(loaded, since=at(60), agent="agent-b")
        assert rows == [
            ("agent-b", "delete_chat", "/default", 1, at(90), at(90), "", ""),
            ("agent-b", "open_session", RULE_LIMIT, 1, at(70), at(70), "", ""),
        ]

    async def test_params_with_quotes_are_never_sql(self, loaded: AuditStore) -> None:
        cols, rows = await forensics.sql(
            loaded,
            "SELECT agent, count() AS n FROM audit_calls FINAL WHERE agent = {a:String} GROUP BY agent",
            {"a": QUOTED_AGENT},
        )
        assert (cols, rows) == (["agent", "n"], [(QUOTED_AGENT, 1)])
        hostile = "x' OR 1=1 --"
        assert (await forensics.who(loaded, hostile))[1] == []
        assert (await forensics.calls(loaded, agent=hostile))[1] == []
        _, rows = await loaded.query("SELECT {v:String} AS v", {"v": "a\\nb'\"\t\n\\N"})
        assert rows == [("a\\nb'\"\t\n\\N",)]

    async def test_sql_is_read_only(self, loaded: AuditStore) -> None:
        _, before = await loaded.query("SELECT count() FROM audit_calls FINAL")
        attempts = [
            "INSERT INTO audit_calls (event_id, call_id) VALUES ('evil', 'evil')",
            "DROP TABLE audit_calls",
            "ALTER TABLE audit_calls DELETE WHERE 1",
            "TRUNCATE TABLE audit_outcomes",
            "CREATE TABLE evil (a String) ENGINE = Memory",
            "SELECT 1; DROP TABLE audit_calls",
            "SELECT 1 SETTINGS readonly = 0",
            "SELECT * FROM file('/etc/passwd', 'LineAsString')",
        ]
        for text in attempts:
            with pytest.raises(ReadOnlyError) as err:
                await forensics.sql(loaded, text)
            assert "read-only" in str(err.value).lower() or "readonly" in str(err.value).lower(), text
        _, after = await loaded.query("SELECT count() FROM audit_calls FINAL")
        assert after == before
        _, tables = await loaded.query(
            "SELECT name FROM system.tables WHERE database = currentDatabase() AND name LIKE 'audit_%' "
            "ORDER BY name"
        )
        assert {"audit_calls", "audit_outcomes", "audit_sessions"} <= {t[0] for t in tables}
        assert "evil" not in {t[0] for t in tables}
        # and reads still work, with parameters
        _, rows = await forensics.sql(
            loaded, "SELECT count() AS n FROM audit_calls FINAL WHERE decision = {d:String}", {"d": "deny"}
        )
        assert rows == [(2,)]

    async def test_counters_per_minute(self, loaded: AuditStore) -> None:
        cols, rows = await minute_counts(loaded, server="whatsapp")
        assert cols == ["minute", "server", "tool", "grant", "agent", "decision", "count"]
        m0, m1, m2 = T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)
        assert rows == [
            (m0, "whatsapp", "open_session", "g-alice", "agent-a", "allow", 2),
            (m0, "whatsapp", "open_session", "g-bob", "agent-b", "allow", 1),
            (m0, "whatsapp", "open_session", "g-bob", "agent-b", "rate_limited", 1),
            (m1, "whatsapp", "delete_chat", "g-bob", "agent-b", "deny", 1),
            (m1, "whatsapp", "open_session", "g-alice", "agent-a", "allow", 1),
            (m1, "whatsapp", "open_session", "g-bob", "agent-b", "rate_limited", 1),
            (m1, "whatsapp", "send_message", "g-alice", "agent-a", "allow", 1),
            (m1, "whatsapp", "tools/list", "g-alice", "agent-a", "allow", 1),
            (m2, "whatsapp", "open_session", "g-q'uote", QUOTED_AGENT, "deny", 1),
        ]
        _, rows = await minute_counts(loaded, since=T0 + timedelta(days=1))
        assert rows == [
            (T0 + timedelta(days=3), "whatsapp-2", "open_session", "g-alice", "agent-a", "allow", 1)
        ]

    async def test_replay_from_zero_changes_no_answer(self, loaded: AuditStore, log: EventLog) -> None:
        before = await forensic_answers(loaded)
        assert before["calls"][1] and before["counts"][1] and before["sessions"][1]
        seen: list[tuple[int, int]] = []
        audit = AuditConsumer(log, loaded, batch=5)
        assert await audit.replay(0, progress=lambda done, total: seen.append((done, total))) == len(
            scenario()
        )
        assert seen[-1] == (len(scenario()), len(scenario()))
        await audit.replay(3)
        await CountersConsumer(log, loaded, batch=4).replay(0)
        # at-least-once redelivery: the committed offset moved back to 0
        await log.commit("audit", 0)
        assert await AuditConsumer(log, loaded).catch_up() == len(scenario())
        _, raw = await loaded.query("SELECT count() FROM audit_calls")
        assert raw[0][0] >= len([e for e in scenario() if e.kind == "call.decided"])  # dups may sit unmerged
        assert await forensic_answers(loaded) == before
        await loaded.execute("OPTIMIZE TABLE audit_calls FINAL")
        await loaded.execute("OPTIMIZE TABLE counters_minute FINAL")
        assert await forensic_answers(loaded) == before

    async def test_run_tails_the_log(self, store: AuditStore, log: EventLog) -> None:
        consumer = AuditConsumer(log, store)
        task = asyncio.create_task(consumer.run())
        try:
            evs = scenario()
            await log.append([E.encode(e) for e in evs[:5]])
            await log.append([b"not json", b'{"no": "event_id"}'])
            await log.append([E.encode(e) for e in evs[5:]])
            end = await log.end_offset()
            async with asyncio.timeout(30):
                while await log.committed("audit") < end:  # noqa: ASYNC110 - commits have no event
                    await asyncio.sleep(0.02)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert consumer.skipped == 2
        _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
        assert rows == [(len([e for e in scenario() if e.kind == "call.decided"]),)]
        assert await consumer.catch_up() == 0

    async def test_audit_insert_fills_the_counters(self, store: AuditStore, log: EventLog) -> None:
        """009_counters_from_audit.sql: the audit insert alone gives the same per-minute counts
        as the counters consumer's own insert (what lets the counters consumer ride on it)."""
        await log.append([E.encode(e) for e in scenario()])
        await AuditConsumer(log, store, batch=7).catch_up()
        via_audit = await minute_counts(store)
        assert via_audit[1]
        assert await CountersConsumer(log, store).catch_up() == len(scenario())
        assert await minute_counts(store) == via_audit  # the same events: counted once

    async def test_counters_ride_on_the_running_audit(self, store: AuditStore, log: EventLog) -> None:
        """Riding: the running counters consumer commits what audit stored (no insert of its own);
        records before where audit began in this process it inserts itself (their audit inserts
        may predate the view); its offset stays its own."""
        evs = [E.encode(e) for e in scenario()]
        await log.append(evs[:6])
        await log.commit("audit", 4)  # audit got to 4 in an earlier process
        audit, counters = AuditConsumer(log, store, batch=3), CountersConsumer(log, store)
        counters.ride_on(audit)
        tasks = [asyncio.create_task(audit.run()), asyncio.create_task(counters.run())]
        try:
            await log.append(evs[6:])
            end = await log.end_offset()
            async with asyncio.timeout(60):
                await asyncio.gather(audit.wait_for(end), counters.wait_for(end))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert await log.committed("counters") == end
        decided_before_4 = sum(1 for p in evs[:4] if b'"kind":"call.decided"' in p)
        assert counters.inserted == decided_before_4  # [0, 4) by itself
        assert counters.ridden == end - 4  # the rest on audit's inserts
        expected = await minute_counts(store)
        assert await CountersConsumer(log, store).replay(0) == len(evs)  # its own insert of all
        assert await minute_counts(store) == expected
        assert sum(r[-1] for r in expected[1]) == sum(1 for p in evs if b'"kind":"call.decided"' in p)

    async def test_a_rider_does_not_wait_for_a_stalled_leader(self, store: AuditStore, log: EventLog) -> None:
        """A leader that does not advance (down, retrying) holds the rider at most ride_wait_s:
        then the rider reads and inserts by itself, and loses nothing."""
        evs = [E.encode(e) for e in scenario()]
        await log.append(evs)
        audit, counters = AuditConsumer(log, store), CountersConsumer(log, store, batch=5)
        counters.ride_on(audit)
        counters.ride_wait_s = 0.01
        task = asyncio.create_task(counters.run())  # audit never runs
        try:
            async with asyncio.timeout(60):
                await counters.wait_for(len(evs))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert counters.ridden == 0
        assert await log.committed("audit") == 0
        _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
        assert rows == [(0,)]  # nothing came through audit: the counts are the rider's own
        counted = sum(r[-1] for r in (await minute_counts(store))[1])
        assert counted == sum(1 for p in evs if b'"kind":"call.decided"' in p)
