"""The agent-facing HTTP edge under hostile input: exact bytes over raw sockets against the real
gateway, asserting the answer AND what the (recording) HTTP upstream received."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.http.client import HIGH_WATER
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.recording_http import RecordingUpstream

KEY = "key-edge-0123456789"
ADMIN = "admin-token-0123456789"
INIT = orjson.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw"}},
    }
)
FAST = {"header_timeout_s": 0.5, "body_timeout_s": 0.5}

MakeGw = Callable[..., contextlib.AbstractAsyncContextManager[tuple[RunningGateway, RecordingUpstream]]]


@pytest.fixture
def make_gw(tmp_path: Path) -> MakeGw:
    @contextlib.asynccontextmanager
    async def make(**gateway: Any) -> AsyncIterator[tuple[RunningGateway, RecordingUpstream]]:
        up = await RecordingUpstream().start()
        cfg = write_config(
            tmp_path,
            servers={"rec": {"url": up.url}},
            policies={"rec": {"version": "1", "default": "allow"}},
            grants={"qa": KEY},
            gateway={"admin_token": ADMIN, **FAST, **gateway},
        )
        try:
            async with running_gateway(cfg, {"qa": KEY}, FakeClock()) as gw:
                yield gw, up
        finally:
            await up.close()

    return make


def request(
    method: str = "POST",
    path: str = "/mcp/rec",
    body: bytes | None = INIT,
    *,
    key: str | None = KEY,
    extra: bytes = b"",
    close: bool = True,
    version: bytes = b"HTTP/1.1",
) -> bytes:
    head = b"%s %s %s\r\nHost: 127.0.0.1\r\n" % (method.encode(), path.encode(), version)
    if key is not None:
        head += b"Authorization: Bearer %s\r\n" % key.encode()
    head += b"Accept: application/json, text/event-stream\r\n" + extra
    if body is not None:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + (body or b"")


async def connect(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(gw.config.gateway.host, gw.config.gateway.port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends until it closes (the safety timeout only bounds a failure)."""
    return await asyncio.wait_for(reader.read(), 20)


async def exchange(gw: RunningGateway, raw: bytes) -> bytes:
    reader, writer = await connect(gw)
    writer.write(raw)
    try:
        return await until_closed(reader)
    finally:
        writer.close()


def status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def header(answer: bytes, name: str) -> str | None:
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def body(answer: bytes) -> bytes:
    return answer.partition(b"\r\n\r\n")[2]


async def initialize(gw: RunningGateway) -> tuple[int, str | None, bytes]:
    answer = await exchange(gw, request())
    return status(answer), header(answer, "Mcp-Session-Id"), answer


# ---- timeouts -------------------------------------------------------------------------------


async def test_silent_and_half_head_connections_are_closed(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        silent_r, silent_w = await connect(gw)
        half_r, half_w = await connect(gw)
        half_w.write(b"POST /mcp/rec HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + KEY.encode())
        assert await until_closed(silent_r) == b""  # closed, nothing answered
        assert await until_closed(half_r) == b""
        silent_w.close()
        half_w.close()
        assert up.got == []


async def test_trickled_head_is_closed_before_it_completes(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        raw = request()
        reader, writer = await connect(gw)
        sent = 0
        with contextlib.suppress(ConnectionError):
            for i in range(len(raw)):
                if reader.at_eof():
                    break
                writer.write(raw[i : i + 1])
                await writer.drain()
                sent += 1
                await asyncio.sleep(0.05)  # pacing of the trickle, not a wait for readiness
        assert await until_closed(reader) == b""
        assert sent < len(raw) - len(INIT)  # closed while the head was still trickling in
        writer.close()
        assert up.got == []


async def test_stalled_body_gets_408_and_nothing_reaches_the_upstream(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        raw = request()
        reader, writer = await connect(gw)
        writer.write(raw[: len(raw) - len(INIT) + 10])  # the head and 10 bytes of the body
        answer = await until_closed(reader)
        writer.close()
        assert status(answer) == 408
        assert orjson.loads(body(answer))["error"] == "request_timeout"
        assert up.got == []


async def test_trickled_body_gets_408(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        raw = request()
        head_len = len(raw) - len(INIT)
        reader, writer = await connect(gw)
        writer.write(raw[:head_len])
        with contextlib.suppress(ConnectionError):
            for i in range(head_len, len(raw)):
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break  # the gateway answered
                writer.write(raw[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0.05)
        answer = await until_closed(reader)
        writer.close()
        assert status(answer) == 408
        assert up.got == []


# ---- caps -----------------------------------------------------------------------------------


async def test_connections_beyond_the_cap_get_503(make_gw: MakeGw) -> None:
    async with make_gw(max_connections=3) as (gw, up):
        held = []
        for _ in range(3):
            r, w = await connect(gw)
            w.write(request("GET", "/healthz", None, key=None, close=False))
            await r.readuntil(b'{"ok":true}')  # served, and kept alive
            held.append((r, w))
        answer = await exchange(gw, request("GET", "/healthz", None, key=None))
        assert status(answer) == 503
        assert header(answer, "Retry-After") == "1"
        assert orjson.loads(body(answer))["error"] == "busy"
        held[0][1].close()
        for _ in range(200):  # poll until the gateway saw the close
            answer = await exchange(gw, request("GET", "/healthz", None, key=None))
            if status(answer) == 200:
                break
            await asyncio.sleep(0.02)
        assert status(answer) == 200
        for _, w in held[1:]:
            w.close()
        assert up.got == []


async def test_sessions_per_grant_are_capped_with_429(make_gw: MakeGw) -> None:
    async with make_gw(max_sessions_per_grant=2) as (gw, up):
        first, sid, _ = await initialize(gw)
        second, _, _ = await initialize(gw)
        third, _, answer = await initialize(gw)
        assert (first, second, third) == (200, 200, 429)
        assert int(header(answer, "Retry-After") or 0) >= 1
        err = orjson.loads(body(answer))
        assert err["id"] == 1 and "max_sessions_per_grant" in err["error"]["message"]
        assert up.methods() == ["initialize", "initialize"]
        assert sid is not None
        deleted = await exchange(
            gw, request("DELETE", "/mcp/rec", None, extra=b"Mcp-Session-Id: %s\r\n" % sid.encode())
        )
        assert status(deleted) == 200
        again, _, _ = await initialize(gw)
        assert again == 200
        assert up.methods() == ["initialize", "initialize", "DELETE", "initialize"]


async def test_inflight_calls_per_grant_are_capped_with_429(make_gw: MakeGw) -> None:
    async with make_gw(max_inflight_per_grant=1) as (gw, up):
        _, sid, _ = await initialize(gw)
        assert sid is not None
        session = b"Mcp-Session-Id: %s\r\n" % sid.encode()

        def call(tool: str, rid: int) -> bytes:
            msg = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": tool}}
            return request(body=orjson.dumps(msg), extra=session)

        slow = asyncio.create_task(exchange(gw, call("slow", 2)))
        for _ in range(500):  # poll until the slow call reached the upstream
            if up.methods()[-1:] == ["tools/call"]:
                break
            await asyncio.sleep(0.01)
        busy = await exchange(gw, call("echo", 3))
        assert status(busy) == 429 and header(busy, "Retry-After") == "1"
        assert orjson.loads(body(busy))["error"]["message"].startswith("Too Many Requests")
        assert up.methods() == ["initialize", "tools/call"]  # the refused call never went up
        up.release.set()
        assert status(await slow) == 200
        assert status(await exchange(gw, call("echo", 4))) == 200
        assert up.methods() == ["initialize", "tools/call", "tools/call"]


# ---- header parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "version", "expected"),
    [
        (b"X-Long: " + b"a" * 8200 + b"\r\n", b"HTTP/1.1", 400),  # one line over 8 KiB
        (b"".join(b"X-%d: v\r\n" % i for i in range(100)), b"HTTP/1.1", 400),  # over 100 headers
        (b"Host: evil.example\r\n", b"HTTP/1.1", 400),  # a second Host
        (b"", b"HTTP/1.2", 505),
        (b"", b"HTTP/2.0", 505),
        (b"", b"HTTP/0.9", 505),
        (b"Expect: something-else\r\n", b"HTTP/1.1", 417),
    ],
    ids=["line-8k", "headers-100", "dup-host", "http-1.2", "http-2.0", "http-0.9", "expect-unknown"],
)
async def test_bad_heads_are_refused(make_gw: MakeGw, extra: bytes, version: bytes, expected: int) -> None:
    async with make_gw() as (gw, up):
        answer = await exchange(gw, request(extra=extra, version=version))
        assert status(answer) == expected
        assert up.got == []


async def test_a_header_line_under_the_limit_passes(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        answer = await exchange(gw, request(extra=b"X-Long: " + b"a" * 8000 + b"\r\n"))
        assert status(answer) == 200
        assert up.methods() == ["initialize"]
        assert "x-long" not in {k.lower() for k in up.got[0][1]}  # and it is not forwarded


async def test_a_long_chunk_extension_is_refused(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        head = request(body=None, extra=b"Expect: 100-continue\r\n")
        head = head.replace(b"Connection: close\r\n", b"Transfer-Encoding: chunked\r\n")
        reader, writer = await connect(gw)
        writer.write(head)
        # the 100 says the gateway is reading the body: what follows is counted as body framing
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"3;ext=" + b"e" * 8192)  # an 8 KiB extension on a 3-byte chunk
        answer = await until_closed(reader)
        writer.close()
        assert status(answer) == 400
        assert orjson.loads(body(answer))["message"] == "Bad Request: chunk extensions too long"
        assert up.got == []


async def test_100_continue_only_after_the_key_is_checked(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        expect = b"Expect: 100-continue\r\n"
        raw = request(extra=expect)
        head = raw[: len(raw) - len(INIT)]
        # a wrong key: 401 at once, never a 100 (the body is never sent)
        answer = await exchange(gw, head.replace(KEY.encode(), b"wrong-key-0000"))
        assert status(answer) == 401 and b"100 Continue" not in answer
        # GET: never a 100
        answer = await exchange(gw, request("GET", body=None, extra=expect))
        assert status(answer) == 400 and b"100 Continue" not in answer  # (no session)
        assert up.got == []
        # the right key: 100 Continue, then the body goes, then the answer
        reader, writer = await connect(gw)
        writer.write(head)
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert up.got == []
        writer.write(INIT)
        answer = await until_closed(reader)
        writer.close()
        assert status(answer) == 200
        assert up.methods() == ["initialize"]
        assert up.got[0][2] == INIT


# ---- HEAD, health, streams ------------------------------------------------------------------


async def test_head_never_reaches_the_upstream(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        _, sid, _ = await initialize(gw)
        assert sid is not None
        up.stream_bytes = 200 << 20
        answer = await exchange(
            gw, request("HEAD", body=None, extra=b"Mcp-Session-Id: %s\r\n" % sid.encode())
        )
        assert status(answer) == 405 and header(answer, "Allow") == "GET, POST, DELETE"
        assert body(answer) == b""
        unauth = await exchange(gw, request("HEAD", body=None, key=None))
        assert status(unauth) == 401 and body(unauth) == b""
        health = await exchange(gw, request("HEAD", "/healthz", None, key=None))
        assert status(health) == 200 and body(health) == b""
        assert up.methods() == ["initialize"] and up.streamed == 0


async def test_healthz_says_only_alive_and_details_need_the_admin_token(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, _):
        await initialize(gw)
        assert body(await exchange(gw, request("GET", "/healthz", None, key=None))) == b'{"ok":true}'
        assert status(await exchange(gw, request("GET", "/admin/health", None, key=None))) == 401
        assert status(await exchange(gw, request("GET", "/admin/health", None, key=KEY))) == 401
        detail = await exchange(gw, request("GET", "/admin/health", None, key=ADMIN))
        assert status(detail) == 200
        doc = orjson.loads(body(detail))
        assert doc["sessions"] == 1 and doc["servers"] == ["rec"]


async def test_get_stream_toward_a_slow_client_is_backpressured(make_gw: MakeGw) -> None:
    async with make_gw() as (gw, up):
        _, sid, _ = await initialize(gw)
        assert sid is not None
        up.stream_bytes = 1 << 30
        reader, writer = await connect(gw)
        writer.write(request("GET", body=None, extra=b"Mcp-Session-Id: %s\r\n" % sid.encode()))
        assert status(await reader.readuntil(b"\r\n\r\n")) == 200
        pool = gw.proxy.upstreams["rec"].pool  # type: ignore[attr-defined]
        for _ in range(2000):  # poll until the gateway stopped reading from the upstream
            paused = [c for c in pool._conns if c._paused]
            if paused:
                break
            await asyncio.sleep(0.01)
        assert paused, "the gateway never paused reading the upstream stream"
        held = paused[0].resp._size
        assert held <= HIGH_WATER + 256 * 1024  # what the gateway buffers for this stream
        stalled = up.streamed
        assert stalled < 256 << 20  # the upstream was held back by the kernel buffers
        await reader.readexactly(8 << 20)  # the client reads: the relay moves on
        for _ in range(2000):
            if up.streamed > stalled:
                break
            await asyncio.sleep(0.01)
        assert up.streamed > stalled
        writer.close()
