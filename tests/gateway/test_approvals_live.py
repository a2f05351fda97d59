"""Held calls end to end: the official MCP SDK client -> gateway -> a real stdio upstream
(tests/support/recording_stdio.py records every line it reads), approvers acting with the
real CLI (`python -m ledgergate approvals ...`, a subprocess) or the admin API.

Policy: echo needs an approval (30 s), counter times out after 1 s, pid is remembered 1 h.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from eventlog.sqlite import SqliteEventLog
from gateway.app import POLICIES_KEY, build_app
from gateway.audit.writer import AuditAddon
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import recorded_calls, recording_stdio_server

KEYS = {"alice": "key-alice-0123456789"}
ADMIN = "admin-token-0123456789"
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "echo": {"action": "approve", "approval": {"timeout": "30s"}},
        "counter": {"action": "approve", "approval": {"timeout": "1s"}},
        "pid": {"action": "approve", "approval": {"timeout": "30s", "remember": "1h"}},
    },
}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def gw(tmp_path: Path):
    record = tmp_path / "record.log"
    cfg = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record)},
        policies={"rec": POLICY},
        grants=KEYS,
        gateway={"admin_token": ADMIN},
    )
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-test", flush_interval_s=0.001)

    def build(cfg: Any, clock: Any) -> Any:
        app = build_app(cfg, addons=[addon], clock=clock)
        addon.policies = app[POLICIES_KEY]
        return app

    try:
        async with running_gateway(cfg, KEYS, FakeClock(), build=build) as g:
            g.proxy.approval_progress_s = 0.2
            g.extra.update(record=record, log=log, addon=addon, config=cfg)
            yield g
    finally:
        await log.close()


async def wait_until(pred: Any) -> None:
    async with asyncio.timeout(60.0):
        while not pred():  # noqa: ASYNC110 - state of another task / process: polled
            await asyncio.sleep(0.01)


async def cli(gw: RunningGateway, *args: str) -> tuple[int, str, str]:
    """`python -m ledgergate ARGS -c CONFIG` as a real subprocess (never blocking the loop)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ledgergate",
        *args,
        "-c",
        str(gw.extra["config"]),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=str(ROOT),
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def events(gw: RunningGateway, kind: str) -> list[dict[str, Any]]:
    await gw.extra["addon"].close()  # flush what is queued
    log: SqliteEventLog = gw.extra["log"]
    out = [orjson.loads(r.payload) for r in await log.read(0, 100_000)]
    return [e for e in out if e["kind"] == kind]


async def test_held_call_is_approved_from_the_cli_and_answered_by_the_upstream(gw: RunningGateway) -> None:
    progress: list[tuple[float, str | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, message))

    async with gw.client("rec", "alice") as c:
        call = asyncio.create_task(c.call_tool("echo", {"text": "hello"}, progress_callback=on_progress))
        await wait_until(lambda: gw.proxy.approvals.pending())
        (req,) = gw.proxy.approvals.pending()
        assert (req.tool, req.grant, req.arguments) == ("echo", "alice", {"text": "hello"})
        # held: nothing reached the upstream yet; the client hears why it waits
        await wait_until(lambda: len(progress) >= 2)
        assert not call.done()
        assert recorded_calls(gw.extra["record"]) == []
        assert progress[0][1] is not None and f"waiting for approval {req.id}" in progress[0][1]
        assert [p for p, _ in progress[:2]] == [1, 2]
        code, out, err = await cli(gw, "approvals", "list", "--format", "json")
        assert code == 0, err
        listed = orjson.loads(out)
        assert [(p["id"], p["tool"], p["arguments"]) for p in listed] == [(req.id, "echo", {"text": "hello"})]
        code, out, err = await cli(gw, "approvals", "approve", req.id, "--comment", "fine", "--by", "carol")
        assert code == 0, err
        assert f"approval {req.id} approved by carol" in out
        result = await call
    assert not result.is_error
    assert result.content[0].text == "hello"
    calls = recorded_calls(gw.extra["record"])
    assert [(m["params"]["name"], m["params"]["arguments"]) for m in calls] == [("echo", {"text": "hello"})]
    (requested,) = await events(gw, "approval.requested")
    (resolved,) = await events(gw, "approval.resolved")
    assert requested["approval_id"] == resolved["approval_id"] == req.id
    assert (resolved["outcome"], resolved["by"], resolved["comment"]) == ("approved", "carol", "fine")
    decided = [e for e in await events(gw, "call.decided") if e["tool"] == "echo"]
    assert [(e["decision"], e["rule"], e["call_id"]) for e in decided] == [
        ("allow", "/tools/echo/action", requested["call_id"])
    ]
    assert decided[0]["risk_class"] is not None


async def test_denied_call_gets_the_comment_and_never_reaches_the_upstream(gw: RunningGateway) -> None:
    async with gw.client("rec", "alice") as c:
        call = asyncio.create_task(c.call_tool("echo", {"text": "rm -rf"}))
        await wait_until(lambda: gw.proxy.approvals.pending())
        (req,) = gw.proxy.approvals.pending()
        code, out, err = await cli(gw, "approvals", "deny", req.id, "--comment", "not on a friday")
        assert f"approval {req.id} denied" in out
        assert code == 0, err
        result = await call
        # a second answer to the same id: it says how it ended
        code, _, err = await cli(gw, "approvals", "approve", req.id)
        assert code == 1 and "already denied" in err
    assert result.is_error
    text = result.content[0].text
    assert "not on a friday" in text and f"approval {req.id} denied by" in text
    assert text.endswith("[rule /tools/echo/action]")
    assert result.structured_content["decision"] == "deny"
    assert recorded_calls(gw.extra["record"]) == []
    (resolved,) = await events(gw, "approval.resolved")
    assert resolved["outcome"] == "denied" and resolved["comment"] == "not on a friday"
    assert resolved["by"]  # the OS user, by default


async def test_unanswered_call_times_out(gw: RunningGateway) -> None:
    async with gw.client("rec", "alice") as c:
        result = await c.call_tool("counter", {"n": 1})
    assert result.is_error
    assert "timed out after 1 s" in result.content[0].text
    assert recorded_calls(gw.extra["record"]) == []
    assert gw.proxy.approvals.pending() == []
    (resolved,) = await events(gw, "approval.resolved")
    assert resolved["outcome"] == "timed_out" and resolved["by"] is None


async def test_remember_lets_the_same_call_through_for_an_hour(gw: RunningGateway) -> None:
    async def approve_over_http(rid: str) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"}) as http,
            http.post(f"{gw.base}/admin/approvals/{rid}", json={"decision": "approve", "by": "ops"}) as r,
        ):
            assert r.status == 200
            return await r.json()

    async with gw.client("rec", "alice") as c:
        first = asyncio.create_task(c.call_tool("pid", {}))
        await wait_until(lambda: gw.proxy.approvals.pending())
        (req,) = gw.proxy.approvals.pending()
        doc = await approve_over_http(req.id)
        assert doc["resolution"]["remembered_until"] == pytest.approx(gw.clock() + 3600)
        assert not (await first).is_error
        # the same grant, tool and arguments: allowed at once, nobody asked
        second = await c.call_tool("pid", {})
        assert not second.is_error
        assert gw.proxy.approvals.pending() == []
        # an hour later it asks again
        gw.clock.advance(3601)
        third = asyncio.create_task(c.call_tool("pid", {}))
        await wait_until(lambda: gw.proxy.approvals.pending())
        (again,) = gw.proxy.approvals.pending()
        assert again.id != req.id
        gw.proxy.approvals.deny(again.id, "test", "enough")
        assert (await third).is_error
    assert len(recorded_calls(gw.extra["record"])) == 2
    decided = [e for e in await events(gw, "call.decided") if e["tool"] == "pid"]
    assert [e["reason"] for e in decided][1] == "approval remembered"


async def test_client_hang_up_cancels_the_request(gw: RunningGateway) -> None:
    async with gw.client("rec", "alice") as c:
        call = asyncio.create_task(c.call_tool("echo", {"text": "bye"}))
        await wait_until(lambda: gw.proxy.approvals.pending())
        (req,) = gw.proxy.approvals.pending()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    # the SDK client closed its HTTP connection: the gateway's handler is cancelled
    await wait_until(lambda: gw.proxy.approvals.state.resolution(req.id) is not None)
    assert gw.proxy.approvals.state.resolution(req.id).outcome == "cancelled"
    assert recorded_calls(gw.extra["record"]) == []


async def test_admin_api_needs_the_token_and_names_unknown_ids(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.base}/admin/approvals") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {ADMIN}"}
        async with http.post(
            f"{gw.base}/admin/approvals/nope", json={"decision": "approve"}, headers=headers
        ) as r:
            assert r.status == 404 and (await r.json())["error"] == "not_found"
        async with http.post(
            f"{gw.base}/admin/approvals/nope", json={"decision": "maybe"}, headers=headers
        ) as r:
            assert r.status == 400


def test_alerts_announce_pending_approvals() -> None:
    """`on = "approval_pending"` rules fire on approval.requested events (as the gateway writes them)."""
    from consumers.alerts import RuleEngine
    from schemas import events as E
    from schemas.alerts import AlertRule

    ev = E.approval_requested(
        gateway="g",
        approval_id="ab12cd34",
        call_id="c1",
        server="rec",
        tool="echo",
        grant="alice",
        agent="agent-a",
        session=None,
        arguments={"text": "x"},
        args_sha256="0" * 64,
        rule="/tools/echo/action",
        timeout_s=300.0,
        expires_ts=1,
        remember_s=0,
    )
    eng = RuleEngine([AlertRule(name="ask", on="approval_pending")])
    refusal = {**ev, "kind": "call.decided", "decision": "deny"}
    assert eng.feed(orjson.loads(orjson.dumps(refusal)), 0) == []
    (alert,) = eng.feed(orjson.loads(orjson.dumps(ev)), 1)
    assert alert.doc["on"] == "approval_pending"
    assert "ledgergate approvals approve ab12cd34" in alert.doc["text"]
    assert "agent-a waits for approval ab12cd34 to call echo on rec" in alert.doc["text"]


async def test_upstream_schema_and_risk_from_tools_list(tmp_path: Path, whatsapp_command: Any) -> None:
    """validate_upstream_schema = true: once the gateway saw the upstream's tools/list, a call
    breaking its inputSchema is refused by the gateway (rule upstream:...)."""
    cfg = write_config(
        tmp_path,
        servers={
            "whatsapp": {
                "command": whatsapp_command.argv,
                "env": whatsapp_command.env,
                "validate_upstream_schema": True,
            }
        },
        policies={"whatsapp": {"version": "1", "default": "allow"}},
        grants=KEYS,
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g, g.client("whatsapp", "alice") as c:
        tools = await c.list_tools()
        assert "send_message" in [t.name for t in tools.tools]
        assert g.proxy.schemas.risk("whatsapp", "get_chats").cls == "read"
        r = await c.call_tool("send_message", {"content": 5})
    assert r.is_error
    assert r.structured_content["decision"] == "invalid_arguments"
    assert r.structured_content["rule"] == "upstream:/tools/send_message/inputSchema"
