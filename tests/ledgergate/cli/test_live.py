"""Alerts across a kill -9, and the live views (`alerts tail`, `audit calls --follow`,
GET /admin/events), with the real gateway process or serve(), the real whatsapp upstream
through the official MCP SDK, and a real local webhook receiver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from tests.consumers.test_alerts import (
    ADMIN,
    ADMIN_AUTH,
    EVERY_REFUSAL,
    KEY,
    SECRET,
    SECRET_ENV,
    alerts_toml,
    config,
    log_rows,
    receiver,
    sdk_client,
    serving,
    until,
)
from tests.support.gateway import SEED_POLICY, FakeClock, start_gateway_process, write_config
from tests.support.procs import stop_process
from tests.support.upstreams import StdioCommand


def alert_events(cfg: Any, kind: str) -> list[dict[str, Any]]:
    return [e for e in log_rows(cfg)[2] if e["kind"] == kind]


async def test_kill9_and_restart_send_no_alert_twice_and_lose_none(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    from gateway.config import load_config

    async with receiver() as hook:
        path = write_config(
            tmp_path,
            servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
            policies={"whatsapp": SEED_POLICY},
            grants={"alice": KEY},
            agents={"alice": "agent-a"},
            gateway={"admin_token": ADMIN},
            extra=alerts_toml(hook.url, EVERY_REFUSAL, timeout_s=2.0),
        )
        cfg = load_config(path)
        env = {SECRET_ENV: SECRET}
        # started in a thread: this loop serves the webhook meanwhile
        handle, base = await asyncio.to_thread(start_gateway_process, path, tmp_path / "gw1.log", env)
        handle2 = None
        try:
            async with sdk_client(base) as c:
                for _ in range(3):
                    assert (await c.call_tool("get_chats", {})).is_error
            await until(lambda: len(hook.accepted) == 3, "3 alerts delivered")
            await until(lambda: len(alert_events(cfg, "alert.delivered")) == 3, "3 deliveries recorded")
            settled = [d["alert_id"] for d in hook.accepted]
            # the receiver goes down: 2 more alerts fire, none is accepted
            hook.fail_all = True
            async with sdk_client(base) as c:
                for _ in range(2):
                    assert (await c.call_tool("get_chats", {})).is_error
            await until(lambda: len(alert_events(cfg, "alert.fired")) == 5, "5 alert.fired on the log")
            await until(lambda: set(hook.attempts) - set(settled), "a try of an unaccepted alert")
            os.killpg(handle.proc.pid, signal.SIGKILL)  # the gateway and its stdio child, no goodbye
            await asyncio.to_thread(handle.proc.wait, 30)
            stop_process(handle)
            hook.fail_all = False
            handle2, base = await asyncio.to_thread(start_gateway_process, path, tmp_path / "gw2.log", env)
            async with sdk_client(base) as c:
                assert (await c.call_tool("get_chats", {})).is_error
            # one worker delivers in order: the alerts re-queued at start-up come before the new one
            await until(lambda: len(hook.accepted) == 6, "the 2 unaccepted alerts and the new one")
            ids = [d["alert_id"] for d in hook.accepted]
            assert len(set(ids)) == 6  # each alert accepted exactly once
            assert ids[:3] == settled and all(hook.attempts.count(a) == 1 for a in settled)
            fired = alert_events(cfg, "alert.fired")
            assert len(fired) == 6 and {e["alert_id"] for e in fired} == set(ids)  # none fired twice
            await until(lambda: len(alert_events(cfg, "alert.delivered")) == 6, "6 deliveries recorded")
        finally:
            stop_process(handle)
            stop_process(handle2)


async def _line(stream: asyncio.StreamReader, what: str, want: str | None = None) -> str:
    """The next line of ``stream`` (containing ``want``), within a bound."""

    async def read() -> str:
        while True:
            line = (await stream.readline()).decode()
            assert line, f"{what}: the stream ended"
            if want is None or want in line:
                return line

    try:
        return await asyncio.wait_for(read(), 60)
    except TimeoutError:
        raise AssertionError(f"no line from {what} within 60 s") from None


async def test_alerts_tail_and_calls_follow_show_new_events(
    tmp_path: Path, whatsapp_command: StdioCommand
) -> None:
    cfg = config(tmp_path, whatsapp_command, EVERY_REFUSAL)  # no sink: alert.fired on the log only
    async with serving(cfg, FakeClock()) as base:
        cli = [sys.executable, "-m", "ledgergate"]
        procs = []
        try:
            for argv in (
                ["alerts", "tail", "-c", str(cfg.source), "--format", "json"],
                [
                    "audit",
                    "calls",
                    "--follow",
                    "-c",
                    str(cfg.source),
                    "--tool",
                    "get_chats",
                    "--format",
                    "json",
                ],
                ["audit", "calls", "--follow", "-c", str(cfg.source), "--decision", "deny"],
            ):
                procs.append(
                    await asyncio.create_subprocess_exec(
                        *cli, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
                    )
                )
            for p in procs:  # the stream is open: every event appended from now on is shown
                assert p.stderr is not None
                await _line(p.stderr, "the live view", "following")
            async with sdk_client(base) as c:
                assert not (await c.call_tool("open_session", {})).is_error  # not get_chats: filtered
                assert (await c.call_tool("get_chats", {"limit": 3})).is_error
            tail, follow, table = (p.stdout for p in procs)
            assert tail is not None and follow is not None and table is not None
            call = orjson.loads(await _line(follow, "audit calls --follow"))
            assert (
                call["kind"] == "call.decided" and call["tool"] == "get_chats" and call["decision"] == "deny"
            )
            assert call["arguments"] == {"limit": 3} and call["agent"] == "agent-a"
            alert = orjson.loads(await _line(tail, "alerts tail"))
            assert alert["kind"] == "alert.fired" and alert["rule"] == "every-refusal"
            assert alert["examples"][0]["event_id"] == call["event_id"]
            row = await _line(table, "audit calls --follow (table)")
            assert "get_chats" in row and "agent-a" in row and "deny" in row and call["call_id"][-8:] in row
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
                await p.wait()

        # the SSE endpoint itself: the token, bad parameters, and a finite (follow=0) answer
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/admin/events?follow=1") as resp:
                assert resp.status == 401
            async with http.get(f"{base}/admin/events?kind=nope", headers=ADMIN_AUTH) as resp:
                assert resp.status == 400 and "kind" in (await resp.json())["message"]
            async with http.get(f"{base}/admin/events?follow=0&kind=alert", headers=ADMIN_AUTH) as resp:
                assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
                body = (await resp.read()).decode()
            frames = [f for f in body.split("\n\n") if f.strip()]
            assert len(frames) == 1 and "event: alert.fired" in frames[0] and frames[0].startswith("id: ")
            # Last-Event-ID resumes after that offset: nothing after the one alert
            last = frames[0].split("\n")[0][4:]
            headers = {**ADMIN_AUTH, "Last-Event-ID": last}
            async with http.get(f"{base}/admin/events?follow=0&kind=alert", headers=headers) as resp:
                assert resp.status == 200 and (await resp.read()).strip() == b""
