"""Helpers of the hostile-input tests: exact bytes over a raw socket, the recording upstreams.

`raw_post` writes the request bytes exactly as given (any header byte, any body byte) and
reads the answer to the end of the connection, so nothing in between normalises them.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.support.gateway import RunningGateway

RECORDING_STDIO = Path(__file__).with_name("recording_stdio.py")


def recording_stdio_server(record: Path) -> dict[str, Any]:
    """A [servers.NAME] entry for tests/support/recording_stdio.py recording into `record`."""
    return {"command": [sys.executable, str(RECORDING_STDIO)], "env": {"RECORD_FILE": str(record)}}


def recorded(record: Path) -> list[bytes]:
    """Every line the stdio child read, as it read it."""
    return record.read_bytes().splitlines() if record.exists() else []


def recorded_calls(record: Path) -> list[dict[str, Any]]:
    """The tools/call requests the child read (each line is parsed on its own, as the child did)."""
    out = []
    for line in recorded(record):
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(msg, dict) and msg.get("method") == "tools/call":
            out.append(msg)
    return out


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        n = int(size_line.split(b";")[0], 16)
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return out


async def raw_request(gw: RunningGateway, head: bytes, body: bytes = b"") -> RawAnswer:
    """Send `head` (request line and headers, no final CRLF) and `body` exactly; read the answer."""
    host, port = gw.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    lines = head_bytes.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        headers[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
    if headers.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    return RawAnswer(status, headers, rest)


def mcp_head(
    gw: RunningGateway, server: str, key: str, session: str | None = None, extra: bytes = b""
) -> bytes:
    h = (
        b"POST /mcp/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
        b"Content-Type: application/json\r\nAccept: application/json, text/event-stream"
        % (server.encode(), key.encode())
    )
    if session is not None:
        h += b"\r\nMcp-Session-Id: " + session.encode()
    return h + extra


async def raw_post(
    gw: RunningGateway, server: str, key: str, body: bytes, session: str | None = None, extra: bytes = b""
) -> RawAnswer:
    return await raw_request(gw, mcp_head(gw, server, key, session, extra), body)


INIT = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
)


async def open_session(gw: RunningGateway, server: str, key: str) -> str:
    """initialize + notifications/initialized over raw HTTP; the session id (once the child read all)."""
    a = await raw_post(gw, server, key, INIT)
    assert a.status == 200, a
    sid = a.headers["mcp-session-id"]
    b = await raw_post(gw, server, key, b'{"jsonrpc":"2.0","method":"notifications/initialized"}', sid)
    assert b.status == 202, b
    await sync_point(gw, server, key, sid)
    return sid


def sse_messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of an SSE body (or of a JSON body)."""
    if body.lstrip().startswith(b"{"):
        return [orjson.loads(body)]
    out = []
    for ev in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(ln[5:].lstrip() for ln in ev.split(b"\n") if ln.startswith(b"data:"))
        if data:
            out.append(orjson.loads(data))
    return out


async def call(
    gw: RunningGateway, server: str, key: str, session: str, tool: str, args: dict[str, Any], rid: int = 1
) -> dict[str, Any]:
    """One tools/call over raw HTTP: its final JSON-RPC response."""
    body = orjson.dumps(
        {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool, "arguments": args}}
    )
    a = await raw_post(gw, server, key, body, session)
    assert a.status == 200, a
    return [m for m in sse_messages(a.body) if m.get("id") == rid][-1]


async def sync_point(gw: RunningGateway, server: str, key: str, session: str) -> None:
    """A ping through the gateway: once answered, the stdio child has read every earlier line.

    A tool still flooding notifications after its answer has them routed to the newest call on
    its grant: this ping. Its stream may then overflow and be cut before the answer; ask again
    (bounded) until a ping is answered."""
    for _ in range(50):
        a = await raw_post(gw, server, key, b'{"jsonrpc":"2.0","id":"sync","method":"ping"}', session)
        assert a.status == 200, a
        msgs = sse_messages(a.body)
        if msgs and msgs[-1].get("result") == {}:
            return
    raise AssertionError(f"no ping was answered through the flood: {a.body[-300:]!r}")


@dataclass
class RecordingHttp:
    """A real aiohttp MCP-ish upstream that records every request it gets (method, headers, body)."""

    url: str = ""
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def handler(self, req: web.Request) -> web.StreamResponse:
        body = await req.read()
        self.seen.append((req.method, dict(req.headers), body))
        if req.method != "POST":
            return web.Response(status=405)
        msg = orjson.loads(body)
        if "id" not in msg or "method" not in msg:
            return web.Response(status=202)
        if msg["method"] == "initialize":
            res: Any = {
                "protocolVersion": msg["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "recording-http", "version": "1"},
            }
        elif msg["method"] == "tools/call":
            res = {"content": [{"type": "text", "text": "ran " + msg["params"]["name"]}]}
        else:
            res = {}
        return web.json_response(
            {"jsonrpc": "2.0", "id": msg["id"], "result": res}, headers={"Mcp-Session-Id": "up-1"}
        )

    def posted(self) -> list[dict[str, Any]]:
        return [orjson.loads(b) for m, _, b in self.seen if m == "POST"]

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/mcp", self.handler)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/mcp"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
