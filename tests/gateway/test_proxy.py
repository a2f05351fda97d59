"""Proxy on its own: built by hand (no config, no audit log) over real upstreams (a stdio
child and a recording HTTP upstream), served by the real edge server, with an addon that
records every flow. Proves the proxy alone answers the agent, records outcomes, maps
session ids, counts active calls and ends sessions by one path."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession

from gateway.audit.hooks import Addon, AddonChain
from gateway.auth import Authenticator, Grant
from gateway.edge import App, HttpServer
from gateway.mcp.flow import CallFlow
from gateway.mcp.sessions import Session
from gateway.policy.live import PolicySet
from gateway.proxy import Proxy
from gateway.upstreams.http import HttpUpstream
from gateway.upstreams.stdio import StdioUpstream
from tests.support.clickhouse import free_port
from tests.support.hostile import RECORDING_STDIO, RecordingHttp, recorded_calls, sse_messages

KEY = "key-proxy-unit-0123456789"
POLICY = {"version": "1", "default": "deny", "tools": {"echo": {}, "flood": {}}}
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}


@dataclass
class Recorder(Addon):
    flows: list[CallFlow] = field(default_factory=list)
    closed: list[tuple[str, str]] = field(default_factory=list)

    def completed(self, flow: CallFlow) -> None:
        self.flows.append(flow)

    def session_closed(self, session: Session, reason: str) -> None:
        self.closed.append((session.id, reason))


@dataclass
class Rig:
    proxy: Proxy
    base: str
    http: ClientSession
    addon: Recorder
    record: Path

    async def post(self, server: str, msg: dict[str, Any], sid: str | None = None, **h: str) -> Any:
        headers = {
            "Authorization": f"Bearer {KEY}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            **h,
        }
        if sid:
            headers["Mcp-Session-Id"] = sid
        async with self.http.post(f"{self.base}/mcp/{server}", data=orjson.dumps(msg), headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    async def open(self, server: str) -> str:
        status, headers, _ = await self.post(server, INIT)
        assert status == 200, status
        sid = headers["Mcp-Session-Id"]
        await self.post(server, {"jsonrpc": "2.0", "method": "notifications/initialized"}, sid)
        return sid


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    record = tmp_path / "record"
    policy = tmp_path / "policy.json"
    policy.write_bytes(orjson.dumps(POLICY))
    rh = RecordingHttp()
    await rh.start(free_port())
    addon = Recorder()
    chain = AddonChain([addon])
    policies = PolicySet({"rec": policy, "rh": policy}, chain)
    policies.load_all()
    proxy = Proxy(
        auth=Authenticator([Grant("qa", "agent-qa", hashlib.sha256(KEY.encode()).digest())]),
        policies=policies,
        upstreams={
            "rec": StdioUpstream(
                "rec", [sys.executable, str(RECORDING_STDIO)], {"RECORD_FILE": str(record)}, None, 30
            ),
            "rh": HttpUpstream("rh", rh.url, 10.0),
        },
        addons=chain,
        max_body_bytes=1 << 20,
        session_idle_timeout_s=60.0,
    )
    app = App()
    for method in ("post", "get", "delete", "head"):
        getattr(app, f"add_{method}")("/mcp/{server}", getattr(proxy, method))
    try:
        async with HttpServer(app, "127.0.0.1", 0) as server, ClientSession() as http:
            yield Rig(proxy, f"http://127.0.0.1:{server.port}", http, addon, record)
    finally:
        proxy.close_all()
        for up in proxy.upstreams.values():
            await up.close()
        await rh.stop()


@pytest.mark.parametrize("server", ["rec", "rh"])
async def test_tools_list_is_filtered_and_the_gateway_session_id_is_answered(rig: Rig, server: str) -> None:
    sid = await rig.open(server)
    session = rig.proxy.sessions.get(sid)
    assert session is not None
    if server == "rh":
        assert session.upstream_session == "up-1" and sid != "up-1"  # mapped, never leaked
    status, headers, body = await rig.post(server, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, sid)
    assert status == 200 and headers["Mcp-Session-Id"] == sid
    if server == "rec":
        names = [t["name"] for t in orjson.loads(body)["result"]["tools"]]
        assert names == ["echo", "flood"]  # the tools this grant can never call are dropped
    assert rig.addon.flows[-1].outcome == "ok" and rig.addon.flows[-1].sent
    assert session.active == 0


async def test_a_denied_call_is_answered_by_the_proxy_and_never_forwarded(rig: Rig) -> None:
    sid = await rig.open("rec")
    msg = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_everything"}}
    status, _, body = await rig.post("rec", msg, sid)
    answer = orjson.loads(body)
    assert status == 200 and answer["result"]["isError"] is True
    assert answer["result"]["structuredContent"]["decision"] == "deny"
    assert rig.addon.flows[-1].outcome == "refused" and not rig.addon.flows[-1].sent
    assert recorded_calls(rig.record) == []


async def test_a_streamed_call_is_relayed_as_sse_and_its_outcome_recorded(rig: Rig) -> None:
    sid = await rig.open("rec")
    msg = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "flood", "arguments": {"count": 4}},
    }
    status, headers, body = await rig.post("rec", msg, sid)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    msgs = sse_messages(body)
    assert [m.get("method") for m in msgs] == ["notifications/message"] * 4 + [None]
    assert msgs[-1]["id"] == 3 and msgs[-1]["result"]["content"][0]["text"] == "flooded"
    flow = rig.addon.flows[-1]
    assert flow.outcome == "ok" and flow.response_bytes > 0
    assert rig.proxy.sessions.get(sid).active == 0  # type: ignore[union-attr]


async def test_head_is_answered_locally(rig: Rig) -> None:
    async with rig.http.head(f"{rig.base}/mcp/rh", headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status == 405 and r.headers["Allow"] == "GET, POST, DELETE"


@pytest.mark.parametrize("server", ["rec", "rh"])
async def test_delete_and_expiry_end_sessions_by_one_path(rig: Rig, server: str) -> None:
    deleted, idle = await rig.open(server), await rig.open(server)
    async with rig.http.delete(
        f"{rig.base}/mcp/{server}", headers={"Authorization": f"Bearer {KEY}", "Mcp-Session-Id": deleted}
    ) as r:
        # the stdio transport ends it locally; the recording HTTP upstream refuses DELETE (405):
        # then the session stays open, as the upstream still has it
        assert r.status == (200 if server == "rec" else 405)
    rig.proxy.sessions.idle_timeout_s = 0.0
    rig.proxy.expire_idle()
    first = "deleted" if server == "rec" else "expired"
    expected = [(deleted, first), (idle, "expired")]
    assert sorted(rig.addon.closed) == sorted(expected)
    assert len(rig.proxy.sessions) == 0 and rig.proxy.sessions.count("qa") == 0
    status, _, body = await rig.post(server, {"jsonrpc": "2.0", "id": 9, "method": "ping"}, idle)
    assert status == 404 and "unknown or expired session" in orjson.loads(body)["error"]["message"]
