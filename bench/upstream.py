"""A minimal, fast MCP server for the benchmark (Streamable HTTP, or stdio).

    python bench/upstream.py --port 9100 [--sse]     # http://127.0.0.1:9100/mcp
    python bench/upstream.py --stdio                 # newline-delimited JSON-RPC on stdin/stdout

HTTP/1.1 on a raw asyncio Protocol (uvloop when installed) with keep-alive: a few
microseconds of CPU per call, so that the upstream is never what limits a run.
Handles initialize (issues an Mcp-Session-Id), notifications and responses (202),
ping, tools/list and tools/call of any tool (the bench uses `open_session`, answering
like whatsapp-mcp-server's), GET (405) and DELETE (200). `--sse` answers requests
as a one-event SSE stream (chunked) instead of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

import orjson

PROTOCOL_VERSION = "2025-11-25"
TOOLS = [
    {
        "name": "open_session",
        "description": "Open a WhatsApp session (benchmark stand-in).",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "echo",
        "description": "Echo the message back.",
        "inputSchema": {
            "type": "object",
            "properties": {"message": {"type": "string"}},
            "required": ["message"],
        },
    },
]
CALL_RESULT = {
    "content": [{"type": "text", "text": "Success: Session created successfully"}],
    "isError": False,
}


def answer(msg: dict) -> dict | None:
    """The JSON-RPC answer to one message (None for notifications and responses)."""
    method = msg.get("method")
    mid = msg.get("id")
    if method is None or mid is None:
        return None
    if method == "tools/call":
        params = msg.get("params") or {}
        if params.get("name") == "echo":
            text = str((params.get("arguments") or {}).get("message", ""))
            return {"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": text}]}}
        return {"jsonrpc": "2.0", "id": mid, "result": CALL_RESULT}
    if method == "initialize":
        requested = (msg.get("params") or {}).get("protocolVersion") or PROTOCOL_VERSION
        return {
            "jsonrpc": "2.0",
            "id": mid,
            "result": {
                "protocolVersion": requested,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "ledgergate-bench-upstream", "version": "1.0"},
            },
        }
    if method == "tools/list":
        return {"jsonrpc": "2.0", "id": mid, "result": {"tools": TOOLS}}
    if method == "ping":
        return {"jsonrpc": "2.0", "id": mid, "result": {}}
    return {"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": f"Method not found: {method}"}}


# ---- HTTP ----------------------------------------------------------------------------------

_STATUS = {200: b"OK", 202: b"Accepted", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


def _response(
    status: int, body: bytes = b"", extra: bytes = b"", ctype: bytes = b"application/json"
) -> bytes:
    head = b"HTTP/1.1 %d %s\r\n" % (status, _STATUS.get(status, b"OK"))
    if body:
        head += b"Content-Type: " + ctype + b"\r\n"
    return head + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def _sse(body: bytes, extra: bytes) -> bytes:
    event = b"event: message\r\ndata: " + body + b"\r\n\r\n"
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        + extra
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(event)
        + event
        + b"\r\n0\r\n\r\n"
    )


class McpHttp(asyncio.Protocol):
    sse = False

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            lines = head.split(b"\r\n")
            try:
                method, path, _ = lines[0].split(b" ", 2)
            except ValueError:
                self._close(_response(400))
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            start = end + 4
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body, consumed = _dechunk(buf, start)
                if body is None:
                    break
                rest = buf[consumed:]
            else:
                n = int(headers.get(b"content-length", b"0"))
                if len(buf) - start < n:
                    break
                body = buf[start : start + n]
                rest = buf[start + n :]
            buf = rest
            out = self.handle(method, path, headers, body)
            if headers.get(b"connection", b"").lower() == b"close":
                self._close(out)
                return
            self.transport.write(out)  # type: ignore[union-attr]
        self.buf = buf

    def _close(self, out: bytes) -> None:
        assert self.transport is not None
        self.transport.write(out)
        self.transport.close()

    def handle(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> bytes:
        if not path.startswith(b"/mcp"):
            return _response(404, b'{"error":"not found"}')
        if method == b"GET":
            return _response(405, extra=b"Allow: POST, DELETE\r\n")
        if method == b"DELETE":
            return _response(200)
        if method != b"POST":
            return _response(405, extra=b"Allow: POST, DELETE\r\n")
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _response(
                400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}'
            )
        if not isinstance(msg, dict):
            return _response(400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Invalid"}}')
        reply = answer(msg)
        if reply is None:
            return _response(202)
        extra = b""
        if msg.get("method") == "initialize":
            extra = b"Mcp-Session-Id: " + uuid.uuid4().hex.encode() + b"\r\n"
        data = orjson.dumps(reply)
        if self.sse:
            return _sse(data, extra)
        return _response(200, data, extra)


def _dechunk(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            end = buf.find(b"\r\n", pos)  # no trailers expected
            if end < 0:
                return None, 0
            return b"".join(parts), end + 2
        if len(buf) < pos + size + 2:
            return None, 0
        parts.append(buf[pos : pos + size])
        pos += size + 2


async def serve_http(host: str, port: int, sse: bool) -> None:
    McpHttp.sse = sse
    loop = asyncio.get_running_loop()
    server = await loop.create_server(McpHttp, host, port, reuse_address=True, backlog=1024)
    print(
        f"bench upstream on http://{host}:{port}/mcp ({'sse' if sse else 'json'}) pid {os.getpid()}",
        flush=True,
    )
    async with server:
        await server.serve_forever()


# ---- stdio ---------------------------------------------------------------------------------


def serve_stdio() -> None:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        line = line.strip()
        if not line:
            continue
        try:
            msg = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        reply = answer(msg) if isinstance(msg, dict) else None
        if reply is not None:
            out.write(orjson.dumps(reply) + b"\n")
            out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--sse", action="store_true", help="answer requests as SSE streams")
    ap.add_argument("--stdio", action="store_true", help="serve newline-delimited JSON-RPC on stdin/stdout")
    a = ap.parse_args()
    if a.stdio:
        serve_stdio()
        return
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    try:
        run(serve_http(a.host, a.port, a.sse))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    main()
