"""The assertions every event-log backend must pass (embedded SQLite, Kafka).

A test module subclasses ``EventLogContract`` and provides:
- ``make_log``: a factory ``make_log(durability="strict", flush_interval_ms=5.0)`` returning a
  NEW, unopened instance on the SAME underlying log each call (same file / same topic), so
  a test can reopen it or read it from a second instance;
- ``expected_partitions``: the partitions the log has.

Everything here goes through the position API (the int-offset API is the one-partition
special case, tested in tests/eventlog/test_sqlite.py). Payloads are the gateway's compact
JSON with a ``grant``, the key that must keep its records in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from eventlog.base import EventLog, LogUnavailable, Position, Record
from schemas.events import now_ms

TIMEOUT = 30.0  # generous upper bound for anything that should happen "soon"

MakeLog = Callable[..., EventLog]


def payload(grant: str, seq: int, **extra: Any) -> bytes:
    ev = {"event_id": f"{grant}-{seq}", "kind": "call.decided", "grant": grant, "seq": seq, **extra}
    return orjson.dumps(ev)


async def read_all(log: EventLog, start: Position | None = None) -> list[Record]:
    return [r async for batch in log.read_position(start or {}) for r in batch]


def by_grant(records: list[Record]) -> dict[str, list[int]]:
    """grant -> its seq numbers in log order (partition by partition, offset order)."""
    out: dict[str, list[int]] = {}
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        ev = orjson.loads(r.payload)
        out.setdefault(ev["grant"], []).append(ev["seq"])
    return out


async def wait_until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` (no fixed sleep decides the outcome) until true or TIMEOUT."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class EventLogContract:
    expected_partitions: list[int] = [0]

    @pytest.fixture
    def make_log(self) -> MakeLog:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    async def test_partitions(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            assert await log.partitions() == self.expected_partitions
            end = await log.end_position()
            assert sorted(end) == self.expected_partitions
            assert all(o == 0 for o in end.values())
            assert await read_all(log) == []

    async def test_append_read_everything_each_grant_in_order(self, make_log: MakeLog) -> None:
        grants = [f"grant-{g}" for g in range(8)]
        sent = [payload(grants[i % 8], i // 8) for i in range(80)]
        async with make_log() as log:
            for i in range(0, 80, 5):
                last = await log.append(sent[i : i + 5])
                assert isinstance(last, int)
            records = await read_all(log)
            assert sorted(r.payload for r in records) == sorted(sent)  # each record exactly once
            assert all(type(r.payload) is bytes for r in records)
            assert by_grant(records) == {g: list(range(10)) for g in grants}
            # one grant, one partition
            part: dict[str, set[int]] = {}
            for r in records:
                part.setdefault(orjson.loads(r.payload)["grant"], set()).add(r.partition)
            assert all(len(ps) == 1 for ps in part.values())
            # offsets are dense from 0 in each partition, and the end position says so
            end = await log.end_position()
            for p in self.expected_partitions:
                offsets = [r.offset for r in records if r.partition == p]
                assert sorted(offsets) == list(range(len(offsets)))
                assert end[p] == len(offsets)

    async def test_concurrent_appenders_keep_each_grant_in_order(self, make_log: MakeLog) -> None:
        async with make_log() as log:

            async def appender(g: int) -> None:
                for seq in range(10):
                    await log.append([payload(f"g{g}", seq)])

            await asyncio.gather(*(appender(g) for g in range(30)))
            records = await read_all(log)
            assert len(records) == 300
            assert by_grant(records) == {f"g{g}": list(range(10)) for g in range(30)}

    async def test_strict_append_is_durable_when_it_returns(self, make_log: MakeLog) -> None:
        writer = make_log("strict")
        await writer.open()
        try:
            assert writer.durability == "strict"
            sent = [payload("alice", i) for i in range(20)]
            for p in sent:
                await writer.append([p])
            # no flush, no close: a second instance reads every record already
            async with make_log() as reader:
                assert sorted(r.payload for r in await read_all(reader)) == sorted(sent)
        finally:
            await writer.close()

    async def test_batched_append_returns_at_once_and_flush_makes_it_durable(self, make_log: MakeLog) -> None:
        # a 10-minute flush interval: only flush() can make these durable within the test
        writer = make_log("batched", 600_000.0)
        await writer.open()
        try:
            assert writer.durability == "batched"
            sent = [payload("bob", i) for i in range(50)]
            for p in sent:
                await writer.append([p])
            await writer.flush()
            async with make_log() as reader:
                records = await read_all(reader)
                assert sorted(r.payload for r in records) == sorted(sent)
                assert by_grant(records) == {"bob": list(range(50))}
            await writer.append([payload("bob", 50)])
        finally:
            await writer.close()  # close flushes too
        async with make_log() as reader:
            assert by_grant(await read_all(reader)) == {"bob": list(range(51))}

    async def test_batched_records_become_durable_without_flush(self, make_log: MakeLog) -> None:
        async with make_log("batched", 5.0) as writer, make_log() as reader:
            await writer.append([payload("carol", 0), payload("carol", 1)])

            async def visible() -> bool:
                return len(await read_all(reader)) == 2

            await wait_until(visible, "the flush interval to make batched records durable")

    async def test_read_from_positions(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            await log.append([payload(f"g{i % 5}", i // 5) for i in range(40)])
            end = await log.end_position()
            everything = await read_all(log)
            for p in self.expected_partitions:
                mine = [r for r in everything if r.partition == p]
                for k in (0, 1, len(mine) // 2, len(mine)):
                    got = await log.read_partition(p, k)
                    assert got == mine[k:]
                if len(mine) >= 3:
                    assert await log.read_partition(p, 1, limit=2) == mine[1:3]
                assert await log.read_partition(p, end[p] + 5) == []
            # read_position between two positions: exactly the records in between
            middle = {p: o // 2 for p, o in end.items()}
            between = await read_all_between(log, middle, end)
            assert sorted(between, key=lambda r: (r.partition, r.offset)) == sorted(
                (r for r in everything if r.offset >= middle[r.partition]),
                key=lambda r: (r.partition, r.offset),
            )
            head = await read_all_between(log, {}, middle)
            assert len(head) + len(between) == len(everything)

    async def test_end_position_grows_with_appends(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            before = await log.end_position()
            await log.append([payload(f"g{i}", 0) for i in range(12)])
            after = await log.end_position()
            assert sum(after.values()) - sum(before.values()) == 12
            assert all(after[p] >= before.get(p, 0) for p in after)

    async def test_committed_positions_survive_reopen(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            await log.append([payload(f"g{i}", 0) for i in range(10)])
            assert all(o == 0 for o in (await log.committed_position("audit")).values())
            end = await log.end_position()
            await log.commit_position("audit", end)
            await log.commit_position("alerts", dict.fromkeys(end, 0))
            assert await log.committed_position("audit") == end
            with pytest.raises(ValueError):
                await log.commit_position("audit", {self.expected_partitions[0]: -1})
        async with make_log("batched") as log:
            assert await log.committed_position("audit") == end
            assert all(o == 0 for o in (await log.committed_position("alerts")).values())
            assert all(o == 0 for o in (await log.committed_position("counters")).values())
            # resuming from the committed position reads only what came after it
            await log.append([payload("late", 0)])
            await log.flush()
            rest = await read_all(log, await log.committed_position("audit"))
            assert [orjson.loads(r.payload)["grant"] for r in rest] == ["late"]

    async def test_tail_wakes_on_appends(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            await log.append([payload("old", 0)])
            tail = log.tail_position(dict.fromkeys(self.expected_partitions, 0), 100)
            first = await asyncio.wait_for(anext(tail), TIMEOUT)
            assert [orjson.loads(r.payload)["grant"] for r in first] == ["old"]
            waiting = asyncio.create_task(anext(tail))
            await asyncio.sleep(0)
            assert not waiting.done()
            await log.append([payload("new", 0), payload("new", 1)])
            got = list(await asyncio.wait_for(waiting, TIMEOUT))
            while len(got) < 2:  # the two records may come in two batches
                got += await asyncio.wait_for(anext(tail), TIMEOUT)
            assert by_grant(got) == {"new": [0, 1]}
            await tail.aclose()

    async def test_tail_ends_when_log_closes(self, make_log: MakeLog) -> None:
        log = make_log()
        await log.open()
        await log.append([payload("a", 0)])
        seen: list[Record] = []

        async def consume() -> None:
            async for batch in log.tail_position({}):
                seen.extend(batch)

        consumer = asyncio.create_task(consume())
        await wait_until(_true_when(lambda: len(seen) == 1), "the tail to deliver the record")
        await log.close()
        await asyncio.wait_for(consumer, TIMEOUT)
        assert by_grant(seen) == {"a": [0]}

    async def test_read_since_timestamp(self, make_log: MakeLog) -> None:
        async with make_log() as log:
            assert [b async for b in log.read_since(0)] == []
            old = [payload(f"g{i % 3}", i // 3) for i in range(9)]
            await log.append(old)
            mid = now_ms()
            while now_ms() <= mid:  # spin (< 1 ms) until the clock has moved on
                pass
            new = [payload(f"g{i % 3}", 3 + i // 3) for i in range(6)]
            await log.append(new[:3])
            await log.append(new[3:])
            since = [r for b in [b async for b in log.read_since(mid + 1, limit=4)] for r in b]
            got = {r.payload for r in since}
            assert set(new) <= got  # never later than asked
            assert got <= set(old) | set(new)  # (may start earlier)
            everything = [r for b in [b async for b in log.read_since(0)] for r in b]
            assert sorted(r.payload for r in everything) == sorted(old + new)
            assert [b async for b in log.read_since(now_ms() + 60_000)] == []

    async def test_append_checks(self, make_log: MakeLog) -> None:
        log = make_log()
        with pytest.raises(LogUnavailable):
            await log.append([payload("x", 0)])
        await log.open()
        with pytest.raises(TypeError):
            await log.append(["text"])  # type: ignore[list-item]
        assert isinstance(await log.append([]), int)
        await log.close()
        await log.close()  # idempotent
        with pytest.raises(LogUnavailable):
            await log.append([payload("x", 1)])


async def read_all_between(log: EventLog, start: Position, end: Position) -> list[Record]:
    return [r async for batch in log.read_position(start, end) for r in batch]


def _true_when(cond: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return cond()

    return check
