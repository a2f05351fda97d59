"""The audit trail end to end: real gateway, real upstreams, the embedded log and chDB store,
and the forensic CLI (`ledgergate audit ...`) as a user runs it.

"Who opened WhatsApp sessions?" must have a complete, provable answer: every call an
upstream received has its call.decided event, a kill -9 loses none of them and does not
reset a limit, and replaying the log changes no answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.config import Config, load_config
from ledgergate.embedded import serve
from tests.support.gateway import SEED_POLICY, FakeClock, start_gateway_process, write_config
from tests.support.procs import stop_process
from tests.support.upstreams import StdioCommand

ADMIN = "admin-token-0123456789"
RECORDER = Path(__file__).resolve().parents[1] / "support" / "recording_server.py"


def client(base: str, server: str, key: str) -> Client:
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30.0, read=60.0)
    )
    return Client(streamable_http_client(f"{base}/mcp/{server}", http_client=http), mode="legacy")


async def cli(config: Path, *args: str) -> Any:
    """Run `ledgergate audit ... --format json` (or replay) as a separate process; parse its JSON."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgergate",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"ledgergate {' '.join(args)} exited {proc.returncode}: {err.decode()}"
    return json.loads(out) if "--format" in args else out.decode()


@contextlib.asynccontextmanager
async def serving(cfg: Config, clock: FakeClock) -> AsyncIterator[str]:
    """`serve()` (the same composition `ledgergate run` uses) in this loop, with a fake clock."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_ready(url: str) -> None:
        ready.set_result(url)

    task = asyncio.create_task(serve(cfg, clock=clock, ready=on_ready, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what made serve() fail
    assert ready in done, "gateway not ready in 60 s"
    try:
        yield ready.result()
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def test_seed_scenario_then_audit_who_answers_ten_allowed_two_refused(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    keys = {"demo": "lg-demo-key-0123456789"}
    path = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=keys,
        agents={"demo": "demo-agent"},
        gateway={"admin_token": ADMIN},
    )
    async with serving(load_config(path), FakeClock()) as base, client(base, "whatsapp", keys["demo"]) as c:
        results = [await c.call_tool("open_session", {}) for _ in range(12)]
        assert [r.is_error for r in results] == [False] * 10 + [True] * 2
        # the CLI, a separate process, asks the running gateway over the admin API
        who = await cli(path, "audit", "who", "--tool", "open_session", "--format", "json")
        calls = await cli(
            path, "audit", "calls", "--tool", "open_session", "--limit", "50", "--format", "json"
        )
        denials = await cli(path, "audit", "denials", "--since", "1d", "--format", "json")
    assert [(r["agent"], r["grant"], r["allowed"], r["refused"]) for r in who] == [
        ("demo-agent", "demo", 10, 2)
    ]
    assert len(calls) == 12
    assert sorted(c["decision"] for c in calls) == ["allow"] * 10 + ["rate_limited"] * 2
    assert {c["outcome"] for c in calls if c["decision"] == "allow"} == {"ok"}
    assert {c["outcome"] for c in calls if c["decision"] != "allow"} == {"refused"}
    assert [(d["agent"], d["tool"], d["rule"], d["count"]) for d in denials] == [
        ("demo-agent", "open_session", "/tools/open_session/limits/0", 2)
    ]


async def test_redaction_on_stored_rows(tmp_path: Path, everything_server: str) -> None:
    keys = {"ops": "key-ops-0123456789"}
    policy = {"version": "1", "default": "allow", "tools": {"echo": {"redact": ["message"]}}}
    path = write_config(
        tmp_path,
        servers={"everything": {"url": everything_server}},
        policies={"everything": policy},
        grants=keys,
        gateway={"admin_token": ADMIN},
    )
    async with serving(load_config(path), FakeClock()) as base, client(base, "everything", keys["ops"]) as c:
        r = await c.call_tool("echo", {"message": "the-secret-text"})
        assert r.content[0].text == "Echo: the-secret-text"  # the upstream got it whole
        await c.call_tool("get-sum", {"a": 1, "b": 2, "api_key": "sk-live-abcdef"})
        rows = await cli(path, "audit", "calls", "--format", "json")
        leaks = await cli(
            path,
            "audit",
            "sql",
            "SELECT count() AS n FROM audit_calls WHERE position(arguments, {needle:String}) > 0 "
            "OR position(arguments, {key:String}) > 0",
            "--param",
            "needle=the-secret-text",
            "--param",
            "key=sk-live-abcdef",
            "--format",
            "json",
        )
        keys_stored = await cli(
            path,
            "audit",
            "sql",
            "SELECT count() AS n FROM audit_calls WHERE position(arguments, {k:String}) > 0",
            "--param",
            f"k={keys['ops']}",
            "--format",
            "json",
        )
    by_tool = {r["tool"]: r for r in rows}
    assert json.loads(by_tool["echo"]["arguments"]) == {"message": "[REDACTED]"}
    assert json.loads(by_tool["get-sum"]["arguments"]) == {"a": 1, "b": 2, "api_key": "[REDACTED]"}
    assert leaks == [{"n": 0}]
    assert keys_stored == [{"n": 0}]  # the grant key is never stored, only the grant name
    assert {r["grant"] for r in rows} == {"ops"}


async def start_early_in_a_minute(margin_s: float = 40.0) -> int:
    """This test runs a real gateway process on the real clock and must stay inside one
    minute window (it takes 10-20 s); start it early in a window instead of ever crossing
    an edge mid-test. Returns the window."""
    into = time.time() % 60
    if into > 60 - margin_s:
        await asyncio.sleep(60 - into + 0.2)
    return int(time.time() // 60)


async def test_kill_9_under_load_loses_no_decision_and_keeps_the_limit(tmp_path: Path) -> None:
    keys = {"load": "key-load-0123456789"}
    limit = 300  # far more than the load reaches before the kill
    record = tmp_path / "received.txt"
    record.touch()
    policy = {
        "version": "1",
        "default": "deny",
        "tools": {
            "open_session": {
                "limits": [
                    {"counter": "open_session_rate", "window": "minute", "max": limit, "scope": "grant"}
                ]
            }
        },
    }
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": policy},
        grants=keys,
        gateway={"admin_token": ADMIN},
    )
    window = await start_early_in_a_minute()
    gw, base = start_gateway_process(path, tmp_path / "gateway-1.log")

    async def hammer(worker: int) -> None:
        with contextlib.suppress(Exception, BaseExceptionGroup):
            async with client(base, "rec", keys["load"]) as c:
                for i in range(limit):
                    r = await c.call_tool("open_session", {"n": f"w{worker}-{i}"})
                    if r.is_error:
                        return

    workers = [asyncio.create_task(hammer(w)) for w in range(8)]
    try:
        # kill -9 while calls are in flight, once the upstream has received a good part of them
        for _ in range(600):
            if len(record.read_text().split()) >= 30:
                break
            await asyncio.sleep(0.05)
        os.kill(gw.pid, signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        await asyncio.wait(workers, timeout=60)
        stop_process(gw)
    received = set(record.read_text().split())
    assert 30 <= len(received) < limit  # killed mid-load

    gw, base = start_gateway_process(path, tmp_path / "gateway-2.log")
    try:
        calls = await cli(
            path,
            "audit",
            "calls",
            "--tool",
            "open_session",
            "--decision",
            "allow",
            "--limit",
            "1000",
            "--format",
            "json",
        )
        decided = {json.loads(c["arguments"])["n"] for c in calls}
        # every call the upstream received has its durable call.decided in the audit tables
        assert received <= decided, sorted(received - decided)
        # the minute's limit holds across the restart: only what is left of it passes
        async with client(base, "rec", keys["load"]) as c:
            more = [
                await c.call_tool("open_session", {"n": f"after-{i}"})
                for i in range(limit - len(decided) + 1)
            ]
        assert [r.is_error for r in more] == [False] * (limit - len(decided)) + [True]
        assert more[-1].structured_content["rule"] == "/tools/open_session/limits/0"
        assert int(time.time() // 60) == window, "the test outran its minute window: give it more margin"
    finally:
        stop_process(gw)

    # with the gateway stopped the CLI opens the store itself; replaying the log from 0 changes nothing
    before = [canonical(await cli(path, "audit", q, *a, "--format", "json")) for q, a in FORENSICS]
    await cli(path, "replay", "--from", "0")
    after = [canonical(await cli(path, "audit", q, *a, "--format", "json")) for q, a in FORENSICS]
    assert before == after
    assert before[0][0]["allowed"] == limit


def canonical(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))


FORENSICS: list[tuple[str, list[str]]] = [
    ("who", ["--tool", "open_session"]),
    ("calls", ["--limit", "1000"]),
    ("denials", ["--since", "7d"]),
    ("sql", ["SELECT decision, count() AS n FROM audit_calls FINAL GROUP BY decision ORDER BY decision"]),
]
