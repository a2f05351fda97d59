"""The edge's requests on Python 3.11 run inline in their connection's task (no Task per
request, see gateway.edge._EDGE_HANDLE_CODE): what must still hold, over raw sockets."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

import pytest

from gateway.edge import App, EdgeLimits, HttpServer, Request, json_response

VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar("edge_inline_test", default=None)


class Handlers:
    def __init__(self) -> None:
        self.seen: list[str | None] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def echo(self, req: Request) -> object:
        self.seen.append(VAR.get())
        token = VAR.set(req.match_info["n"])
        try:
            body = await req.read()
            await asyncio.sleep(0)  # a suspension while the variable is set
            # a task created by a handler is a real Task (the factory only inlines requests)
            t = asyncio.create_task(asyncio.sleep(0, result=len(body)))
            assert isinstance(t, asyncio.Task)
            return json_response({"n": req.match_info["n"], "len": await t})
        finally:
            VAR.reset(token)

    async def block(self, req: Request) -> object:
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return json_response({})


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, Handlers]]:
    h = Handlers()
    app = App(EdgeLimits())
    app.add_post("/echo/{n}", h.echo)
    app.add_get("/block", h.block)
    async with HttpServer(app, "127.0.0.1", 0) as srv:
        yield srv, h


async def read_answer(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head, await r.readexactly(length)


async def test_pipelined_requests_are_answered_in_order_without_leaking_context(
    server: tuple[HttpServer, Handlers],
) -> None:
    srv, h = server
    r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(
        b"".join(
            b"POST /echo/%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (i, i, b"x" * i)
            for i in range(1, 6)
        )
    )
    await w.drain()
    for i in range(1, 6):
        head, body = await read_answer(r)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert body == b'{"n":"%d","len":%d}' % (i, i)
    w.close()
    assert h.seen == [None] * 5  # each request started with the variable unset


async def test_a_client_hang_up_cancels_its_handler_and_the_server_goes_on(
    server: tuple[HttpServer, Handlers],
) -> None:
    srv, h = server
    _r, w = await asyncio.open_connection("127.0.0.1", srv.port)
    w.write(b"GET /block HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    await asyncio.wait_for(h.started.wait(), 10)
    w.close()
    await asyncio.wait_for(h.cancelled.wait(), 10)
    r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)
    w2.write(b"POST /echo/7 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
    head, body = await read_answer(r2)
    assert head.startswith(b"HTTP/1.1 200 ") and body == b'{"n":"7","len":2}'
    w2.close()
