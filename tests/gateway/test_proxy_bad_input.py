"""Bad input gets a clear error and the gateway keeps serving: raw HTTP against the real gateway."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.procs import free_port

KEY = "key-qa-0123456789"
KEYS = {"qa": KEY}
ALLOW_ALL = {"version": "1", "default": "allow"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}
ACCEPT = "application/json, text/event-stream"
# a stdio server that reads its first line and exits: crashes while handling that request
CRASHER = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
# a stdio server that reads and never answers
SILENT = [sys.executable, "-c", "import sys\nfor _ in sys.stdin: pass"]


@pytest.fixture
async def gw(tmp_path: Path, everything_server: str):
    servers = {
        "everything": {"url": everything_server},
        "down": {"url": f"http://127.0.0.1:{free_port()}/mcp"},
        "crasher": {"command": CRASHER},
        "silent": {"command": SILENT},
    }
    cfg = write_config(
        tmp_path,
        servers=servers,
        policies=dict.fromkeys(servers, ALLOW_ALL),
        grants=KEYS,
        gateway={"max_body_bytes": 4096, "upstream_timeout_s": 1.0},
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g, aiohttp.ClientSession() as http:
        g.extra["http"] = http
        yield g


def headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "Accept": ACCEPT, "Content-Type": "application/json", **extra}


async def post(
    gw: RunningGateway,
    server: str = "everything",
    *,
    data: bytes | None = None,
    json=None,
    hdrs: dict[str, str] | None = None,
) -> tuple[int, dict, dict]:
    http: aiohttp.ClientSession = gw.extra["http"]
    async with http.post(
        gw.url(server), data=data, json=json, headers=headers() if hdrs is None else hdrs
    ) as r:
        body = await r.json(content_type=None) if r.content_type == "application/json" else {}
        return r.status, body, dict(r.headers)


async def initialize(gw: RunningGateway, server: str = "everything") -> str:
    http: aiohttp.ClientSession = gw.extra["http"]
    async with http.post(gw.url(server), json=INIT, headers=headers()) as r:
        assert r.status == 200
        await r.read()
        return r.headers["Mcp-Session-Id"]


async def assert_still_serving(gw: RunningGateway) -> None:
    sid = await initialize(gw)
    http: aiohttp.ClientSession = gw.extra["http"]
    ping = {"jsonrpc": "2.0", "id": 9, "method": "ping"}
    async with http.post(gw.url("everything"), json=ping, headers=headers(**{"Mcp-Session-Id": sid})) as r:
        assert r.status == 200
        # the upstream answers with an SSE stream: the ping's result is in it
        assert '"result":{}' in (await r.text()).replace(" ", "")


async def test_malformed_json_is_a_parse_error(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, data=b'{"jsonrpc": "2.0", "id": 1, "method": ')
    assert status == 400
    assert body["error"]["code"] == -32700
    await assert_still_serving(gw)


@pytest.mark.parametrize(
    "payload",
    [
        b'"hello"',
        b"42",
        b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}',
        b'{"jsonrpc": "2.0", "id": 1}',
        b'{"jsonrpc": "2.0", "id": true, "method": "x"}',
    ],
)
async def test_not_a_jsonrpc_object_is_invalid_request(gw: RunningGateway, payload: bytes) -> None:
    status, body, _ = await post(gw, data=payload)
    assert status == 400
    assert body["error"]["code"] == -32600


async def test_batch_is_refused_with_the_reason(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, data=b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]')
    assert status == 400
    assert body["error"]["code"] == -32600
    assert "batching is not supported" in body["error"]["message"]


async def test_oversized_body_is_413(gw: RunningGateway) -> None:
    big = {"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "x" * 5000}}
    status, body, _ = await post(gw, json=big)
    assert status == 413
    assert "max_body_bytes (4096)" in body["error"]["message"]
    await assert_still_serving(gw)


@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic a2V5", "Bearer "])
async def test_missing_or_wrong_key_is_401(gw: RunningGateway, auth: str | None) -> None:
    hdrs = headers()
    del hdrs["Authorization"]
    if auth is not None:
        hdrs["Authorization"] = auth
    status, body, h = await post(gw, json=INIT, hdrs=hdrs)
    assert status == 401
    assert h["WWW-Authenticate"].startswith('Bearer realm="ledgergate"')
    assert body["error"]["message"].startswith("Unauthorized")


async def test_unknown_server_is_404(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, "nope", json=INIT)
    assert status == 404
    assert "no MCP server named 'nope'" in body["error"]["message"]


async def test_missing_session_is_400_and_unknown_session_is_404(gw: RunningGateway) -> None:
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    status, body, _ = await post(gw, json=ping)
    assert status == 400 and "Mcp-Session-Id" in body["error"]["message"]
    status, body, _ = await post(gw, json=ping, hdrs=headers(**{"Mcp-Session-Id": "no-such-session"}))
    assert status == 404 and "unknown or expired session" in body["error"]["message"]


async def test_expired_session_is_404(gw: RunningGateway) -> None:
    sid = await initialize(gw)
    gw.proxy.sessions.idle_timeout_s = 0.0
    gw.proxy.expire_idle()
    status, body, _ = await post(
        gw, json={"jsonrpc": "2.0", "id": 2, "method": "ping"}, hdrs=headers(**{"Mcp-Session-Id": sid})
    )
    assert status == 404
    assert "unknown or expired session" in body["error"]["message"]


async def test_session_of_another_grant_or_server_is_404(gw: RunningGateway) -> None:
    sid = await initialize(gw)
    status, _, _ = await post(
        gw,
        "silent",
        json={"jsonrpc": "2.0", "id": 2, "method": "ping"},
        hdrs=headers(**{"Mcp-Session-Id": sid}),
    )
    assert status == 404


async def test_invalid_protocol_version_is_400(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, json=INIT, hdrs=headers(**{"MCP-Protocol-Version": "1999-01-01"}))
    assert status == 400
    assert body["error"]["code"] == -32022
    assert "2025-11-25" in body["error"]["data"]["supported"]


async def test_foreign_origin_is_403(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, json=INIT, hdrs=headers(Origin="http://evil.example.com"))
    assert status == 403
    assert "DNS rebinding" in body["error"]["message"]
    status, _, _ = await post(gw, json=INIT, hdrs=headers(Host="evil.example.com"))
    assert status == 403
    status, _, _ = await post(gw, json=INIT, hdrs=headers(Origin="http://localhost:5173"))
    assert status == 200


async def test_upstream_down_is_a_jsonrpc_error_naming_it(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, "down", json=INIT)
    assert status == 200
    assert body["id"] == 1
    assert body["error"]["code"] == -32000
    assert "upstream 'down' unreachable" in body["error"]["message"]
    await assert_still_serving(gw)


async def test_crashed_stdio_upstream_is_a_jsonrpc_error_naming_it(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, "crasher", json=INIT)
    assert status == 200
    assert body["error"]["code"] == -32000
    assert "upstream 'crasher' (stdio, grant 'qa') exited with code 3" in body["error"]["message"]
    await assert_still_serving(gw)


async def test_upstream_timeout_is_a_jsonrpc_error_naming_it(gw: RunningGateway) -> None:
    status, body, _ = await post(gw, "silent", json=INIT)
    assert status == 200
    assert body["error"]["code"] == -32001
    assert "upstream 'silent' (stdio, grant 'qa') did not answer within 1 s" in body["error"]["message"]
    await assert_still_serving(gw)


async def test_notification_is_202_and_delete_ends_the_session(gw: RunningGateway) -> None:
    sid = await initialize(gw)
    http: aiohttp.ClientSession = gw.extra["http"]
    note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    async with http.post(gw.url("everything"), json=note, headers=headers(**{"Mcp-Session-Id": sid})) as r:
        assert r.status == 202
    async with http.delete(gw.url("everything"), headers=headers(**{"Mcp-Session-Id": sid})) as r:
        assert r.status in (200, 204)
    status, _, _ = await post(
        gw, json={"jsonrpc": "2.0", "id": 3, "method": "ping"}, hdrs=headers(**{"Mcp-Session-Id": sid})
    )
    assert status == 404


async def test_tools_call_without_a_name_is_invalid_params(gw: RunningGateway) -> None:
    sid = await initialize(gw)
    status, body, _ = await post(
        gw,
        json={"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {}},
        hdrs=headers(**{"Mcp-Session-Id": sid}),
    )
    assert status == 200
    assert body["error"]["code"] == -32602
