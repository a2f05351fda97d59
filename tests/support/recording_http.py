"""A Streamable HTTP MCP upstream (aiohttp, in the test's loop) that records every request it got.

Minimal but real HTTP: answers initialize (with an Mcp-Session-Id), tools/list, tools/call
(`slow` waits until the test releases it), notifications (202), DELETE (200) and GET (an SSE
stream of `stream_bytes` written as fast as the gateway takes them, with backpressure).
`got` holds (method, headers, body) of every request, in arrival order.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class RecordingUpstream:
    got: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    stream_bytes: int = 0  # GET: bytes of SSE events to send
    streamed: int = 0  # GET: bytes written so far
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends `slow` calls
    url: str = ""
    _runner: web.ServerRunner | None = None

    def methods(self) -> list[str]:
        """The JSON-RPC method (or the HTTP method for GET/DELETE/HEAD) of each request."""
        out = []
        for method, _, body in self.got:
            if method != "POST":
                out.append(method)
                continue
            try:
                out.append(orjson.loads(body).get("method", "response"))
            except (orjson.JSONDecodeError, AttributeError):
                out.append("invalid")
        return out

    async def handle(self, req: web.BaseRequest) -> web.StreamResponse:
        body = await req.read()
        self.got.append((req.method, dict(req.headers), body))
        if req.method == "DELETE":
            return web.Response(status=200)
        if req.method == "GET":
            return await self._stream(req)
        if req.method != "POST":
            return web.Response(status=405, headers={"Allow": "GET, POST, DELETE"})
        msg: dict[str, Any] = orjson.loads(body)
        if "id" not in msg or "method" not in msg:
            return web.Response(status=202)
        result: dict[str, Any]
        method = msg["method"]
        if method == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "recording-http", "version": "0"},
            }
        elif method == "tools/list":
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
        elif method == "tools/call":
            if msg["params"]["name"] == "slow":
                await self.release.wait()
            result = {"content": [{"type": "text", "text": "ok"}]}
        else:
            result = {}
        return web.Response(
            body=orjson.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}),
            content_type="application/json",
            headers={"Mcp-Session-Id": "up-session"},
        )

    async def _stream(self, req: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        event = b"event: message\ndata: " + b"x" * (64 * 1024 - 32) + b"\n\n"
        while self.streamed < self.stream_bytes:
            await resp.write(event)  # awaits drain: the gateway's reading paces this loop
            self.streamed += len(event)
        return resp

    async def start(self) -> RecordingUpstream:
        server = web.Server(self.handle, handler_cancellation=True)
        self._runner = web.ServerRunner(server)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/mcp"
        return self

    async def close(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
