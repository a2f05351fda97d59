"""The embedded event log (eventlog.sqlite.SqliteEventLog): real SQLite files, no mocks."""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import sqlite3
import sys
import textwrap
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest

from eventlog import EventLog, LogUnavailable, Record, SqliteEventLog, open_log
from eventlog.sqlite import _Batch, _Writer
from schemas.events import CallDecided, decode, encode, now_ms

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 20.0  # generous upper bound for anything that should happen "soon"


def event_payload(i: int) -> bytes:
    return encode(
        CallDecided(
            call_id=f"call-{i}",
            server="whatsapp",
            method="tools/call",
            tool="open_session",
            grant="alice",
            agent="agent-1",
            decision="allow",
        )
    )


async def read_all(log: EventLog) -> list[Record]:
    out: list[Record] = []
    offset = 0
    while batch := await log.read(offset, 1_000):
        out.extend(batch)
        offset = batch[-1].offset + 1
    return out


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / "events.db"


async def test_append_read_order_and_offsets(db: Path) -> None:
    async with SqliteEventLog(db) as log:
        assert await log.end_offset() == 0
        assert await log.read(0) == []
        assert await log.append([b"a"]) == 0
        assert await log.append([b"b", b"c", b"d"]) == 3
        assert await log.append([]) == 3  # nothing appended: the last offset so far
        payloads = [event_payload(i) for i in range(5)]
        assert await log.append(payloads) == 8
        assert await log.end_offset() == 9

        records = await log.read(0)
        assert [r.offset for r in records] == list(range(9))
        assert [r.payload for r in records] == [b"a", b"b", b"c", b"d", *payloads]
        assert all(type(r.payload) is bytes for r in records)
        assert decode(records[4].payload).call_id == "call-0"

        assert await log.read(2, limit=2) == [Record(2, b"c"), Record(3, b"d")]
        assert await log.read(9) == []
        assert await log.read(100) == []


async def test_payloads_must_be_bytes(db: Path) -> None:
    async with SqliteEventLog(db) as log:
        with pytest.raises(TypeError):
            await log.append(["text"])  # type: ignore[list-item]
        assert await log.append([b"ok"]) == 0


async def test_strict_durable_across_reopen(db: Path) -> None:
    async with SqliteEventLog(db, "strict") as log:
        assert log.durability == "strict"
        for i in range(20):
            assert await log.append([event_payload(i)]) == i
    async with SqliteEventLog(db, "strict") as log:
        assert await log.end_offset() == 20
        assert [decode(r.payload).call_id for r in await read_all(log)] == [f"call-{i}" for i in range(20)]
        assert await log.append([b"next"]) == 20  # offsets continue densely


async def test_batched_visible_after_flush_and_after_close(db: Path) -> None:
    log = SqliteEventLog(db, "batched", flush_interval_ms=600_000)  # the timer never fires here
    await log.open()
    assert await log.append([b"a", b"b"]) == 1  # returns at once with the promised offset
    assert await log.append([b"c"]) == 2
    assert await log.end_offset() == 0  # not committed yet: readers do not see it
    assert await log.read(0) == []
    await log.flush()
    assert await log.end_offset() == 3
    assert [r.payload for r in await log.read(0)] == [b"a", b"b", b"c"]

    assert await log.append([b"d"]) == 3
    assert await log.append([]) == 3
    await log.close()
    async with SqliteEventLog(db) as again:
        assert [r.payload for r in await read_all(again)] == [b"a", b"b", b"c", b"d"]


async def test_batched_flusher_commits_on_its_own(db: Path) -> None:
    async with SqliteEventLog(db, "batched", flush_interval_ms=5, tail_poll_s=600) as log:
        tail = log.tail(0)
        assert await log.append([b"x"]) == 0
        # no flush(): the background flusher commits, and the commit wakes the tail
        batch = await asyncio.wait_for(anext(tail), TIMEOUT)
        assert batch == [Record(0, b"x")]
        await tail.aclose()


async def test_concurrent_appends_get_their_own_offsets(db: Path) -> None:
    async with SqliteEventLog(db, "strict") as log:

        async def appender(task: int) -> list[tuple[int, list[bytes]]]:
            done = []
            for round_ in range(3):
                payloads = [f"t{task}-r{round_}-{k}".encode() for k in range(1 + (task + round_) % 3)]
                done.append((await log.append(payloads), payloads))
            return done

        results = await asyncio.gather(*(appender(t) for t in range(200)))
        records = await read_all(log)
        by_offset = {r.offset: r.payload for r in records}
        assert [r.offset for r in records] == list(range(len(records)))  # dense, unique
        expected = sum(1 + (t + r) % 3 for t in range(200) for r in range(3))
        assert len(records) == expected
        for done in results:
            for last, payloads in done:
                # the returned offset is that of the caller's LAST record, and its records
                # are contiguous (one append() never interleaves with another)
                first = last - len(payloads) + 1
                assert [by_offset[o] for o in range(first, last + 1)] == payloads


async def test_strict_appends_of_one_loop_iteration_share_one_commit(db: Path) -> None:
    """Group commit: every task that appends in the same loop iteration joins the same
    transaction (one fsync, one writer wake-up), and the appends made while it is in flight
    share the next one."""
    async with SqliteEventLog(db, "strict") as log:
        sizes = [1 + t % 3 for t in range(100)]
        first = [asyncio.ensure_future(log.append([b"w1"] * n)) for n in sizes]
        await asyncio.sleep(0)  # the commit of the first wave is now in flight
        second = [asyncio.ensure_future(log.append([b"w2"] * n)) for n in sizes]
        lasts = await asyncio.gather(*first, *second)
        assert log.stats.batches == 2
        assert log.stats.records == 2 * sum(sizes)
        assert sorted(lasts) == lasts  # each wave in task order, the second after the first
        assert lasts[-1] == 2 * sum(sizes) - 1


async def _until(pred: Callable[[], bool]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not pred():  # noqa: ASYNC110 - internal state of the log: nothing to await
            await asyncio.sleep(0.001)


async def test_strict_appends_handed_over_during_a_commit_share_the_next_one(db: Path) -> None:
    """While a commit is in flight, each loop iteration's appends are handed over to the writer
    at once; batches it has not taken yet merge (in append order), and it takes them itself
    when its commit is done: one more commit for all of them, and flush() waits for it."""
    async with SqliteEventLog(db, "strict", busy_timeout_ms=600_000) as log:
        assert await log.append([b"first"]) == 0
        writer = log._writer
        assert writer is not None
        locker = _lock(db)  # the next commit waits for this lock
        try:
            blocked = asyncio.ensure_future(log.append([b"blocked"]))
            # poll until the writer has taken that batch (it is now stuck in its commit)
            await _until(lambda: log._inflight is not None and writer._slot is None)
            waves = []
            for w in range(3):  # three loop iterations, three hand-overs
                waves += [
                    asyncio.ensure_future(log.append([f"w{w}-{i}".encode()] * (1 + i % 2))) for i in range(4)
                ]
                n = 6 * (w + 1)
                await _until(lambda n=n: writer._slot is not None and len(writer._slot.payloads) == n)
                if w == 0:
                    slot = writer._slot
                assert writer._slot is slot and log._inflight is slot  # merged into one batch
            flushed = asyncio.ensure_future(log.flush())
            await asyncio.sleep(0)
            assert not blocked.done() and not flushed.done()
        finally:
            locker.rollback()
            locker.close()
        await flushed
        assert blocked.done() and all(t.done() for t in waves)
        assert await blocked == 1
        lasts = [t.result() for t in waves]
        assert sorted(lasts) == lasts and lasts[-1] == 1 + sum(1 + i % 2 for i in range(4)) * 3
        assert log.stats.batches == 3  # first, blocked, and the three waves together
        expected = [b"first", b"blocked"] + [
            f"w{w}-{i}".encode() for w in range(3) for i in range(4) for _ in range(1 + i % 2)
        ]
        assert [r.payload for r in await read_all(log)] == expected


async def test_the_writer_thread_keeps_no_log_alive() -> None:
    """The writer thread holds the log's commit functions weakly, and nothing of a job once it
    is done: a log dropped without close() can be collected (its finalizer stops the threads)."""
    committed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    class Owner:
        def write(self, payloads: list[bytes]) -> int:
            return len(payloads)

        def done(self, b: _Batch, base: int | None, exc: BaseException | None, commit_s: float) -> None:
            committed.set_result(base)

    owner = Owner()
    writer = _Writer("eventlog-writer:test", asyncio.get_running_loop(), owner.write, owner.done)
    try:
        batch = _Batch(0, urgent=True)
        batch.payloads += [b"x", b"y"]
        assert writer.hand(batch) is batch
        assert await committed == 2  # a commit through the hand-over
        assert await writer.call(functools.partial(owner.write, [b"z"])) == 1  # a job
        alive = weakref.ref(owner)
        del owner
        gc.collect()
        assert alive() is None
    finally:
        writer.stop()


async def test_one_commit_of_any_size_keeps_its_order(db: Path) -> None:
    """A commit is one multi-row INSERT of its exact size up to 64 records, chunks beyond."""
    async with SqliteEventLog(db, "strict") as log:
        end = 0
        for n in (1, 63, 64, 65, 300, 777):
            payloads = [f"{n}-{i}".encode() for i in range(n)]
            assert await log.append(payloads) == end + n - 1
            assert [r.payload for r in await log.read(end, 1_000)] == payloads
            end += n
        assert log.stats.batches == 6


async def test_offsets_follow_other_writers_and_times_never_decrease(db: Path) -> None:
    """Offsets are assigned inside the transaction (after another writer's rows), and a
    record's ts_ms is never below the last record's (here one written with a clock ahead)."""
    ahead = now_ms() + 3_600_000
    async with SqliteEventLog(db, "strict") as log:
        assert await log.append([b"a"]) == 0
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("INSERT INTO records(offset, ts_ms, payload) VALUES (1, ?, ?)", (ahead, b"other"))
        finally:
            other.close()
        assert await log.append([b"b"] * 8) == 9  # one statement
        assert await log.append([b"c"] * 100) == 109  # in a BEGIN IMMEDIATE transaction
        assert [await log.timestamp(o) for o in (1, 2, 9, 50, 109)] == [ahead] * 5
        assert await log.first_offset_since(ahead) == 1
        assert [r.payload for r in await read_all(log)] == [b"a", b"other", *[b"b"] * 8, *[b"c"] * 100]


@pytest.mark.parametrize("n", [1, 8, 9, 64, 65, 300])
async def test_offsets_of_a_new_log_start_at_zero(db: Path, n: int) -> None:
    async with SqliteEventLog(db, "strict") as log:
        payloads = [f"{i}".encode() for i in range(n)]
        assert await log.append(payloads) == n - 1
        assert await log.read(0, 1_000) == [Record(i, p) for i, p in enumerate(payloads)]


async def test_batched_concurrent_offsets_are_promised_offsets(db: Path) -> None:
    async with SqliteEventLog(db, "batched", flush_interval_ms=1) as log:

        async def appender(task: int) -> list[tuple[int, bytes]]:
            out = []
            for i in range(20):
                payload = f"{task}-{i}".encode()
                out.append((await log.append([payload]), payload))
                await asyncio.sleep(0)
            return out

        results = await asyncio.gather(*(appender(t) for t in range(50)))
        await log.flush()
        by_offset = {r.offset: r.payload for r in await read_all(log)}
        assert sorted(by_offset) == list(range(1000))
        for out in results:
            for offset, payload in out:
                assert by_offset[offset] == payload


async def test_cancelled_appender_does_not_affect_others(db: Path) -> None:
    async with SqliteEventLog(db, "strict") as log:
        tasks = [asyncio.create_task(log.append([f"p{i}".encode()])) for i in range(20)]
        await asyncio.sleep(0)  # let them all join the pending batch
        tasks[5].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[5], asyncio.CancelledError)
        offsets = [d for i, d in enumerate(done) if i != 5]
        assert all(isinstance(o, int) for o in offsets)
        assert len(set(offsets)) == 19
        await log.flush()
        # a cancelled strict append may still have been committed (like a lost ack)
        assert await log.end_offset() in (19, 20)


async def test_tail_wakes_on_new_appends(db: Path) -> None:
    # a 10-minute poll interval: only the commit signal can wake the tail in time
    async with SqliteEventLog(db, tail_poll_s=600) as log:
        await log.append([b"old"])
        tail = log.tail(0, batch=100)
        assert await asyncio.wait_for(anext(tail), TIMEOUT) == [Record(0, b"old")]
        waiting = asyncio.create_task(anext(tail))
        await asyncio.sleep(0)
        assert not waiting.done()
        await log.append([b"new1", b"new2"])
        assert await asyncio.wait_for(waiting, TIMEOUT) == [Record(1, b"new1"), Record(2, b"new2")]
        await log.append([b"new3"])
        assert await asyncio.wait_for(anext(tail), TIMEOUT) == [Record(3, b"new3")]
        await tail.aclose()


async def test_tail_respects_batch_size(db: Path) -> None:
    async with SqliteEventLog(db) as log:
        await log.append([b"%d" % i for i in range(25)])
        tail = log.tail(3, batch=10)
        sizes = [len(await anext(tail)) for _ in range(3)]
        assert sizes == [10, 10, 2]
        await tail.aclose()


async def test_tail_ends_when_log_closes(db: Path) -> None:
    log = SqliteEventLog(db, tail_poll_s=600)
    await log.open()

    async def consume() -> list[Record]:
        return [r async for batch in log.tail(0) for r in batch]

    consumer = asyncio.create_task(consume())
    await log.append([b"a"])
    await asyncio.sleep(0)
    await log.close()
    assert await asyncio.wait_for(consumer, TIMEOUT) == [Record(0, b"a")]


async def test_tail_sees_records_of_another_instance(db: Path) -> None:
    async with SqliteEventLog(db, tail_poll_s=0.05) as reader, SqliteEventLog(db) as writer:
        tail = reader.tail(0)
        waiting = asyncio.create_task(anext(tail))
        await writer.append([b"from-writer"])
        assert await asyncio.wait_for(waiting, TIMEOUT) == [Record(0, b"from-writer")]
        # the reader instance can append too: offsets stay dense across instances
        assert await reader.append([b"from-reader"]) == 1
        assert await writer.append([b"again"]) == 2
        await tail.aclose()


async def test_tail_default_poll_sees_other_instance(db: Path) -> None:
    async with SqliteEventLog(db) as reader, SqliteEventLog(db) as writer:
        tail = reader.tail(0)
        waiting = asyncio.create_task(anext(tail))
        await asyncio.sleep(0)
        await writer.append([b"x"])
        assert await asyncio.wait_for(waiting, TIMEOUT) == [Record(0, b"x")]
        await tail.aclose()


async def test_consumer_offsets(db: Path) -> None:
    async with SqliteEventLog(db) as log:
        assert await log.committed("audit") == 0
        await log.commit("audit", 42)
        await log.commit("alerts", 7)
        await log.commit("audit", 43)
        assert await log.committed("audit") == 43
        assert await log.committed("alerts") == 7
        assert await log.committed("counters") == 0
        with pytest.raises(ValueError):
            await log.commit("audit", -1)
    async with SqliteEventLog(db, "batched") as log:
        assert await log.committed("audit") == 43
        assert await log.committed("alerts") == 7


async def test_read_since_and_first_offset_since(db: Path) -> None:
    async with SqliteEventLog(db) as log:
        assert await log.first_offset_since(0) == 0
        await log.append([b"a0", b"a1", b"a2"])
        mid = now_ms()
        while now_ms() <= mid:  # spin (< 1 ms) until the clock has moved on
            pass
        await log.append([b"b0", b"b1"])
        await log.append([b"b2"])

        assert await log.first_offset_since(0) == 0
        assert await log.first_offset_since(mid + 1) == 3
        assert await log.first_offset_since(now_ms() + 60_000) == 6  # nothing yet: the end

        batches = [b async for b in log.read_since(mid + 1, limit=2)]
        assert [[r.payload for r in b] for b in batches] == [[b"b0", b"b1"], [b"b2"]]
        everything = [r.payload for b in [b async for b in log.read_since(0)] for r in b]
        assert everything == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
        assert [b async for b in log.read_since(now_ms() + 60_000)] == []


async def test_unopenable_path_raises_log_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    path = blocker / "events.db"
    log = SqliteEventLog(path)
    with pytest.raises(LogUnavailable) as e:
        await log.open()
    assert str(path) in str(e.value)
    with pytest.raises(LogUnavailable) as e:
        await log.append([b"x"])
    assert str(path) in str(e.value)
    await log.close()


async def test_path_is_a_directory(tmp_path: Path) -> None:
    path = tmp_path / "dir.db"
    path.mkdir()
    with pytest.raises(LogUnavailable, match="unable to open"):
        await SqliteEventLog(path).open()


async def test_append_before_open_and_after_close(db: Path) -> None:
    log = SqliteEventLog(db)
    with pytest.raises(LogUnavailable, match="not open"):
        await log.append([b"x"])
    await log.open()
    await log.append([b"x"])
    await log.close()
    await log.close()  # idempotent
    with pytest.raises(LogUnavailable, match="closed"):
        await log.append([b"y"])
    with pytest.raises(LogUnavailable):
        await log.read(0)


def _lock(db: Path) -> sqlite3.Connection:
    """Another connection holding the write lock: appends time out like on a stuck disk."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


async def test_strict_write_failure_consumes_no_offsets(db: Path) -> None:
    async with SqliteEventLog(db, "strict", busy_timeout_ms=50) as log:
        assert await log.append([b"a", b"b"]) == 1
        locker = _lock(db)
        try:
            results = await asyncio.gather(
                log.append([b"lost1"]), log.append([b"lost2", b"lost3"]), return_exceptions=True
            )
            for r in results:
                assert isinstance(r, LogUnavailable)
                assert str(db) in str(r) and "locked" in str(r)
        finally:
            locker.rollback()
            locker.close()
        assert await log.append([b"c"]) == 2  # the failed batch's offsets were not consumed
        assert [r.payload for r in await read_all(log)] == [b"a", b"b", b"c"]


async def test_batched_write_failure_keeps_records_and_offsets(db: Path) -> None:
    async with SqliteEventLog(db, "batched", flush_interval_ms=600_000, busy_timeout_ms=50) as log:
        assert await log.append([b"a"]) == 0
        await log.flush()
        locker = _lock(db)
        try:
            assert await log.append([b"b"]) == 1  # accepted: queued in memory
            with pytest.raises(LogUnavailable, match="locked"):
                await log.flush()
            with pytest.raises(LogUnavailable):  # back-pressure while the log is failing
                await log.append([b"refused"])
        finally:
            locker.rollback()
            locker.close()
        await log.flush()  # the queued record is retried with its promised offset
        assert await log.append([b"c"]) == 2
        await log.flush()
        assert [r.payload for r in await read_all(log)] == [b"a", b"b", b"c"]


async def test_open_log_factory(tmp_path: Path) -> None:
    log = open_log("embedded", tmp_path / "data", "batched", 2.0)
    assert isinstance(log, SqliteEventLog)
    assert log.path == tmp_path / "data" / "events.db"
    assert log.durability == "batched"
    assert log.flush_interval_ms == 2.0
    async with log:
        assert await log.append([b"x"]) == 0
    assert (tmp_path / "data" / "events.db").exists()
    with pytest.raises(ValueError, match="kafka"):
        open_log("kafka", tmp_path, "strict", 5.0)
    with pytest.raises(ValueError):
        SqliteEventLog(tmp_path / "x.db", "sometimes")  # type: ignore[arg-type]


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from eventlog.sqlite import SqliteEventLog

    async def main(path):
        log = SqliteEventLog(path, "strict")
        await log.open()

        async def worker(w):
            i = 0
            while True:
                payload = b"w%d-%d-" % (w, i) + b"x" * 200
                offset = await log.append([payload, payload + b"-2"])
                sys.stdout.write(f"{{offset}} {{payload.decode()}}\\n")
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_sigkill_in_strict_mode_loses_no_acked_record(db: Path, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: dict[int, bytes] = {}
    try:
        while len(acked) < 500:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            assert line, f"child exited early with {await proc.wait()}"
            offset, payload = line.split()
            acked[int(offset)] = payload
    finally:
        proc.send_signal(signal.SIGKILL)
        rc = await proc.wait()
    assert rc == -signal.SIGKILL
    # lines written before the kill are acks too (complete lines only)
    for line in (await proc.stdout.read()).splitlines(keepends=True):
        if line.endswith(b"\n"):
            offset, payload = line.split()
            acked[int(offset)] = payload

    async with SqliteEventLog(db) as log:
        records = await read_all(log)
        end = await log.end_offset()
        assert [r.offset for r in records] == list(range(end))  # dense, no gaps
        by_offset = {r.offset: r.payload for r in records}
        for offset, payload in acked.items():
            assert by_offset[offset] == payload + b"-2"  # the acked append's last record
            assert by_offset[offset - 1] == payload  # and its first, right before it
        assert end >= 2 * len(acked)
        assert await log.append([b"after"]) == end
