"""The upstream client (gateway.http.client) against a hostile upstream: a raw asyncio server that
sends bad responses. Each test asserts the client's error AND that the gateway stopped reading
(the hostile server sees its connection closed, having sent far less than it tried)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from gateway.http.client import UpstreamError, UpstreamPool, UpstreamTimeout
from gateway.http.sse import EventTooLarge, SseSplitter


class Hostile:
    """A raw server: `answer(writer)` writes the response; counts what it managed to send."""

    def __init__(self, answer: Callable[[Hostile, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.answer = answer
        self.sent = 0
        self.closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        task = asyncio.create_task(self.answer(self, writer))
        try:
            await reader.read()  # returns when the client closed the connection
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            writer.close()

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.is_closing():
            raise ConnectionResetError("client gone")
        writer.write(data)
        await writer.drain()
        self.sent += len(data)


async def run(answer: Callable[[Hostile, asyncio.StreamWriter], Awaitable[None]], **pool_kw: object):
    h = Hostile(answer)
    srv = await asyncio.start_server(h.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"http://127.0.0.1:{port}/mcp", **pool_kw)  # type: ignore[arg-type]
    return h, srv, pool


async def endless_headers(h: Hostile, w: asyncio.StreamWriter) -> None:
    await h.write(w, b"HTTP/1.1 200 OK\r\n")
    for i in range(1_000_000):
        await h.write(w, b"X-Pad-%d: %s\r\n" % (i, b"v" * 100))


async def many_small_headers(h: Hostile, w: asyncio.StreamWriter) -> None:
    await h.write(w, b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n")
    await asyncio.Event().wait()


async def trickled_head(h: Hostile, w: asyncio.StreamWriter) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}":
        await h.write(w, bytes([byte]))
        await asyncio.sleep(0.05)  # a byte before each idle timeout: only a head deadline stops it


async def huge_json(h: Hostile, w: asyncio.StreamWriter) -> None:
    await h.write(
        w, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n"
    )
    while True:
        await h.write(w, b" " * 65536)


async def test_an_endless_head_is_cut_at_max_head_bytes() -> None:
    h, srv, pool = await run(endless_headers, max_head_bytes=16 * 1024, max_headers=1000)
    async with srv:
        with pytest.raises(UpstreamError, match="head over 16384 bytes"):
            await pool.request("POST", [], b"{}", read_timeout=10)
        await asyncio.wait_for(h.closed.wait(), 20)
        assert h.sent < 32 << 20  # of ~110 MB: cut at 16 KiB (the rest sat in loopback socket buffers)
        await pool.close()


async def test_too_many_header_lines_are_refused() -> None:
    h, srv, pool = await run(many_small_headers, max_headers=100)
    async with srv:
        with pytest.raises(UpstreamError, match="over 100 header lines"):
            await pool.request("POST", [], b"{}", read_timeout=10)
        await asyncio.wait_for(h.closed.wait(), 20)
        await pool.close()


async def test_a_trickled_head_hits_the_head_deadline() -> None:
    h, srv, pool = await run(trickled_head)
    async with srv:
        with pytest.raises(UpstreamTimeout, match="head in time"):
            await pool.request("POST", [], b"{}", read_timeout=5.0, head_timeout=0.5)
        await asyncio.wait_for(h.closed.wait(), 20)
        assert h.sent < 60  # of a 73-byte answer: cut mid-head
        await pool.close()


async def test_a_json_body_over_the_limit_is_refused_without_buffering_it() -> None:
    h, srv, pool = await run(huge_json, max_body_bytes=1 << 20)
    async with srv:
        resp = await pool.request("POST", [], b"{}", read_timeout=10)
        with pytest.raises(UpstreamError, match="larger than 1048576 bytes"):
            await resp.read()
        assert resp._size <= (1 << 20) + 256 * 1024  # at most one socket read past the limit
        await asyncio.wait_for(h.closed.wait(), 20)
        assert h.sent < 64 << 20  # of the 1 GiB announced
        await pool.close()


def test_an_sse_event_without_end_is_capped() -> None:
    splitter = SseSplitter(max_event_bytes=1024)
    assert [e.data for e in splitter.feed(b"data: a\n\ndata: b")] == [b"a"]
    with pytest.raises(EventTooLarge):
        for _ in range(100):
            list(splitter.feed(b"x" * 100))
    assert splitter.pending == b""  # nothing kept
