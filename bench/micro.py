"""Micro-benchmarks of the pieces behind the hot path (prints figures, asserts nothing).

    python bench/micro.py [--quick] [--json]

- policy: gateway.policy.engine.decide on a policy of 100 tools x 5 limits (every scope and
  window), alone and followed by Limiter.charge (what the gateway does per call);
- log append: eventlog.SqliteEventLog events/s, strict and batched, 1 and 16 appenders,
  realistic call.decided payloads (bench/bench_eventlog.py);
- audit: AuditConsumer events/s into embedded chDB (bench/bench_audit.py, in a
  subprocess: chDB allows one data dir per process);
- rebuild: 1 M allowed call.decided events with charges, built like
  gateway/audit/writer.py's AuditAddon.decided_event, in a SqliteEventLog (batched); then
  the time of ledgergate.embedded.rebuild_limiters over them (what a restart costs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_eventlog import bench_append, make_payloads  # noqa: E402

from eventlog.sqlite import SqliteEventLog  # noqa: E402
from gateway.audit.redaction import args_sha256  # noqa: E402
from gateway.policy.engine import Call, decide, parse_policy  # noqa: E402
from gateway.policy.limiter import Limiter  # noqa: E402
from ledgergate.embedded import rebuild_limiters  # noqa: E402
from schemas.events import SCHEMA_VERSION, uuid7  # noqa: E402

WINDOWS = ["second", "minute", "hour", "day", 90]
SCOPES = ["grant", "agent", "session", "tool", "global"]


def policy_100x5() -> bytes:
    tools = {}
    for t in range(100):
        tools[f"tool_{t:03d}"] = {
            "limits": [
                {
                    "counter": f"c_{t:03d}_{i}",
                    "window": WINDOWS[i],
                    "max": 1_000_000_000,
                    "scope": SCOPES[i],
                }
                for i in range(5)
            ]
        }
    return json.dumps({"version": "1", "default": "deny", "tools": tools}).encode()


def bench_policy(n: int) -> dict:
    pol = parse_policy(policy_100x5(), "bench-100x5.json")
    limiter = Limiter()
    calls = [
        Call("bench", "tools/call", f"tool_{t:03d}", "grant-a", "agent-a", "sess-1", {})
        for t in range(0, 100, 7)
    ]
    now = time.time()
    view = limiter.view()
    out = {}
    for label, charge in (("decide", False), ("decide+charge", True)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(n):
                d = decide(calls[i % len(calls)], pol, view, now)
                if charge:
                    limiter.charge(d)
            best = min(best, time.perf_counter() - t0)
        assert d.allowed
        out[f"{label}_us"] = best / n * 1e6
    # the denied paths: an unlisted tool (default deny)
    unlisted = Call("bench", "tools/call", "nope", "grant-a", "agent-a", "sess-1", {})
    t0 = time.perf_counter()
    for _ in range(n):
        decide(unlisted, pol, view, now)
    out["decide_default_deny_us"] = (time.perf_counter() - t0) / n * 1e6
    out["policy"] = "100 tools x 5 limits (scopes grant/agent/session/tool/global; windows s/min/h/day/90s)"
    return out


async def bench_log(quick: bool) -> dict:
    out = {}
    payloads = make_payloads(20_000 if quick else 100_000, None)
    out["payload_bytes"] = round(sum(map(len, payloads)) / len(payloads))
    with tempfile.TemporaryDirectory(prefix="lg-micro-log-") as tmp:
        for durability in ("strict", "batched"):
            for conc in (1, 16):
                n = len(payloads)
                if durability == "strict" and conc == 1:
                    n = 1_000 if quick else 3_000  # one fsync per event
                path = Path(tmp) / f"{durability}-{conc}.db"
                rate = await bench_append(path, durability, conc, payloads[:n], yield_=True)
                out[f"{durability}_{conc}_events_per_s"] = rate
    return out


def bench_audit(events: int) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_audit.py"), "--events", str(events)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": "bench_audit.py timed out (600 s)"}
    m = re.search(r"catch_up: (\d+) events in ([\d.]+)s = ([\d,]+) events/s", r.stdout)
    rp = re.search(r"replay:\s+(\d+) events in ([\d.]+)s = ([\d,]+) events/s", r.stdout)
    if r.returncode != 0 or m is None:
        return {"error": f"bench_audit.py exit {r.returncode}: {(r.stdout + r.stderr)[-800:]}"}
    return {
        "events": int(m.group(1)),
        "catch_up_s": float(m.group(2)),
        "catch_up_events_per_s": int(m.group(3).replace(",", "")),
        "replay_events_per_s": int(rp.group(3).replace(",", "")) if rp else None,
        "output": r.stdout.strip().splitlines(),
    }


def decided_payloads(n: int, now: float) -> list[bytes]:
    """n allowed call.decided events as AuditAddon.decided_event builds them (2 charges each)."""
    grants = [(f"grant-{i}", f"agent-{i}") for i in range(50)]
    args: dict = {}
    sha = args_sha256(args)
    now_ms = int(now * 1000)
    out = []
    dumps = orjson.dumps
    for i in range(n):
        grant, agent = grants[i % 50]
        ts = now_ms - (n - i) // 2  # the last ~n/2 ms: all inside the open windows
        minute = ts // 60_000 * 60
        hour = ts // 3_600_000 * 3600
        ev = {
            "schema_version": SCHEMA_VERSION,
            "event_id": uuid7(),
            "ts": ts,
            "gateway": "gw-bench",
            "kind": "call.decided",
            "call_id": uuid7(),
            "server": "bench",
            "method": "tools/call",
            "tool": "open_session",
            "request_id": str(i),
            "grant": grant,
            "agent": agent,
            "session": f"s-{i % 200}",
            "protocol_version": "2025-11-25",
            "client_name": "bench",
            "client_version": "1.0",
            "remote": "127.0.0.1",
            "arguments": args,
            "args_sha256": sha,
            "decision": "allow",
            "rule": "/tools/open_session",
            "reason": None,
            "retry_after_s": None,
            "counters": [
                {
                    "counter": "open_rate",
                    "scope": "grant",
                    "key": grant,
                    "window_s": 60,
                    "window_start": minute,
                    "count": 1,
                    "max": 1_000_000_000,
                },
                {
                    "counter": "open_hourly",
                    "scope": "agent",
                    "key": agent,
                    "window_s": 3600,
                    "window_start": hour,
                    "count": 1,
                    "max": 1_000_000_000,
                },
            ],
            "charges": [
                {
                    "counter": "open_rate",
                    "key": grant,
                    "scope": "grant",
                    "window_start": minute,
                    "window_s": 60,
                },
                {
                    "counter": "open_hourly",
                    "key": agent,
                    "scope": "agent",
                    "window_start": hour,
                    "window_s": 3600,
                },
            ],
            "policy_version": "0" * 64,
        }
        out.append(dumps(ev))
    return out


async def bench_rebuild(n: int) -> dict:
    now = time.time()
    t0 = time.perf_counter()
    payloads = decided_payloads(n, now)
    built_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="lg-micro-rebuild-") as tmp:
        log = SqliteEventLog(Path(tmp) / "events.db", "batched")
        await log.open()
        t0 = time.perf_counter()
        for i in range(0, n, 50_000):
            await log.append(payloads[i : i + 50_000])
        await log.flush()
        write_s = time.perf_counter() - t0
        del payloads
        limiter = Limiter()
        t0 = time.perf_counter()
        folded = await rebuild_limiters(log, {"bench": limiter}, 3600, now + 1)
        rebuild_s = time.perf_counter() - t0
        await log.close()
    return {
        "events": n,
        "build_s": built_s,
        "write_s": write_s,
        "rebuild_s": rebuild_s,
        "charges_folded": folded,
        "cells": len(limiter),
        "events_per_s": n / rebuild_s,
    }


async def run(quick: bool) -> dict:
    res: dict = {}
    print("micro: policy decision ...", flush=True)
    res["policy"] = bench_policy(50_000 if quick else 200_000)
    print("micro: log append ...", flush=True)
    res["log_append"] = await bench_log(quick)
    print("micro: audit consumer into chDB ...", flush=True)
    res["audit"] = bench_audit(50_000 if quick else 200_000)
    print("micro: counters rebuild ...", flush=True)
    res["rebuild"] = await bench_rebuild(200_000 if quick else 1_000_000)
    return res


def report(res: dict) -> str:
    p, lg, au, rb = res["policy"], res["log_append"], res["audit"], res["rebuild"]
    lines = [
        f"policy decide ({p['policy']}): {p['decide_us']:.2f} us; "
        f"decide+charge {p['decide+charge_us']:.2f} us; "
        f"default deny {p['decide_default_deny_us']:.2f} us",
        f"log append ({lg['payload_bytes']} B events): "
        f"strict 1 appender {lg['strict_1_events_per_s']:,.0f}/s, "
        f"16 appenders {lg['strict_16_events_per_s']:,.0f}/s; batched 1 appender "
        f"{lg['batched_1_events_per_s']:,.0f}/s, 16 appenders {lg['batched_16_events_per_s']:,.0f}/s",
    ]
    if "error" in au:
        lines.append(f"audit consumer: ERROR {au['error']}")
    else:
        lines.append(
            f"audit consumer into chDB: {au['catch_up_events_per_s']:,.0f} events/s catch-up "
            f"({au['events']:,} events), replay {au['replay_events_per_s'] or 0:,.0f} events/s"
        )
    lines.append(
        f"counters rebuild: {rb['events']:,} events in {rb['rebuild_s']:.2f} s "
        f"({rb['events_per_s']:,.0f} events/s, "
        f"{rb['charges_folded']:,} charges into {rb['cells']} cells); writing them took {rb['write_s']:.2f} s"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes (200k rebuild, 50k audit)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object at the end")
    a = ap.parse_args()
    res = asyncio.run(run(a.quick))
    print(report(res))
    if a.json:
        print("MICROJSON " + json.dumps(res))


if __name__ == "__main__":
    main()
