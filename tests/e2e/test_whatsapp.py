"""End to end: the official MCP SDK client -> gateway -> whatsapp-mcp-server over stdio.

The canonical scenario of the product: the seed policy allows 10 open_session calls a
minute per grant and denies every other tool.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.support.gateway import SEED_POLICY, FakeClock, RunningGateway, running_gateway, write_config
from tests.support.upstreams import StdioCommand

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789"}
OTHER_TOOLS = {
    "send_message": {"phone_number": "+100", "content": "hello"},
    "get_chats": {},
    "create_group": {"group_name": "g", "participants": ["+100"]},
    "get_group_participants": {"group_id": "x"},
}


@pytest.fixture
async def gw(tmp_path: Path, whatsapp_command: StdioCommand):
    cfg = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=KEYS,
        agents={"alice": "agent-a", "bob": "agent-b"},
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g:
        yield g


def text(result) -> str:
    return result.content[0].text


async def test_seed_scenario_ten_reach_upstream_two_refused(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        results = [await c.call_tool("open_session", {}) for _ in range(12)]
    allowed, refused = results[:10], results[10:]
    # the upstream's own answers: one real session, then its own "already exists"
    assert text(allowed[0]) == "Success: Session created successfully"
    assert all(text(r) == "Error: Session already exists" for r in allowed[1:])
    assert not any(r.is_error for r in allowed)
    for r in refused:
        assert r.is_error
        assert text(r).startswith(
            "Refused by policy: rate limit open_session_rate (10 per minute) reached; retry in"
        )
        assert text(r).endswith("[rule /tools/open_session/limits/0]")
        sc = r.structured_content
        assert sc["rule"] == "/tools/open_session/limits/0"
        assert sc["decision"] == "rate_limited"
        assert sc["counter"] == {
            "name": "open_session_rate",
            "scope": "grant",
            "key": "alice",
            "count": 10,
            "max": 10,
            "window_s": 60,
        }
        # the fake clock stands 1 s into the minute
        assert sc["retry_after_s"] == pytest.approx(59.0)


async def test_next_window_allows_again(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        for _ in range(10):
            assert not (await c.call_tool("open_session", {})).is_error
        assert (await c.call_tool("open_session", {})).is_error
        gw.clock.advance(58.5)  # still the same minute
        r = await c.call_tool("open_session", {})
        assert r.is_error and r.structured_content["retry_after_s"] == pytest.approx(0.5)
        gw.clock.advance(1.0)  # next minute
        r = await c.call_tool("open_session", {})
        assert not r.is_error and text(r) == "Error: Session already exists"


async def test_default_deny_of_the_other_tools(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        for tool, args in OTHER_TOOLS.items():
            r = await c.call_tool(tool, args)
            assert r.is_error, tool
            assert (
                text(r)
                == f"Refused by policy: tool {tool} is not allowed by policy (default deny) [rule /default]"
            )
            assert r.structured_content["rule"] == "/default"
            assert r.structured_content["decision"] == "deny"
            assert r.structured_content["retry_after_s"] is None
        # nothing reached the upstream: its first open_session still creates the session
        assert text(await c.call_tool("open_session", {})) == "Success: Session created successfully"


async def test_tools_list_drops_tools_the_grant_can_never_call(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        tools = await c.list_tools()
    assert [t.name for t in tools.tools] == ["open_session"]


async def test_two_grants_separate_counters_and_processes(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as a, gw.client("whatsapp", "bob") as b:
        for _ in range(10):
            assert not (await a.call_tool("open_session", {})).is_error
        assert (await a.call_tool("open_session", {})).is_error
        # bob's counter is his own, and his upstream process is his own: a fresh WhatsApp session
        rb = await b.call_tool("open_session", {})
        assert not rb.is_error
        assert text(rb) == "Success: Session created successfully"
        procs = gw.proxy.upstreams["whatsapp"].processes
        assert set(procs) == {"alice", "bob"}
        assert procs["alice"].proc.pid != procs["bob"].proc.pid


async def test_sessions_of_one_grant_share_its_process_and_counter(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as a1:
        for _ in range(6):
            assert not (await a1.call_tool("open_session", {})).is_error
    async with gw.client("whatsapp", "alice") as a2:
        results = [await a2.call_tool("open_session", {}) for _ in range(5)]
    assert [r.is_error for r in results] == [False, False, False, False, True]
    assert text(results[0]) == "Error: Session already exists"


async def test_crashed_stdio_upstream_is_restarted(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        assert text(await c.call_tool("open_session", {})) == "Success: Session created successfully"
        proc = gw.proxy.upstreams["whatsapp"].processes["alice"]
        first_pid = proc.proc.pid
        proc.proc.kill()
        await proc.proc.wait()
        # the next call restarts the child (handshake replayed): a fresh WhatsApp session
        r = await c.call_tool("open_session", {})
        assert not r.is_error
        assert text(r) == "Success: Session created successfully"
        assert proc.proc.pid != first_pid


async def test_sdk_auto_mode_probe_falls_back_to_initialize(gw: RunningGateway) -> None:
    # mcp 2.x probes server/discover at 2026-07-28 first; the gateway answers -32022 with the
    # versions it serves and the client falls back to the initialize handshake
    async with gw.client("whatsapp", "alice", mode="auto") as c:
        assert c.protocol_version == "2025-11-25" or c.protocol_version.startswith("2025-")
        assert text(await c.call_tool("open_session", {})) == "Success: Session created successfully"


async def test_policy_hot_reload_and_a_broken_file_keeps_the_old_policy(gw: RunningGateway) -> None:
    path = gw.config.policy_path("whatsapp")
    allow_chats = {**SEED_POLICY, "tools": {**SEED_POLICY["tools"], "get_chats": {}}}
    async with gw.client("whatsapp", "alice") as c:
        assert (await c.call_tool("get_chats", {})).is_error
        path.write_text(json.dumps(allow_chats))
        assert gw.proxy.policies.reload() == {"whatsapp": None}
        r = await c.call_tool("get_chats", {})
        assert not r.is_error  # forwarded now: the upstream's own answer
        assert not r.content[0].text.startswith("Refused by policy")
        path.write_text('{"version": "1", "tools": {"get_chats": {"action": "maybe"}}}')
        errors = gw.proxy.policies.reload()
        assert errors["whatsapp"].startswith(f"{path}: /tools/get_chats/action:")
        assert not (await c.call_tool("get_chats", {})).is_error  # the previous policy stays in force
        path.write_text("{not json")
        assert "line 1" in gw.proxy.policies.reload()["whatsapp"]
        assert [t.name for t in (await c.list_tools()).tools] == ["open_session", "get_chats"]


async def test_stdio_children_are_stopped_on_shutdown(tmp_path: Path, whatsapp_command: StdioCommand) -> None:
    cfg = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=KEYS,
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g:
        async with g.client("whatsapp", "alice") as a, g.client("whatsapp", "bob") as b:
            await a.call_tool("open_session", {})
            await b.call_tool("open_session", {})
        children = [p.proc for p in g.proxy.upstreams["whatsapp"].processes.values()]
        assert len(children) == 2 and all(p.returncode is None for p in children)
    assert all(p.returncode is not None for p in children)


async def test_get_stream_and_delete_on_a_stdio_session(gw: RunningGateway) -> None:
    import aiohttp

    hdrs = {"Authorization": f"Bearer {KEYS['alice']}", "Accept": "application/json, text/event-stream"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(gw.url("whatsapp"), json=init, headers=hdrs) as r:
            assert r.status == 200
            sid = r.headers["Mcp-Session-Id"]
            assert (await r.json(content_type=None))["result"]["serverInfo"]
        hdrs["Mcp-Session-Id"] = sid
        async with http.get(gw.url("whatsapp"), headers={**hdrs, "Accept": "text/event-stream"}) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            async with http.get(
                gw.url("whatsapp"), headers={**hdrs, "Accept": "text/event-stream"}
            ) as second:
                assert second.status == 409
            async with http.delete(gw.url("whatsapp"), headers=hdrs) as d:
                assert d.status == 200
            assert (
                await asyncio.wait_for(stream.content.read(), 10) == b""
            )  # the stream ends with the session
        async with http.post(
            gw.url("whatsapp"), json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, headers=hdrs
        ) as r:
            assert r.status == 404
