"""Throughput of the embedded event log (SqliteEventLog).

Appends realistic ~300-byte `call.decided` events (schemas.events.CallDecided +
encode) with 1, 16 and 256 concurrent appenders, one event per append(), in strict
and batched durability; then reads everything back. Prints a table; no assertions.

    .venv/bin/python bench/bench_eventlog.py [--events N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eventlog.sqlite import SqliteEventLog
from schemas.events import CallDecided, CounterCharge, encode, uuid7


def make_payloads(n: int, size: int | None) -> list[bytes]:
    """n encoded CallDecided events; with `size`, each cut or padded (with spaces, still
    valid JSON) to exactly that many bytes (an encoded CallDecided is >= ~520 bytes)."""
    out = []
    for i in range(n):
        ev = CallDecided(
            gateway="gw-1",
            call_id=uuid7(),
            server="whatsapp",
            method="tools/call",
            tool="open_session",
            request_id=str(i),
            grant="alice",
            agent="agent-7",
            decision="allow",
            charges=[
                CounterCharge(
                    counter="open_session_rate",
                    key="alice",
                    scope="grant",
                    window_start=1_700_000_000,
                    window_s=60,
                )
            ],
        )
        payload = encode(ev)
        if size is not None:
            payload = payload[:size].ljust(size, b" ")
        out.append(payload)
    return out


async def bench_append(
    path: Path, durability: str, concurrency: int, payloads: list[bytes], yield_: bool = False
) -> float:
    log = SqliteEventLog(path, durability)  # type: ignore[arg-type]
    await log.open()
    per_task = len(payloads) // concurrency
    chunks = [payloads[i * per_task : (i + 1) * per_task] for i in range(concurrency)]

    async def worker(mine: list[bytes]) -> None:
        for p in mine:
            await log.append([p])
            if yield_:  # let the loop run between appends, like a gateway task doing I/O
                await asyncio.sleep(0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in chunks))
    await log.flush()
    elapsed = time.perf_counter() - t0
    await log.close()
    return per_task * concurrency / elapsed


async def bench_read(path: Path, batch: int) -> tuple[int, float]:
    log = SqliteEventLog(path)
    await log.open()
    t0 = time.perf_counter()
    offset = n = 0
    while True:
        records = await log.read(offset, batch)
        if not records:
            break
        n += len(records)
        offset = records[-1].offset + 1
    elapsed = time.perf_counter() - t0
    await log.close()
    return n, n / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000, help="events per run (default 100000)")
    ap.add_argument(
        "--size", type=int, default=300, help="payload bytes (default 300); 0 = the encoded size as is"
    )
    ap.add_argument("--dir", type=Path, default=None, help="where to put the databases (default: a tmp dir)")
    args = ap.parse_args()

    payloads = make_payloads(args.events, args.size or None)
    avg = sum(map(len, payloads)) / len(payloads)
    print(f"{args.events} events per run, payload {avg:.0f} bytes, sqlite {sqlite3.sqlite_version}")
    print()
    print(f"{'durability':<14} {'appenders':>9} {'events/s':>12}")
    print("-" * 37)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        last = None
        for mode in ("strict", "batched", "batched+yield"):
            durability = mode.split("+")[0]
            for concurrency in (1, 16, 64, 256):
                n = args.events
                if durability == "strict" and concurrency == 1:
                    n = min(n, 5_000)  # one fsync per event: keep the run short
                path = Path(tmp) / f"{durability}-{concurrency}-{len(mode)}.db"
                rate = await bench_append(path, durability, concurrency, payloads[:n], mode.endswith("yield"))
                print(f"{mode:<14} {concurrency:>9} {rate:>12,.0f}")
                last = path
        print()
        print(f"{'read batch':<14} {'records':>9} {'records/s':>12}")
        print("-" * 37)
        assert last is not None
        for batch in (100, 1_000, 10_000):
            n, rate = await bench_read(last, batch)
            print(f"{batch:<14} {n:>9} {rate:>12,.0f}")


if __name__ == "__main__":
    asyncio.run(main())
