"""gateway.edge.Answer puts the same bytes on the wire as aiohttp's Response, over raw sockets
(HTTP/1.0 and 1.1, keep-alive or close, HEAD, empty and no-content answers), and still
refuses a header that would inject a line."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.edge import Answer, App, EdgeLimits, HttpServer, Request

BODY = b'{"jsonrpc":"2.0","id":1,"result":{}}'


def make(kind: str, status: int, body: bytes, headers: dict[str, str]) -> web.Response:
    if kind == "ans":
        return Answer(body, status, headers)
    return web.Response(body=body, status=status, headers=headers)


async def handler(req: Request) -> web.Response:
    status = int(req.match_info["status"])
    body = b"" if status in (202, 204) else BODY
    await req.read()
    headers = {"Content-Type": "application/json", "Mcp-Session-Id": "s-1"}
    if req.match_info["what"] == "bad":
        headers["X-Bad"] = "a\r\nInjected: 1"
    return make(req.match_info["kind"], status, body, headers)


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    app = App(EdgeLimits())
    for add in (app.add_post, app.add_get, app.add_head):
        add("/{kind}/{status}/{what}", handler)
    async with HttpServer(app, "127.0.0.1", 0) as srv:
        yield srv


async def exchange(port: int, request: bytes) -> bytes:
    """One answer: its head, then the body its Content-Length says (none for HEAD and 204)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(request)
    await w.drain()
    try:
        head = await r.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        head = exc.partial  # the server closed without a (complete) answer
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    empty = request.startswith(b"HEAD") or head.startswith(b"HTTP/1.1 204")
    body = b"" if empty or m is None else await r.readexactly(int(m[1]))
    w.close()
    return re.sub(rb"Date: [^\r]*", b"Date: D", head + body)


CASES = [
    b"POST /{k}/200/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /{k}/200/ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /{k}/200/ok HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /{k}/200/ok HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /{k}/404/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /{k}/202/ok HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"GET /{k}/204/ok HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /{k}/200/ok HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("request_template", CASES)
async def test_answer_bytes_equal_aiohttp_response(server: HttpServer, request_template: bytes) -> None:
    ours = await exchange(server.port, request_template.replace(b"{k}", b"ans"))
    theirs = await exchange(server.port, request_template.replace(b"{k}", b"aio"))
    assert ours.startswith(b"HTTP/1.")
    assert ours == theirs


async def test_a_header_with_a_line_break_is_never_sent(server: HttpServer) -> None:
    out = await exchange(server.port, b"GET /ans/200/bad HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Injected" not in out
