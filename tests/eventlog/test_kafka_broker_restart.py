"""The broker stopped mid-load and restarted, on storage that survives it (issue 13, item 7).

tansu runs on ``s3://tansu/`` storage against a local S3 server (moto), so what the broker
acked before it stopped is still on the topic after the restart (``memory://`` would lose
it, and with it the proof that nothing was lost). Several appenders keep appending to a
strict ``KafkaEventLog`` throughout: through a SIGTERM outage and then a SIGKILL one. While
the broker is down, strict appends still return (after the local fsync in the spool); once
it is back on the same port, the spool drains while the load goes on, and appends return
to Kafka. At the end the whole topic, read by a fresh reader, holds every appended record
exactly once after dropping duplicates by event_id (at-least-once), each grant in order.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from eventlog.base import Record
from eventlog.kafka import KafkaEventLog
from eventlog.sqlite import SqliteEventLog
from tests.support.eventlog_contract import payload, wait_until
from tests.support.kafka import S3_STORAGE, MotoS3, Tansu, unique_topic

GRANTS = 6  # one appender per grant: an appender's appends are its grant's order
PARTITIONS = 3
STEP = 25  # appends each appender must see return in a phase before the next one starts


class Load:
    """Concurrent appenders, one per grant, each awaiting its strict append before the next."""

    def __init__(self, log: KafkaEventLog) -> None:
        self.log = log
        self.phase = "up"
        self.returned: dict[str, list[int]] = {f"g{i}": [] for i in range(GRANTS)}
        # per phase, per grant: how many appends returned in it
        self.counts: dict[str, dict[str, int]] = {}
        # appends started while the log was spooling with the broker down (this outage):
        # they must be fsync'd in the spool when they return (strict)
        self.spooled: list[bytes] = []
        self.spooled_total = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(g)) for g in self.returned]

    async def _run(self, grant: str) -> None:
        seq = 0
        while not self._stop.is_set():
            down = self.phase.startswith("down") and self.log.spooling
            p = payload(grant, seq)
            await self.log.append([p])
            self.returned[grant].append(seq)
            phase = self.counts.setdefault(self.phase, {})
            phase[grant] = phase.get(grant, 0) + 1
            if down:
                self.spooled.append(p)
                self.spooled_total += 1
            seq += 1

    def each_returned(self, phase: str, n: int = STEP) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            self.raise_failure()
            got = self.counts.get(phase, {})
            return all(got.get(g, 0) >= n for g in self.returned)

        return check

    def raise_failure(self) -> None:
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise AssertionError(f"an appender failed: {t.exception()!r}") from t.exception()

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.raise_failure()

    def total(self) -> int:
        return sum(len(v) for v in self.returned.values())


async def test_broker_restart_mid_load_loses_nothing_and_drains_in_order(tmp_path: Path) -> None:
    s3 = MotoS3(tmp_path)
    broker = Tansu(tmp_path, storage=S3_STORAGE, env=s3.env())
    try:
        await s3.start()
        await broker.start()
        await _outages_under_load(broker, tmp_path)
    finally:
        broker.stop()
        s3.stop()


async def _outages_under_load(broker: Tansu, tmp_path: Path) -> None:
    topic = unique_topic("restart")
    spool_path = tmp_path / "spool.db"
    log = KafkaEventLog(
        broker.bootstrap,
        topic,
        "strict",
        partitions=PARTITIONS,
        spool_path=spool_path,
        spool_after_ms=300,
        request_timeout_ms=3_000,
    )
    load = Load(log)
    await log.open()
    try:
        assert not log.spooling
        load.start()
        await wait_until(load.each_returned("up"), "appends acked by the broker")

        for outage, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
            down, direct = f"down-{outage}", f"direct-{outage}"
            load.spooled.clear()
            load.phase = down
            broker.stop(sig)  # mid-load: appends are in flight
            await wait_until(lambda: _true(log.spooling), f"the log to spool after {sig.name}")
            # strict appends keep returning with the broker down: the spool's fsync acks them
            await wait_until(load.each_returned(down), f"appends to return during the {sig.name} outage")
            assert log.spool_depth > 0
            spooled = list(load.spooled)
            assert len(spooled) >= GRANTS
            async with SqliteEventLog(spool_path) as spool:  # a second reader of the live spool
                stored = {r.payload for r in await spool.read(0, 1_000_000)}
            assert set(spooled) <= stored, "a strict append returned before its record was in the spool"

            load.phase = f"back-{outage}"
            await broker.start()  # same port, same s3 bucket
            # the spool drains while the load goes on, then appends go to Kafka again
            await wait_until(_drained(log), f"the spool to drain after the {sig.name} restart")
            load.phase = direct
            await wait_until(load.each_returned(direct), "appends acked by the broker again")

        await load.stop()
        await log.flush()
        await wait_until(_drained(log), "the spool to be empty at the end")
        assert log.drained_total >= load.spooled_total
    finally:
        await load.stop()
        await log.close()

    # a fresh, plain aiokafka reader of the whole topic after both restarts: what a consumer sees
    records = await _read_topic(broker.bootstrap, topic)
    events = sorted(((r.partition, r.offset, orjson.loads(r.payload)) for r in records), key=lambda e: e[:2])
    ids = [ev["event_id"] for _, _, ev in events]
    want = {f"{g}-{s}" for g, seqs in load.returned.items() for s in seqs}
    assert len(want) == load.total()
    # nothing lost (what the broker acked before each stop is still there: s3 storage),
    # nothing that was never appended
    assert set(ids) == want, (
        f"lost {len(want - set(ids))} (e.g. {sorted(want - set(ids))[:5]}), unexpected {len(set(ids) - want)}"
    )
    # each grant on one partition, in append order once duplicates are dropped by event_id
    for grant, seqs in load.returned.items():
        assert len({p for p, _, ev in events if ev["grant"] == grant}) == 1, f"{grant} spans partitions"
        in_log = [ev["seq"] for _, _, ev in events if ev["grant"] == grant]
        assert list(dict.fromkeys(in_log)) == seqs, grant
    async with SqliteEventLog(spool_path) as spool:
        assert await spool.committed("kafka-drain") == await spool.end_offset()
    print(
        f"appended {load.total()} records ({load.spooled_total} spooled in 2 outages); "
        f"the topic holds {len(ids)} ({len(ids) - len(set(ids))} duplicates)"
    )


async def _read_topic(bootstrap: str, topic: str) -> list[Record]:
    """Every record of every partition, from offset 0 up to each partition's highwater."""
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=30_000)
    await c.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        c.assign(tps)
        for tp in tps:
            c.seek(tp, 0)
        out: list[Record] = []

        async def done() -> bool:
            for tp, msgs in (await c.getmany(*tps, timeout_ms=200)).items():
                out.extend(Record(m.offset, m.value, tp.partition) for m in msgs)
            for tp in tps:
                hw = c.highwater(tp)
                if hw is None or await c.position(tp) < hw:
                    return False
            return True

        await wait_until(done, "a full read of the topic")
        return out
    finally:
        await c.stop()


async def _true(value: bool) -> bool:
    return value


def _drained(log: KafkaEventLog) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not log.spooling and log.spool_depth == 0

    return check
