"""gateway.http.client.UpstreamPool against real servers on loopback (aiohttp and raw asyncio)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import pytest_asyncio
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.http.client import HIGH_WATER, UpstreamError, UpstreamPool, UpstreamTimeout


class Upstream:
    """An aiohttp app whose handlers the tests set; counts server-side connections."""

    def __init__(self) -> None:
        self.peers: set[tuple[str, int]] = set()
        self.handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = self.echo
        self.event = asyncio.Event()
        self.disconnected = asyncio.Event()

    @staticmethod
    async def echo(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        return web.json_response(
            {"method": req.method, "path": req.path_qs, "headers": list(req.headers.items()), "n": len(body)}
        )

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def handle(self, req: web.Request) -> web.StreamResponse:
        assert req.transport is not None
        self.peers.add(req.transport.get_extra_info("peername"))
        return await self.handler(req)


@pytest_asyncio.fixture(loop_scope="session")
async def up() -> AsyncIterator[tuple[Upstream, str]]:
    u = Upstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", u.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield u, str(server.make_url("/mcp"))
    finally:
        await server.close()


@pytest_asyncio.fixture(loop_scope="session")
async def pool(up: tuple[Upstream, str]) -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(up[1])
    try:
        yield p
    finally:
        await p.close()


async def raw_server(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, str]:
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    return srv, f"http://127.0.0.1:{port}/mcp"


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


JSON_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_json_post_round_trip(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    resp = await pool.request("POST", {"Content-Type": "application/json"}, body)
    assert resp.status == 200
    assert resp.headers.get("content-type") == "application/json; charset=utf-8"
    got = orjson.loads(await resp.read())
    assert got["method"] == "POST" and got["path"] == "/mcp" and got["n"] == len(body)
    assert resp.released  # read() returned the connection to the pool
    assert pool.idle_count == 1


async def test_request_and_response_headers(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, url = up

    async def handler(req: web.Request) -> web.StreamResponse:
        r = await Upstream.echo(req)
        r.headers["Mcp-Session-Id"] = "sess-1"
        r.headers.add("X-Multi", "a")
        r.headers.add("X-Multi", "b")
        return r

    u.handler = handler
    hdrs = [("Accept", "application/json, text/event-stream"), ("Mcp-Session-Id", "abc"), ("X-Empty", "")]
    async with await pool.request("GET", hdrs, path="/other?q=1") as resp:
        got = orjson.loads(await resp.read())
    assert got["method"] == "GET" and got["path"] == "/other?q=1"
    sent = {k.lower(): v for k, v in got["headers"]}
    host = url.split("//")[1].split("/")[0]
    # exactly what we asked for plus Host: no User-Agent, Accept-Encoding, Content-Length
    assert sent == {
        "host": host,
        "accept": "application/json, text/event-stream",
        "mcp-session-id": "abc",
        "x-empty": "",
    }
    assert resp.headers["mcp-session-id"] == "sess-1"
    assert resp.headers["x-multi"] == "a, b"
    assert all(k == k.lower() for k in resp.headers)


async def test_bad_request_headers_are_refused(pool: UpstreamPool) -> None:
    with pytest.raises(ValueError):
        await pool.request("GET", {"X-A": "1\r\nX-Injected: 2"})
    with pytest.raises(ValueError):
        await pool.request("POST", {"Content-Length": "5"}, b"hello")
    with pytest.raises(ValueError):
        await pool.request("GET", [("host", "evil")])
    with pytest.raises(ValueError):
        await pool.request("GET /x", {})
    # prepared once: the same checks, at prepare() time
    with pytest.raises(ValueError):
        pool.prepare({"X-A": "1\r\nX-Injected: 2"})
    with pytest.raises(ValueError):
        pool.prepare([("Transfer-Encoding", "chunked")])


async def test_prepared_headers_are_sent_as_given(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, url = up
    u.handler = Upstream.echo
    prepared = pool.prepare([("Accept", "application/json"), ("Mcp-Session-Id", "abc")])
    for body in (b'{"a":1}', None):  # reused: one request with a body, one without
        resp = await pool.request("POST", prepared, body)
        got = orjson.loads(await resp.read())
        sent = {k.lower(): v for k, v in got["headers"]}
        assert sent == {
            "host": url.split("//")[1].split("/")[0],
            "accept": "application/json",
            "mcp-session-id": "abc",
            "content-length": str(len(body or b"")),
        }
        assert got["n"] == len(body or b"")


async def test_202_and_204_without_body_keep_the_connection(
    up: tuple[Upstream, str], pool: UpstreamPool
) -> None:
    u, _ = up
    statuses = iter([202, 204, 202])

    async def handler(req: web.Request) -> web.StreamResponse:
        await req.read()
        return web.Response(status=next(statuses))

    u.handler = handler
    for want in (202, 204, 202):
        resp = await pool.request("POST", {"Content-Type": "application/json"}, b'{"jsonrpc":"2.0"}')
        assert resp.status == want
        assert await resp.read() == b""
    assert u.connections == 1


async def test_sse_chunks_are_streamed_as_they_arrive(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    first_seen = asyncio.Event()

    async def handler(req: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(req)  # no Content-Length: aiohttp answers chunked
        await r.write(b'event: message\ndata: {"progress":1}\n\n')
        await first_seen.wait()  # only the client having seen event 1 lets the server go on
        await r.write(b'data: {"progress":2}\n\n')
        await r.write(b'data: {"result":{}}\n\n')
        await r.write_eof()
        return r

    u.handler = handler
    resp = await pool.request("POST", {"Accept": "text/event-stream"}, b"{}", read_timeout=10)
    assert resp.headers["transfer-encoding"] == "chunked"
    got = []
    async with resp:
        async for chunk in resp.iter_chunks():
            got.append(chunk)
            first_seen.set()
    assert got[0] == b'event: message\ndata: {"progress":1}\n\n'
    assert b"".join(got).endswith(b'data: {"result":{}}\n\n')
    assert pool.idle_count == 1  # chunked body read to its end: reusable
    resp2 = await pool.request("GET", {})
    assert resp2.status == 200
    await resp2.read()
    assert u.connections == 1


async def test_keep_alive_reuse_and_connection_close(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    for _ in range(5):
        resp = await pool.request("POST", {}, b"{}")
        await resp.read()
    assert u.connections == 1

    async def closing(req: web.Request) -> web.StreamResponse:
        return web.Response(body=b"bye", headers={"Connection": "close"})

    u.handler = closing
    resp = await pool.request("POST", {}, b"{}")
    assert await resp.read() == b"bye"
    assert pool.idle_count == 0  # Connection: close honoured
    u.handler = Upstream.echo
    await (await pool.request("POST", {}, b"{}")).read()
    assert u.connections == 2


async def test_server_closing_an_idle_connection_is_noticed() -> None:
    """The server closes a pooled connection while it is idle: the next request uses a new one."""
    conns: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        await read_request(reader)
        writer.write(JSON_OK)
        await writer.drain()
        writer.close()  # ...without Connection: close: like a keep-alive timeout right after

    srv, url = await raw_server(handle)
    pool = UpstreamPool(url)
    try:
        for _ in range(3):
            async with await pool.request("POST", {}, b"{}") as resp:
                assert await resp.read() == b'{"ok":true}'
            await asyncio.sleep(0.05)
        assert len(conns) == 3
    finally:
        await pool.close()
        srv.close()


async def test_stale_keep_alive_connection_is_retried_once() -> None:
    """The classic race: the server closes an idle connection just as the next request is
    sent on it. The request is retried on a fresh connection, transparently."""
    seen: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(seen)
        seen.append(n)
        await read_request(reader)
        writer.write(JSON_OK)
        await writer.drain()
        if n == 0:  # first connection: take the second request, then drop it unanswered
            await read_request(reader)
            writer.transport.abort()
            return
        while await read_request(reader):
            writer.write(JSON_OK)
            await writer.drain()
        writer.close()

    srv, url = await raw_server(handle)
    pool = UpstreamPool(url)
    try:
        assert await (await pool.request("POST", {}, b"{}")).read() == b'{"ok":true}'
        resp = await pool.request("POST", {}, b'{"second":1}')
        assert await resp.read() == b'{"ok":true}'
        assert len(seen) == 2
    finally:
        await pool.close()
        srv.close()


async def test_fresh_connection_or_partial_answer_is_not_retried() -> None:
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        head = await read_request(reader)
        if head and b"partial" in head:
            writer.write(JSON_OK)
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await writer.drain()
        writer.transport.abort()

    srv, url = await raw_server(handle)
    pool = UpstreamPool(url)
    try:
        with pytest.raises(UpstreamError) as ei:  # fresh connection dropped: no retry
            await pool.request("POST", {}, b"{}")
        assert not isinstance(ei.value, TimeoutError)
        assert count == 1
        assert await (await pool.request("POST", {}, b"{}", path="/partial")).read() == b'{"ok":true}'
        with pytest.raises(UpstreamError):  # reused, but part of an answer arrived: no retry
            await pool.request("POST", {}, b"{}")
        assert count == 2
    finally:
        await pool.close()
        srv.close()


async def test_read_timeout_on_a_stalled_server(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    release = asyncio.Event()

    async def stall(req: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=b"late")

    u.handler = stall
    with pytest.raises(asyncio.TimeoutError) as ei:
        await pool.request("POST", {}, b"{}", read_timeout=0.2)
    assert isinstance(ei.value, UpstreamTimeout) and isinstance(ei.value, UpstreamError)
    release.set()

    async def stall_mid_body(req: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(req)
        await r.write(b"data: 1\n\n")
        await asyncio.sleep(30)
        return r

    u.handler = stall_mid_body
    resp = await pool.request("POST", {}, b"{}", read_timeout=0.2)
    it = resp.iter_chunks()
    assert await it.__anext__() == b"data: 1\n\n"
    with pytest.raises(UpstreamTimeout):
        await it.__anext__()
    resp.release()
    assert pool.idle_count == 0  # a timed-out connection is never pooled


async def test_read_timeout_is_idle_time_not_total_time(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up

    async def trickle(req: web.Request) -> web.StreamResponse:
        r = web.StreamResponse()
        await r.prepare(req)
        for _ in range(6):
            await r.write(b"x")
            await asyncio.sleep(0.1)
        await r.write_eof()
        return r

    u.handler = trickle
    resp = await pool.request("GET", {}, read_timeout=0.35)
    assert await resp.read() == b"xxxxxx"  # 0.6 s in all, never 0.35 s without a byte


async def test_one_pool_timer_serves_waits_with_different_deadlines(
    up: tuple[Upstream, str], pool: UpstreamPool
) -> None:
    """The pool's single deadline timer: a short wait started after a long one still times
    out (the timer is moved earlier), the long one survives it, and a later short one is
    checked again (the timer is re-armed for the next due wait)."""
    u, _ = up
    release = asyncio.Event()

    async def stall(req: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=b"late")

    u.handler = stall
    long_wait = asyncio.ensure_future(pool.request("POST", {}, b"{}", read_timeout=30))
    await asyncio.sleep(0)
    with pytest.raises(UpstreamTimeout):
        await pool.request("POST", {}, b"{}", read_timeout=0.1)
    assert not long_wait.done()
    with pytest.raises(UpstreamTimeout):  # after a sweep: the timer was re-armed for the long wait
        await pool.request("POST", {}, b"{}", read_timeout=0.1)
    assert not long_wait.done()
    release.set()
    resp = await long_wait
    assert await resp.read() == b"late"


async def test_connection_refused() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pool = UpstreamPool(f"http://127.0.0.1:{port}/mcp")
    with pytest.raises(UpstreamError) as ei:
        await pool.request("POST", {}, b"{}")
    assert isinstance(ei.value.__cause__, OSError)
    await pool.close()


async def test_large_bodies_both_ways(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up

    async def echo_body(req: web.Request) -> web.StreamResponse:
        return web.Response(body=await req.read(), content_type="application/octet-stream")

    u.handler = echo_body
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    resp = await pool.request("POST", {}, big)
    assert resp.headers["content-length"] == str(len(big))
    assert await resp.read() == big
    async with await pool.request("POST", {}, big) as resp:
        assert b"".join([c async for c in resp]) == big
    assert pool.idle_count == 1 and u.connections == 1


async def test_slow_consumer_pauses_reading(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    total = 8 * 1024 * 1024

    async def flood(req: web.Request) -> web.StreamResponse:
        r = web.StreamResponse()
        await r.prepare(req)
        for _ in range(total // 65536):
            await r.write(b"z" * 65536)
        await r.write_eof()
        return r

    u.handler = flood
    resp = await pool.request("GET", {})
    conn = resp._conn
    assert conn is not None and conn.transport is not None
    for _ in range(500):  # the consumer does not read: wait until reading is paused
        if not conn.transport.is_reading():
            break
        await asyncio.sleep(0.01)
    assert not conn.transport.is_reading()
    buffered = resp._size
    assert HIGH_WATER < buffered < total
    await asyncio.sleep(0.05)
    assert resp._size == buffered  # nothing more is read while paused
    n = 0
    async for chunk in resp:
        n += len(chunk)
    assert n == total
    assert pool.idle_count == 1


async def test_abandoned_stream_closes_the_connection(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    gone = asyncio.Event()

    async def endless(req: web.Request) -> web.StreamResponse:
        r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await r.prepare(req)
        try:
            while True:
                await r.write(b": ping\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    u.handler = endless
    resp = await pool.request("GET", {"Accept": "text/event-stream"}, read_timeout=None)
    async for chunk in resp:
        assert chunk.startswith(b": ping")
        break
    resp.release()
    await asyncio.wait_for(gone.wait(), 5)
    assert pool.idle_count == 0
    u.handler = Upstream.echo
    assert orjson.loads(await (await pool.request("POST", {}, b"{}")).read())["n"] == 2
    assert u.connections == 2


async def test_cancelled_request_does_not_leak_its_connection(
    up: tuple[Upstream, str], pool: UpstreamPool
) -> None:
    u, _ = up
    release = asyncio.Event()

    async def stall(req: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=b"late")

    u.handler = stall
    task = asyncio.ensure_future(pool.request("POST", {}, b"{}", read_timeout=None))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    u.handler = Upstream.echo
    await asyncio.sleep(0.05)
    assert pool.idle_count == 0 and not pool._conns
    assert (await pool.request("POST", {}, b"{}")).status == 200


async def test_fifty_concurrent_requests(up: tuple[Upstream, str], pool: UpstreamPool) -> None:
    u, _ = up
    arrived = 0
    all_in = asyncio.Event()

    async def barrier(req: web.Request) -> web.StreamResponse:
        nonlocal arrived
        body = await req.read()
        arrived += 1
        if arrived == 50:
            all_in.set()
        await all_in.wait()  # nobody is answered until all 50 are in flight at once
        return web.Response(body=body)

    u.handler = barrier

    async def one(i: int) -> bytes:
        resp = await pool.request("POST", {"X-I": str(i)}, b'{"i":%d}' % i, read_timeout=10)
        return await resp.read()

    got = await asyncio.gather(*(one(i) for i in range(50)))
    assert got == [b'{"i":%d}' % i for i in range(50)]
    assert u.connections == 50 and pool.idle_count == 50
    u.handler = Upstream.echo
    await asyncio.gather(*(one(i) for i in range(50)))
    assert u.connections == 50  # all reused


async def test_read_until_close_and_malformed_answers() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader) or b""
        if b"/eof" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"part two")
        elif b"/interim" in head:
            writer.write(b"HTTP/1.1 100 Continue\r\nX-A: 1\r\n\r\n" + JSON_OK)
        else:
            writer.write(b"SPDY/9 banana\r\n\r\n")
        await writer.drain()
        writer.close()

    srv, url = await raw_server(handle)
    pool = UpstreamPool(url)
    try:
        resp = await pool.request("GET", {}, path="/eof")
        assert await resp.read() == b"part one, part two"
        resp = await pool.request("GET", {}, path="/interim")
        assert resp.status == 200 and "x-a" not in resp.headers
        assert await resp.read() == b'{"ok":true}'
        with pytest.raises(UpstreamError, match="malformed"):
            await pool.request("GET", {}, path="/bad")
    finally:
        await pool.close()
        srv.close()


async def test_closed_pool_refuses(up: tuple[Upstream, str]) -> None:
    p = UpstreamPool(up[1])
    await (await p.request("GET", {})).read()
    await p.close()
    with pytest.raises(UpstreamError):
        await p.request("GET", {})


@pytest.fixture
def tls_cert() -> tuple[Path, Path]:
    """A committed self-signed localhost certificate (tests/support/tls/README.md)."""
    d = Path(__file__).resolve().parents[2] / "support" / "tls"
    return d / "localhost-test-key.pem", d / "localhost-test-cert.pem"


async def test_https(tls_cert: tuple[Path, Path]) -> None:
    key, cert = tls_cert
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    u = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", u.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    pool = UpstreamPool(f"https://127.0.0.1:{port}/mcp", ssl=ssl.create_default_context(cafile=str(cert)))
    try:
        for _ in range(3):
            async with await pool.request("POST", {}, b"{}") as resp:
                assert orjson.loads(await resp.read())["n"] == 2
        assert u.connections == 1
    finally:
        await pool.close()
        await runner.cleanup()


def test_under_uvloop() -> None:
    """The gateway runs on uvloop: the main paths once more on a uvloop loop."""

    async def scenario() -> None:
        u = Upstream()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", u.handle)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        pool = UpstreamPool(str(server.make_url("/mcp")))
        try:
            for _ in range(3):
                assert orjson.loads(await (await pool.request("POST", {}, b"{}")).read())["n"] == 2
            go = asyncio.Event()

            async def sse(req: web.Request) -> web.StreamResponse:
                r = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await r.prepare(req)
                await r.write(b"data: 1\n\n")
                await go.wait()
                await r.write(b"data: 2\n\n")
                return r

            u.handler = sse
            chunks = []
            async with await pool.request("POST", {}, b"{}") as resp:
                async for c in resp:
                    chunks.append(c)
                    go.set()
            assert b"".join(chunks) == b"data: 1\n\ndata: 2\n\n" and chunks[0] == b"data: 1\n\n"

            async def stall(req: web.Request) -> web.StreamResponse:
                await asyncio.sleep(5)
                return web.Response()

            u.handler = stall
            with pytest.raises(TimeoutError):
                await pool.request("GET", {}, read_timeout=0.1)
            assert u.connections == 1 and pool.idle_count == 0
        finally:
            await pool.close()
            await server.close()

    uvloop.run(scenario())


def test_a_pool_that_outlives_its_event_loop_still_times_out() -> None:
    """The pool's deadline timer belongs to a loop: on a new loop the first wait arms a new
    one, even though the old loop's (now dead) timer was due earlier."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes the connects; nothing ever answers
    pool = UpstreamPool(f"http://127.0.0.1:{listener.getsockname()[1]}/mcp")

    async def arm_and_leave() -> None:
        task = asyncio.ensure_future(pool.request("POST", {}, b"{}", read_timeout=1))
        for _ in range(10_000):  # until the request waits for its answer (its deadline armed)
            if pool._sweep is not None:
                break
            await asyncio.sleep(0)
        assert pool._sweep is not None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stalled() -> None:
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(pool.request("POST", {}, b"{}", read_timeout=2), 30)
        await pool.close()

    try:
        uvloop.run(arm_and_leave())
        uvloop.run(stalled())
    finally:
        listener.close()
