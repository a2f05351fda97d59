"""Scale-out on a real Kafka-protocol broker (tansu) and a real ClickHouse server (chdb-core's
engine as an HTTP server): `ledgergate consume` processes in consumer groups, the ClickHouse
store through clickhouse-connect, and gateway replicas sharing one limit through the topic.

One broker and one ClickHouse server per session (fixtures); every test has its own topic
and its own database. The ClickHouse outage test starts its own server (it stops it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.bench_eventlog import make_payloads
from consumers.store.http import HttpStore
from eventlog.kafka import KafkaEventLog
from eventlog.sqlite import SqliteEventLog
from tests.ledgergate.test_audit_e2e import ADMIN, RECORDER, cli, client, start_early_in_a_minute
from tests.support.clickhouse import clickhouse_db_url, clickhouse_url, start_server, stop_server
from tests.support.gateway import SEED_POLICY, start_gateway_process, write_config
from tests.support.kafka import Tansu, kafka_broker, unique_topic
from tests.support.procs import ProcHandle, log_tail, start_process, stop_process

__all__ = ["clickhouse_db_url", "clickhouse_url", "kafka_broker"]  # fixtures, used by name

ROOT = Path(__file__).resolve().parents[2]


def spread(payloads: list[bytes], grants: int = 16) -> list[bytes]:
    """Events of several grants, so every partition gets some."""
    return [p.replace(b'"grant":"alice"', b'"grant":"g%d"' % (i % grants), 1) for i, p in enumerate(payloads)]


async def produce(
    bootstrap: str, topic: str, payloads: list[bytes], spool: Path, partitions: int = 3
) -> None:
    async with KafkaEventLog(bootstrap, topic, "batched", spool_path=spool, partitions=partitions) as log:
        for i in range(0, len(payloads), 500):
            await log.append(payloads[i : i + 500])
        await log.flush()
        assert log.spool_depth == 0 and log.drained_total == 0, "the broker was up: nothing spooled"


def start_consumer(
    tmp: Path, name: str, bootstrap: str, topic: str, ch_url: str, *, batch: int = 200
) -> ProcHandle:
    return start_process(
        [
            sys.executable,
            "-m",
            "ledgergate",
            "consume",
            "audit",
            "--kafka",
            bootstrap,
            "--clickhouse",
            ch_url,
            "--topic",
            topic,
            "--batch",
            str(batch),
            "--linger-s",
            "0.05",
            "--status-interval-s",
            "0.5",
        ],
        env={"PYTHONPATH": str(ROOT)},
        log_path=tmp / f"{name}.log",
        cwd=tmp,
    )


async def poll(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 90.0) -> Any:
    """Poll `check` every 0.1 s until it returns something truthy (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class Group:
    """The `audit` group's committed offsets and the topic's end, read from the broker
    (highwater from fetches; no ListOffsets for the end)."""

    def __init__(self, bootstrap: str, topic: str, tmp: Path) -> None:
        self.log = KafkaEventLog(bootstrap, topic, spool_path=tmp / "observer-spool.db")

    async def __aenter__(self) -> Group:
        await self.log.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.log.close()

    async def committed(self) -> int:
        return sum((await self.log.committed_position("audit")).values())

    async def end(self) -> int:
        return sum((await self.log.end_position()).values())

    async def lag(self) -> int:
        return await self.end() - await self.committed()


async def counts(url: str) -> tuple[int, int, int]:
    """(rows as answered: FINAL, distinct event ids, rows on disk before merges)."""
    store = HttpStore(url)
    await store.open()
    try:
        _, rows = await store.query(
            "SELECT (SELECT count() FROM audit_calls FINAL), (SELECT uniqExact(event_id) FROM audit_calls), "
            "(SELECT count() FROM audit_calls)"
        )
        return tuple(rows[0])  # type: ignore[return-value]
    finally:
        await store.close()


# --------------------------------------------------------------------------- consumers


async def test_audit_consumer_sigkill_mid_stream_loses_nothing_doubles_nothing(
    tmp_path: Path, kafka_broker: Tansu, clickhouse_db_url: str
) -> None:
    n = 6_000
    topic = unique_topic("kill")
    await produce(kafka_broker.bootstrap, topic, spread(make_payloads(n, None)), tmp_path / "p.db")
    async with Group(kafka_broker.bootstrap, topic, tmp_path) as group:
        assert await group.end() == n
        c = start_consumer(
            tmp_path, "consumer-1", kafka_broker.bootstrap, topic, clickhouse_db_url, batch=100
        )
        try:
            at = await poll(group.committed, "a first commit", 120)
            os.kill(c.pid, signal.SIGKILL)
            c.proc.wait(10)
        finally:
            stop_process(c)
        at = await group.committed()
        assert 0 < at < n, f"the kill was not mid-stream (committed {at} of {n})"
        before = await counts(clickhouse_db_url)
        assert before[0] < n

        c = start_consumer(tmp_path, "consumer-2", kafka_broker.bootstrap, topic, clickhouse_db_url)
        try:
            await poll(lambda: _eq(group.committed(), n), "the restarted consumer to commit the end", 120)
        finally:
            stop_process(c)
    final, distinct, _ = await counts(clickhouse_db_url)
    assert (final, distinct) == (n, n), "every event once in the answers: none lost, none doubled"


async def _eq(value: Awaitable[int], want: int) -> bool:
    return await value == want


async def test_clickhouse_down_lag_grows_then_drains(tmp_path: Path, kafka_broker: Tansu) -> None:
    topic = unique_topic("chdown")
    payloads = spread(make_payloads(1_000, None))
    proc, url = start_server(tmp_path / "ch")
    port = int(url.rsplit(":", 1)[1])
    c = start_consumer(tmp_path, "consumer", kafka_broker.bootstrap, topic, url)
    try:
        async with Group(kafka_broker.bootstrap, topic, tmp_path) as group:
            await produce(kafka_broker.bootstrap, topic, payloads[:500], tmp_path / "p.db")
            await poll(lambda: _eq(group.committed(), 500), "the first 500 events", 120)

            stop_server(proc)  # ClickHouse goes away
            await produce(kafka_broker.bootstrap, topic, payloads[500:], tmp_path / "p.db")
            lag = await poll(group.lag, "the lag to show", 60)
            assert lag == 500 and await group.committed() == 500, "nothing committed while ClickHouse is down"
            # the consumer keeps retrying with backoff (and stays alive) while nothing is committed
            await poll(
                lambda: _async(c.log_path.read_text().count("retrying in") >= 2), "two retries logged", 60
            )
            assert c.alive() and await group.committed() == 500

            proc, _ = start_server(tmp_path / "ch", port=port)  # back, on the same data
            await poll(lambda: _eq(group.lag(), 0), "the lag to drain", 120)
        final, distinct, _ = await counts(url)
        assert (final, distinct) == (1_000, 1_000)
    finally:
        stop_process(c)
        stop_server(proc)
    assert c.proc.returncode == 0, f"SIGTERM is a clean stop:\n{log_tail(c)}"


async def _async(value: Any) -> Any:
    return value


async def test_two_audit_consumers_in_one_group_share_the_partitions(
    tmp_path: Path, kafka_broker: Tansu, clickhouse_db_url: str
) -> None:
    topic = unique_topic("group")
    payloads = spread(make_payloads(2_000, None))
    await produce(kafka_broker.bootstrap, topic, payloads[:1_000], tmp_path / "p.db", partitions=4)
    a = start_consumer(tmp_path, "a", kafka_broker.bootstrap, topic, clickhouse_db_url)
    b = start_consumer(tmp_path, "b", kafka_broker.bootstrap, topic, clickhouse_db_url)
    try:

        async def split() -> tuple[set[int], set[int]] | None:
            pa, pb = _assigned(a), _assigned(b)
            return (pa, pb) if pa and pb and len(pa | pb) == 4 else None

        pa, pb = await poll(split, "both consumers to hold partitions", 120)
        assert not pa & pb and pa | pb == {0, 1, 2, 3}
        async with Group(kafka_broker.bootstrap, topic, tmp_path) as group:
            await poll(lambda: _eq(group.committed(), 1_000), "the first 1000 events", 120)
            # one member leaves: its partitions move to the other, which takes the rest
            stop_process(a)
            assert a.proc.returncode == 0, log_tail(a)
            await poll(lambda: _async(_assigned(b) == {0, 1, 2, 3}), "b to take every partition", 120)
            await produce(kafka_broker.bootstrap, topic, payloads[1_000:], tmp_path / "p.db", partitions=4)
            await poll(lambda: _eq(group.committed(), 2_000), "every event", 120)
    finally:
        stop_process(a)
        stop_process(b)
    final, distinct, _ = await counts(clickhouse_db_url)
    assert (final, distinct) == (2_000, 2_000)
    both = log_tail(a, 400) + log_tail(b, 400)
    assert "events written" in both


def _assigned(h: ProcHandle) -> set[int]:
    """The partitions a consumer process holds now (its last 'assigned' log line)."""
    lines = [
        ln
        for ln in h.log_path.read_text(errors="replace").splitlines()
        if "eventlog.kafka" in ln and " assigned" in ln
    ]
    if not lines:
        return set()
    return set(json.loads(lines[-1].split("partitions ", 1)[1].split(" assigned")[0]))


# --------------------------------------------------------------------------- end to end


def _config(directory: Path, bootstrap: str, topic: str, record: Path, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(
        directory,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": SEED_POLICY},
        grants={"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"},
        gateway={"admin_token": ADMIN},
        extra=extra
        or (
            f'\n[eventlog]\nbackend = "kafka"\nbootstrap = "{bootstrap}"\ntopic = "{topic}"\npartitions = 3\n'
            'durability = "batched"\n'
        ),
    )


async def test_gateway_kafka_consume_audit_clickhouse_answers_as_embedded_mode(
    tmp_path: Path, kafka_broker: Tansu, clickhouse_db_url: str
) -> None:
    topic = unique_topic("e2e")
    record = tmp_path / "received.txt"
    record.touch()
    path = _config(tmp_path / "kafka", kafka_broker.bootstrap, topic, record)
    await start_early_in_a_minute(margin_s=30.0)
    consumer = start_consumer(tmp_path, "consumer", kafka_broker.bootstrap, topic, clickhouse_db_url)
    gw, base = start_gateway_process(path, tmp_path / "gateway.log")
    try:
        async with client(base, "rec", "key-alice-0123456789") as c:
            alice = [await c.call_tool("open_session", {"n": f"a{i}"}) for i in range(12)]
        async with client(base, "rec", "key-bob-0123456789") as c:
            bob = [await c.call_tool("open_session", {"n": f"b{i}"}) for i in range(3)]
        assert [r.is_error for r in alice] == [False] * 10 + [True] * 2
        assert not any(r.is_error for r in bob)
        stop_process(gw)  # flushes the batched log
        assert "consumers none here" in gw.log_path.read_text(), "Kafka mode runs no consumers by default"
        async with Group(kafka_broker.bootstrap, topic, tmp_path) as group:
            end = await group.end()
            await poll(lambda: _eq(group.committed(), end), "the consumer to reach the end", 120)
            records = [r async for batch in group.log.read_position({}) for r in batch]
    finally:
        stop_process(gw)
        stop_process(consumer)
    assert consumer.proc.returncode == 0, log_tail(consumer)
    who = ("audit", "who", "--tool", "open_session", "--format", "json")
    server_rows = await cli(path, *who, "--clickhouse", clickhouse_db_url)

    # embedded mode, the same events: the topic's records in an embedded log, chDB folds them
    emb = _config(tmp_path / "embedded", "", "", record, extra="\n")
    async with SqliteEventLog(tmp_path / "embedded" / "data" / "events.db") as log:
        await log.append([r.payload for r in records])
    embedded_rows = await cli(emb, *who)
    assert server_rows == embedded_rows
    assert {r["grant"] for r in server_rows} == {"alice", "bob"}, server_rows


# --------------------------------------------------------------------------- replicas


async def _replicas(base: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http,
        http.get(f"{base}/admin/replicas") as resp,
    ):
        assert resp.status == 200
        return orjson.loads(await resp.read())


async def test_two_gateways_on_one_topic_share_one_per_grant_limit(
    tmp_path: Path, kafka_broker: Tansu
) -> None:
    """Overshoot bound: when replica A allows its last call (event ts tA), it counts its own
    calls plus the other's calls folded by then; a call of B is folded at most `lag_A` after
    its ts, so every B call with ts < tA - lag_A was counted. Hence, with A the replica whose
    last allow is the later one, total allowed - max <= B's allowed calls with ts >= tA - lag_A
    (1 ms more for the millisecond stamps). The bound is computed from the topic and each
    gateway's measured lag, never assumed."""
    limit = SEED_POLICY["tools"]["open_session"]["limits"][0]["max"]  # type: ignore[index]
    topic = unique_topic("replicas")
    record = tmp_path / "received.txt"
    record.touch()
    paths = [_config(tmp_path / n, kafka_broker.bootstrap, topic, record) for n in ("a", "b")]
    await start_early_in_a_minute(margin_s=30.0)
    gws = [start_gateway_process(p, tmp_path / f"gateway-{i}.log") for i, p in enumerate(paths)]
    try:

        async def load(base: str) -> int:
            async with client(base, "rec", "key-alice-0123456789") as c:
                results = [await c.call_tool("open_session", {"n": "x"}) for _ in range(12)]
            return sum(not r.is_error for r in results)

        allowed = await asyncio.gather(*(load(base) for _, base in gws))
        total = sum(allowed)
        async with Group(kafka_broker.bootstrap, topic, tmp_path) as group:
            records = [r async for batch in group.log.read_position({}) for r in batch]
        events = [orjson.loads(r.payload) for r in records]
        ok = [
            e
            for e in events
            if e["kind"] == "call.decided" and e["decision"] == "allow" and e["tool"] == "open_session"
        ]
        assert len(ok) == total
        stats = []
        for _, base in gws:  # every allowed call of the other replica is folded (so its lag counted)
            s = await _replicas(base)
            others = sum(e["gateway"] != s["gateway"] for e in ok)
            stats.append(await poll(lambda base=base, o=others: _folded(base, o), "the fold to catch up", 60))
    finally:
        for gw, _ in gws:
            stop_process(gw)
    last = {
        s["gateway"]: max((e["ts"] for e in ok if e["gateway"] == s["gateway"]), default=0) for s in stats
    }
    a = max(stats, key=lambda s: last[s["gateway"]])
    bound = sum(
        1 for e in ok if e["gateway"] != a["gateway"] and e["ts"] >= last[a["gateway"]] - a["max_lag_ms"] - 1
    )
    print(
        f"two replicas, limit {limit}/min: allowed {allowed} = {total}, overshoot {total - limit}, "
        f"bound {bound} (max fold lag {[s['max_lag_ms'] for s in stats]} ms)"
    )
    assert limit <= total <= limit + bound
    assert sum(s["folded_events"] for s in stats) > 0, "the replicas folded each other's calls"
    assert total < 2 * limit or bound >= limit


async def _folded(base: str, want: int) -> dict[str, Any] | None:
    s = await _replicas(base)
    return s if s["folded_events"] >= want else None


@pytest.fixture(autouse=True)
def _pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subprocesses (`ledgergate run`, `consume`, `audit`) import this worktree's code."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
