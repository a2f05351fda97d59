"""gateway.httpserver on loopback: raw sockets (asyncio streams) and an aiohttp client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from gateway.httpserver import App, HttpServer, Request, Response, StreamResponse

MAX = 1000


class State:
    def __init__(self) -> None:
        self.first_chunk_seen = asyncio.Event()
        self.handler_done = asyncio.Event()
        self.write_error: BaseException | None = None
        self.stream_started = asyncio.Event()
        self.stream_ended = asyncio.Event()
        self.cleanup: list[str] = []


@pytest.fixture
async def server() -> AsyncIterator[tuple[HttpServer, State]]:
    st = State()
    app = App(max_body_bytes=MAX)

    async def echo(req: Request) -> Response:
        body = await req.read()
        doc = {
            "method": req.method,
            "path": req.path,
            "server": req.match_info.get("server"),
            "query": list(req.query.items()),
            "len": len(body),
            "body": body.decode(),
            "x": req.headers.get("x-test"),
            "remote": req.remote,
        }
        return Response(body=orjson.dumps(doc), content_type="application/json", headers={"X-Echo": "1"})

    async def stream(req: Request) -> StreamResponse:
        resp = StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        await resp.write(b"data: first\n\n")
        await st.first_chunk_seen.wait()  # set by the test once it has read the first chunk
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        st.handler_done.set()
        return resp

    async def forever(req: Request) -> StreamResponse:
        resp = StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(req)
        st.stream_started.set()
        try:
            for _ in range(100_000):
                await resp.write(b"data: " + b"x" * 1000 + b"\n\n")
                await asyncio.sleep(0)
        except ConnectionResetError as exc:
            st.write_error = exc
        finally:
            st.stream_ended.set()
        return resp

    async def boom(req: Request) -> Response:
        raise RuntimeError("boom")

    async def lifecycle(app: App) -> AsyncIterator[None]:
        st.cleanup.append("start")
        yield
        st.cleanup.append("stop")

    app.add_post("/echo/{server}", echo)
    app.add_get("/echo/{server}", echo)
    app.add_get("/stream", stream)
    app.add_get("/forever", forever)
    app.add_get("/boom", boom)
    app.cleanup_ctx.append(lifecycle)
    srv = HttpServer(app, "127.0.0.1", 0, shutdown_timeout=1.0)
    await srv.start()
    assert st.cleanup == ["start"]
    try:
        yield srv, st
    finally:
        await srv.close()
        assert st.cleanup == ["start", "stop"]


async def read_response(r: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (Content-Length or chunked) off a raw connection."""
    status_line = await r.readline()
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await r.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        body = await r.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            n = int((await r.readline()).strip(), 16)
            chunk = await r.readexactly(n + 2)
            if n == 0:
                break
            body += chunk[:-2]
    else:
        body = await r.read()
    return status, headers, body


async def connect(srv: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", srv.port)


async def test_keep_alive_and_pipelining_in_order(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r, w = await connect(srv)
    for i in range(3):
        w.write(f"GET /echo/s{i}?a=1&b=x%20y&a=2 HTTP/1.1\r\nHost: x\r\nX-Test: t{i}\r\n\r\n".encode())
        await w.drain()
        status, headers, body = await read_response(r)
        assert status == 200 and headers["x-echo"] == "1" and headers["content-type"] == "application/json"
        doc = orjson.loads(body)
        assert doc["server"] == f"s{i}" and doc["x"] == f"t{i}" and doc["remote"] == "127.0.0.1"
        assert doc["query"] == [["a", "1"], ["b", "x y"], ["a", "2"]]
    # pipelined: three requests in one write, answered in order on the same connection
    w.write(
        b"".join(
            f"POST /echo/p{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n{i}".encode() for i in range(3)
        )
    )
    for i in range(3):
        status, _, body = await read_response(r)
        assert status == 200 and orjson.loads(body)["body"] == str(i)
    w.write(b"GET /echo/last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, _ = await read_response(r)
    assert status == 200 and headers["connection"] == "close"
    assert await r.read() == b""  # closed after the answer
    w.close()


async def test_http_1_0_closes_after_the_answer(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r, w = await connect(srv)
    w.write(b"GET /echo/old HTTP/1.0\r\n\r\n")
    status, _, body = await read_response(r)
    assert status == 200 and orjson.loads(body)["server"] == "old"
    assert await r.read() == b""
    w.close()


async def test_chunked_request_body(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r, w = await connect(srv)
    w.write(b"POST /echo/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    w.write(b"5\r\nhello\r\n")
    await w.drain()
    w.write(b"6\r\n world\r\n0\r\n\r\n")
    status, _, body = await read_response(r)
    doc = orjson.loads(body)
    assert status == 200 and doc["body"] == "hello world" and doc["len"] == 11
    w.close()


async def test_expect_100_continue(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    r, w = await connect(srv)
    w.write(b"POST /echo/e HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await r.readline() == b"HTTP/1.1 100 Continue\r\n"
    assert await r.readline() == b"\r\n"
    w.write(b"ok")
    status, _, body = await read_response(r)
    assert status == 200 and orjson.loads(body)["body"] == "ok"
    w.close()


async def test_streaming_response_arrives_before_the_handler_finishes(
    server: tuple[HttpServer, State],
) -> None:
    srv, st = server
    async with aiohttp.ClientSession() as http, http.get(f"{srv.url}/stream") as resp:
        assert resp.status == 200
        assert resp.headers["Transfer-Encoding"] == "chunked"
        first = await resp.content.readuntil(b"\n\n")
        assert first == b"data: first\n\n"
        assert not st.handler_done.is_set()  # the handler is still waiting for us
        st.first_chunk_seen.set()
        assert await resp.content.read() == b"data: second\n\n"
    assert st.handler_done.is_set()


async def test_client_disconnect_mid_stream_raises_in_write(server: tuple[HttpServer, State]) -> None:
    srv, st = server
    r, w = await connect(srv)
    w.write(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
    await st.stream_started.wait()
    await r.readline()
    w.transport.abort()  # type: ignore[attr-defined]
    await asyncio.wait_for(st.stream_ended.wait(), 10)
    # either write() raised ConnectionResetError, or the handler was cancelled (like aiohttp's
    # handler_cancellation) while it waited; never did it write on into the void
    if st.write_error is not None:
        assert isinstance(st.write_error, ConnectionResetError)


async def test_write_after_disconnect_raises() -> None:
    got: list[BaseException] = []
    done = asyncio.Event()

    async def handler(req: Request) -> StreamResponse:
        resp = StreamResponse(status=200)
        await resp.prepare(req)
        try:
            while not req.disconnected:  # noqa: ASYNC110 - polling it is the point
                await asyncio.sleep(0.001)
            await resp.write(b"late")
        except ConnectionResetError as exc:
            got.append(exc)
        finally:
            done.set()
        return resp

    app = App()
    app.add_get("/", handler)
    async with HttpServer(app, "127.0.0.1", 0) as srv:
        r, w = await connect(srv)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await r.readline()
        w.transport.abort()  # type: ignore[attr-defined]
        await asyncio.wait_for(done.wait(), 10)
        assert not srv.conns  # the server noticed the client going
    # the handler is cancelled on disconnect; if it got to write first, write raised
    assert got == [] or isinstance(got[0], ConnectionResetError)


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_and_closed(server: tuple[HttpServer, State], raw: bytes) -> None:
    srv, _ = server
    r, w = await connect(srv)
    w.write(raw)
    status, headers, body = await read_response(r)
    assert status == 400 and headers["connection"] == "close"
    assert orjson.loads(body)["error"] == "bad_request"
    assert await r.read() == b""
    w.close()


async def test_oversized_body_is_413(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{srv.url}/echo/big", data=b"x" * (MAX + 1)) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 300

        async with http.post(f"{srv.url}/echo/big", data=chunks()) as resp:  # chunked, no length
            assert resp.status == 413
        async with http.post(f"{srv.url}/echo/ok", data=b"x" * MAX) as resp:
            assert resp.status == 200 and (await resp.json())["len"] == MAX


async def test_404_405_and_500(server: tuple[HttpServer, State]) -> None:
    srv, _ = server
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{srv.url}/nope") as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        async with http.delete(f"{srv.url}/echo/x") as resp:
            assert resp.status == 405 and set(resp.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}
        async with http.head(f"{srv.url}/echo/x") as resp:
            assert resp.status == 200 and await resp.read() == b""
    r, w = await connect(srv)
    w.write(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(r)
    assert status == 500 and orjson.loads(body)["error"] == "internal_error"
    # the connection stays usable: the answer had not started
    w.write(b"GET /echo/after HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(r)
    assert status == 200 and orjson.loads(body)["server"] == "after"
    w.close()


async def test_graceful_close_lets_in_flight_requests_finish() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(req: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(body=b"done")

    app = App()
    app.add_get("/slow", slow)
    srv = HttpServer(app, "127.0.0.1", 0, shutdown_timeout=10)
    await srv.start()
    idle_r, idle_w = await connect(srv)  # an idle keep-alive connection: closed at once
    r, w = await connect(srv)
    w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await entered.wait()
    closing = asyncio.create_task(srv.close())
    assert await idle_r.read() == b""
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", srv.port)  # no longer accepting
    assert not closing.done()
    release.set()
    status, headers, body = await read_response(r)
    assert status == 200 and body == b"done" and headers["connection"] == "close"
    await closing
    w.close()
    idle_w.close()
