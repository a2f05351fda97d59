"""Events/s through AuditConsumer into embedded chDB (no assertions; prints figures).

    python bench/bench_audit.py [--events 200000] [--batch 50000]

Builds realistic call.decided / call.completed pairs with schemas.events, appends them
to a SqliteEventLog (batched durability), then times AuditConsumer.catch_up() from
offset 0 into a fresh chDB store (log read + decode + insert + commit), and a replay.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.audit import AuditConsumer
from consumers.store import open_store
from eventlog.sqlite import SqliteEventLog
from gateway.audit.redaction import args_sha256, redact
from schemas import events as E

TOOLS = ["open_session", "send_message", "get_chats", "create_group", "get_group_participants"]
AGENTS = [(f"agent-{i}", f"grant-{i}") for i in range(20)]


def build(n: int) -> list[bytes]:
    rnd = random.Random(7)
    out: list[bytes] = []
    ts = E.now_ms() - n * 5
    while len(out) < n:
        ts += rnd.randint(1, 10)
        agent, grant = rnd.choice(AGENTS)
        tool = rnd.choice(TOOLS)
        args = {"phone_number": f"+1555{rnd.randint(0, 99999):05d}", "content": "hello " * 5, "token": "x"}
        decision = rnd.choices(["allow", "deny", "rate_limited"], [90, 5, 5])[0]
        call_id = E.uuid7()
        out.append(
            E.encode(
                E.CallDecided(
                    ts=ts,
                    call_id=call_id,
                    server="whatsapp",
                    method="tools/call",
                    tool=tool,
                    grant=grant,
                    agent=agent,
                    session=f"s-{agent}",
                    request_id=str(len(out)),
                    arguments=redact(args, ["content"]),
                    args_sha256=args_sha256(args),
                    decision=decision,
                    gateway="gw-1",
                    rule=None if decision == "allow" else "/tools/open_session/limits/0",
                    reason=None if decision == "allow" else "limit reached",
                    client_name="claude-code",
                )
            )
        )
        out.append(
            E.encode(
                E.CallCompleted(
                    ts=ts + 3,
                    call_id=call_id,
                    server="whatsapp",
                    method="tools/call",
                    tool=tool,
                    grant=grant,
                    agent=agent,
                    session=f"s-{agent}",
                    outcome="ok" if decision == "allow" else "refused",
                    upstream_ms=rnd.uniform(1, 50),
                    response_bytes=rnd.randint(50, 5000),
                    gateway="gw-1",
                )
            )
        )
    return out[:n]


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=50_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lg-bench-") as tmp:
        t = time.perf_counter()
        payloads = build(a.events)
        print(
            f"built {len(payloads)} events ({sum(map(len, payloads)) / len(payloads):.0f} B avg) "
            f"in {time.perf_counter() - t:.2f}s"
        )
        log = SqliteEventLog(Path(tmp) / "events.db", durability="batched")
        await log.open()
        for i in range(0, len(payloads), 50_000):
            await log.append(payloads[i : i + 50_000])
        await log.flush()
        store = await open_store("embedded", tmp)
        try:
            consumer = AuditConsumer(log, store, batch=a.batch)
            t = time.perf_counter()
            n = await consumer.catch_up()
            dt = time.perf_counter() - t
            print(f"catch_up: {n} events in {dt:.2f}s = {n / dt:,.0f} events/s (batch {a.batch})")
            t = time.perf_counter()
            n = await consumer.replay(0)
            dt = time.perf_counter() - t
            print(f"replay:   {n} events in {dt:.2f}s = {n / dt:,.0f} events/s")
            _, rows = await store.query("SELECT count() FROM audit_calls FINAL")
            print(f"audit_calls FINAL rows: {rows[0][0]}")
        finally:
            await store.close()
            await log.close()


if __name__ == "__main__":
    asyncio.run(main())
