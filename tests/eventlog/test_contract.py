"""The event-log contract against both backends: the embedded SQLite log and Kafka (tansu).

Kafka-only behaviour (topic creation, keys, the spool through a broker outage) is tested
below the contract classes, on real brokers started by tests/support/kafka.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from eventlog import open_log
from eventlog.base import EventLog
from eventlog.kafka import KafkaEventLog, grant_key
from eventlog.sqlite import SqliteEventLog
from tests.support.eventlog_contract import (
    TIMEOUT,
    EventLogContract,
    MakeLog,
    by_grant,
    payload,
    read_all,
    wait_until,
)
from tests.support.kafka import Tansu, kafka_broker, unique_topic

__all__ = ["kafka_broker"]  # the session fixture, used by name


class TestSqliteEventLog(EventLogContract):
    expected_partitions = [0]

    @pytest.fixture
    def make_log(self, tmp_path: Path) -> MakeLog:
        def make(durability: str = "strict", flush_interval_ms: float = 5.0) -> EventLog:
            # a 10-minute poll: a tail that wakes in time was woken by the append itself
            return SqliteEventLog(tmp_path / "events.db", durability, flush_interval_ms, tail_poll_s=600)  # type: ignore[arg-type]

        return make


class TestKafkaEventLog(EventLogContract):
    expected_partitions = [0, 1, 2, 3]

    @pytest.fixture
    def make_log(self, kafka_broker: Tansu, tmp_path: Path) -> MakeLog:
        topic = unique_topic()
        spools = itertools.count()

        def make(durability: str = "strict", flush_interval_ms: float = 5.0) -> EventLog:
            return KafkaEventLog(
                kafka_broker.bootstrap,
                topic,
                durability,  # type: ignore[arg-type]
                flush_interval_ms,
                partitions=4,
                spool_path=tmp_path / f"spool-{next(spools)}.db",
            )

        return make


# ---- Kafka only -------------------------------------------------------------------------------


def test_grant_key_is_the_events_own_grant() -> None:
    p = orjson.dumps(
        {"event_id": "e", "kind": "call.decided", "grant": "alice", "arguments": {"grant": "mallory"}}
    )
    assert grant_key(p) == b"alice"
    assert grant_key(b'{"kind":"policy.loaded","server":"x"}') is None
    assert grant_key(orjson.dumps({"grant": 'q"uote'})) == grant_key(orjson.dumps({"grant": 'q"uote'}))


async def test_open_log_builds_kafka_from_config_keys(tmp_path: Path, kafka_broker: Tansu) -> None:
    topic = unique_topic("cfg")
    log = open_log(
        "kafka", tmp_path, "batched", 2.0, bootstrap=kafka_broker.bootstrap, topic=topic, partitions=3
    )
    assert isinstance(log, KafkaEventLog)
    assert log.spool_path == tmp_path / "spool.db"
    assert (log.durability, log.flush_interval_ms, log.linger_ms) == ("batched", 2.0, 2.0)
    async with log:
        assert await log.partitions() == [0, 1, 2]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)
    await admin.start()
    try:
        assert topic in await admin.list_topics()
        (desc,) = await admin.describe_topics([topic])
        assert len(desc["partitions"]) == 3
    finally:
        await admin.close()
    # an existing topic is used as it is (another gateway created it)
    again = open_log("kafka", tmp_path, bootstrap=kafka_broker.bootstrap, topic=topic, partitions=5)
    async with again as log:
        assert await log.partitions() == [0, 1, 2]
    with pytest.raises(ValueError, match="bootstrap"):
        open_log("kafka", tmp_path)


async def test_multi_partition_topic_refuses_the_int_offset_api(tmp_path: Path, kafka_broker: Tansu) -> None:
    async with KafkaEventLog(
        kafka_broker.bootstrap, unique_topic(), partitions=2, spool_path=tmp_path / "s.db"
    ) as log:
        with pytest.raises(ValueError, match="position API"):
            await log.read(0)
    async with KafkaEventLog(
        kafka_broker.bootstrap, unique_topic(), partitions=1, spool_path=tmp_path / "s1.db"
    ) as log:
        await log.append([payload("a", 0), payload("a", 1)])
        assert await log.end_offset() == 2
        assert [r.offset for r in await log.read(0)] == [0, 1]
        await log.commit("audit", 2)
        assert await log.committed("audit") == 2


@pytest.mark.parametrize("durability", ["strict", "batched"])
async def test_spool_through_a_broker_outage(tmp_path: Path, durability: str) -> None:
    """Broker stopped mid-appends: appends keep returning (spooled, fsync'd in strict mode),
    and when the broker is back the spool drains to it, each grant in order, nothing lost."""
    broker = Tansu(tmp_path / "broker")
    await broker.start()
    topic = unique_topic("spool")
    log = KafkaEventLog(
        broker.bootstrap,
        topic,
        durability,  # type: ignore[arg-type]
        5.0,
        partitions=3,
        spool_path=tmp_path / "spool.db",
        spool_after_ms=300,
        request_timeout_ms=3_000,
    )
    await log.open()
    try:
        before = [payload(f"g{i % 4}", i // 4) for i in range(40)]
        for p in before:
            await log.append([p])
        await log.flush()
        assert not log.spooling and log.spool_depth == 0

        broker.stop()  # memory storage: what was on it is gone; the topic too
        during = [payload(f"g{i % 4}", 10 + i // 4) for i in range(40)]
        for p in during:
            await log.append([p])  # returns: acked by the spool instead of the broker
        # batched: no ack within spool_after_ms moves them; flush() waits for acked-or-spooled
        await log.flush()
        assert log.spooling
        assert log.spool_depth >= len(during)
        assert log.spool_age_s() >= 0
        if durability == "strict":
            # strict: every spooled record is fsync'd in spool.db already
            async with SqliteEventLog(tmp_path / "spool.db") as spool:
                stored = {r.payload for r in await spool.read(0, 10_000)}
            assert set(during) <= stored

        await broker.start()  # same port, empty broker
        after = [payload(f"g{i % 4}", 20 + i // 4) for i in range(8)]
        for p in after:
            await log.append([p])

        async def drained() -> bool:
            return not log.spooling and log.spool_depth == 0

        await wait_until(drained, "the spool to drain into the restarted broker")
        await log.flush()
        records = await read_all(log)
        got = by_grant(records)
        # the restarted broker has everything appended during the outage and after it, each
        # grant in append order once duplicates (at-least-once) are dropped by event_id
        for g in range(4):
            seqs = [s for s in got[f"g{g}"] if s >= 10]
            deduped = list(dict.fromkeys(seqs))
            assert deduped == list(range(10, 22)), (g, seqs)
        assert log.drained_total >= len(during)
        async with SqliteEventLog(tmp_path / "spool.db") as spool:
            # drained records are removed (the last one stays: it keeps the offsets going)
            assert len(await spool.read(0, 10_000)) <= 1
    finally:
        await log.close()
        broker.stop()


async def test_broker_down_at_open_spools_then_drains(tmp_path: Path) -> None:
    broker = Tansu(tmp_path / "broker")  # not started yet
    topic = unique_topic("late")
    log = KafkaEventLog(
        broker.bootstrap, topic, "strict", partitions=2, spool_path=tmp_path / "spool.db", spool_after_ms=200
    )
    await log.open()  # the gateway starts even though the broker is down
    try:
        assert log.spooling
        sent = [payload(f"g{i % 3}", i // 3) for i in range(15)]
        for p in sent:
            await log.append([p])
        assert log.spool_depth == 15
        await broker.start()
        await wait_until(_drained(log), "the spool to drain once the broker is up")
        records = await read_all(log)
        assert sorted(r.payload for r in records) == sorted(sent)
        assert by_grant(records) == {f"g{g}": list(range(5)) for g in range(3)}
    finally:
        await log.close()
        broker.stop()


async def test_spool_left_at_close_drains_at_next_open(tmp_path: Path) -> None:
    broker = Tansu(tmp_path / "broker")
    topic = unique_topic("reopen")
    spool = tmp_path / "spool.db"
    async with KafkaEventLog(broker.bootstrap, topic, spool_path=spool, spool_after_ms=200) as log:
        for i in range(5):
            await log.append([payload("z", i)])
        assert log.spool_depth == 5
    await broker.start()
    try:
        async with KafkaEventLog(broker.bootstrap, topic, spool_path=spool, spool_after_ms=200) as log:
            assert log.spool_depth == 5 and log.spool_age_s() >= 0
            await wait_until(_drained(log), "the leftover spool to drain")
            assert by_grant(await read_all(log)) == {"z": list(range(5))}
    finally:
        broker.stop()


def _drained(log: KafkaEventLog) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not log.spooling and log.spool_depth == 0

    return check


async def test_tail_on_kafka_sees_another_gateways_records(tmp_path: Path, kafka_broker: Tansu) -> None:
    topic = unique_topic("two")
    async with (
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=2, spool_path=tmp_path / "a.db") as a,
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=2, spool_path=tmp_path / "b.db") as b,
    ):
        tail = a.tail_position({0: 0, 1: 0})
        waiting = asyncio.create_task(anext(tail))
        await b.append([payload("from-b", 0)])
        batch = await asyncio.wait_for(waiting, TIMEOUT)
        assert by_grant(batch) == {"from-b": [0]}
        await tail.aclose()


async def test_tail_payloads_hands_payloads_and_the_position_after_them(
    tmp_path: Path, kafka_broker: Tansu
) -> None:
    """The replica fold's tail: payloads and where to go on from, paced (the partitions are
    paused between batches and resumed: nothing appended meanwhile is lost or stuck)."""
    topic = unique_topic("pay")
    async with (
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=2, spool_path=tmp_path / "a.db") as a,
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=2, spool_path=tmp_path / "b.db") as b,
    ):
        first = [payload(g, i) for i in range(3) for g in ("g1", "g2")]
        await a.append(first)
        position: dict[int, int] = {}
        got: list[bytes] = []
        tail = b.tail_payloads({0: 0, 1: 0}, max_wait_ms=20, pace_ms=50)
        while len(got) < len(first):
            payloads, after = await asyncio.wait_for(anext(tail), TIMEOUT)
            got += payloads
            position.update(after)
        assert sorted(got) == sorted(first)
        end = await a.end_position()
        assert position == end  # the position after every record handed
        later = [payload("g1", 3), payload("g2", 3)]
        await a.append(later)  # lands while the tail is paused or waiting
        more: list[bytes] = []
        while len(more) < len(later):
            payloads, after = await asyncio.wait_for(anext(tail), TIMEOUT)
            more += payloads
            position.update(after)
        assert sorted(more) == sorted(later)
        assert position == await a.end_position()
        await tail.aclose()


async def test_end_position_answers_while_another_gateway_appends_steadily(
    tmp_path: Path, kafka_broker: Tansu
) -> None:
    """A replica starting next to a loaded one: its rebuild asks for the end while every fetch
    response carries new records. The end it gets covers what was acked before it asked."""
    topic = unique_topic("busy")
    async with (
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=1, spool_path=tmp_path / "a.db") as a,
        KafkaEventLog(kafka_broker.bootstrap, topic, partitions=1, spool_path=tmp_path / "b.db") as b,
    ):
        acked = [-1]
        stop = asyncio.Event()

        async def writer() -> None:
            i = 0
            while not stop.is_set():  # strict appends, back to back: a record every round trip
                acked[0] = await a.append([payload("busy", i)])
                i += 1

        task = asyncio.create_task(writer())
        try:
            await wait_until(_appended(acked, 20), "the writer to get going")
            for _ in range(3):
                before = acked[0]
                end = await asyncio.wait_for(b.end_position(), TIMEOUT)
                assert end[0] > before  # every record acked before the call is below the end
            assert acked[0] > before  # the writer kept appending while the end was asked
        finally:
            stop.set()
            await task


def _appended(acked: list[int], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return acked[0] >= n

    return check


async def test_spool_depth_and_age_reach_metrics_and_health(tmp_path: Path) -> None:
    """What an operator watches during a broker outage: /metrics and /admin/health."""
    from types import SimpleNamespace

    from gateway.observability.metrics import Metrics
    from gateway.proxy import health_doc

    broker = Tansu(tmp_path / "broker")  # never started: the broker is down
    log = KafkaEventLog(
        broker.bootstrap, unique_topic("watch"), spool_path=tmp_path / "spool.db", spool_after_ms=200
    )
    await log.open()
    try:
        for i in range(4):
            await log.append([payload("w", i)])
        metrics = Metrics()
        metrics.eventlog = log
        text = (await metrics.render()).decode()
        assert "ledgergate_eventlog_spool_records 4.0" in text
        assert "ledgergate_eventlog_spool_active 1.0" in text
        assert "ledgergate_eventlog_spool_age_seconds" in text
        # the composition root's extra, as serve() adds it (a stand-in proxy: one function's unit test)
        proxy = SimpleNamespace(sessions={}, inflight={}, upstreams={}, health_extras=[])
        proxy.health_extras.append(lambda: {"spool": log.spool_stats()})
        doc = health_doc(proxy)  # type: ignore[arg-type]
        assert doc["spool"]["depth"] == 4 and doc["spool"]["spooling"] is True
        assert doc["spool"]["age_s"] >= 0
    finally:
        await log.close()
