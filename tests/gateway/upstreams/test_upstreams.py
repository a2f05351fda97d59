"""The two transports on their own, against real upstreams: a real stdio child
(tests/support/recording_stdio.py) and a recording aiohttp upstream. No proxy: what each
transport forwards, and the UpstreamReply it returns (it writes no agent answer)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from gateway.auth import Grant
from gateway.mcp import jsonrpc
from gateway.mcp.sessions import Session, new_session_id
from gateway.upstreams.base import Event, Inbound, Refused, UpstreamFailed
from gateway.upstreams.http import HttpUpstream
from gateway.upstreams.stdio import StdioUpstream
from tests.support.clickhouse import free_port
from tests.support.hostile import RECORDING_STDIO, RecordingHttp, recorded

GRANT = Grant("qa", "agent-qa", b"q" * 32)
INIT = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}}


def inbound(msg: dict[str, Any] | None, **headers: str) -> Inbound:
    h = CIMultiDict({"Accept": "application/json, text/event-stream", "Content-Type": "application/json"})
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return Inbound(msg, h)


def new_session() -> Session:
    return Session(id=new_session_id(), server="rec", grant=GRANT)


def tool_call(rid: Any, name: str, **args: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": name, "arguments": args}}


@pytest.fixture
async def stdio(tmp_path: Path) -> AsyncIterator[tuple[StdioUpstream, Path]]:
    record = tmp_path / "record"
    up = StdioUpstream(
        "rec", [sys.executable, str(RECORDING_STDIO)], {"RECORD_FILE": str(record)}, None, 30.0
    )
    try:
        yield up, record
    finally:
        await up.close()


async def events_of(reply: Any) -> list[Event]:
    try:
        return [ev async for ev in reply.events]
    finally:
        reply.release()


async def test_stdio_answers_with_one_message_and_the_child_sees_only_gateway_ids(stdio) -> None:
    up, record = stdio
    s = new_session()
    reply = await up.request(inbound(INIT), s, True)
    assert reply.sent and reply.status == 200 and reply.events is None
    assert reply.message is not None and reply.message["id"] == 0 and "result" in reply.message
    await up.send(inbound({"jsonrpc": "2.0", "method": "notifications/initialized"}), s)
    reply = await up.request(inbound(tool_call("client-7", "echo", text="hi")), s, False)
    assert reply.message == {
        "jsonrpc": "2.0",
        "id": "client-7",  # the child's answer is mapped back to the agent's own id
        "result": {"content": [{"type": "text", "text": "hi"}], "isError": False},
    }
    lines = [orjson.loads(x) for x in recorded(record)]
    assert [m.get("method") for m in lines] == ["initialize", "notifications/initialized", "tools/call"]
    assert "client-7" not in {m.get("id") for m in lines}  # process-unique ids go to the child
    assert not up.processes["qa"].pending  # nothing left in flight


async def test_stdio_second_session_gets_the_cached_initialize_without_sending(stdio) -> None:
    up, record = stdio
    first = new_session()
    await up.request(inbound(INIT), first, True)
    await up.send(inbound({"jsonrpc": "2.0", "method": "notifications/initialized"}), first)
    n = len(recorded(record))
    reply = await up.request(inbound({**INIT, "id": "again"}), new_session(), True)
    assert not reply.sent and reply.message is not None and reply.message["id"] == "again"
    assert len(recorded(record)) == n  # the child was not asked again


async def test_stdio_streams_intermediate_messages_then_the_final_answer(stdio) -> None:
    up, _ = stdio
    s = new_session()
    await up.request(inbound(INIT), s, True)
    reply = await up.request(inbound(tool_call(5, "flood", count=3, size=10)), s, False)
    assert reply.events is not None and reply.headers["Content-Type"] == "text/event-stream"
    evs = await events_of(reply)
    assert [e.final for e in evs] == [False, False, False, True]
    assert [e.message["method"] for e in evs[:3]] == ["notifications/message"] * 3  # type: ignore[index]
    assert evs[-1].message is not None and evs[-1].message["id"] == 5
    assert all(e.raw is None for e in evs)  # the proxy frames them
    assert not up.processes["qa"].pending


async def test_stdio_json_only_client_gets_only_the_final_answer(stdio) -> None:
    up, _ = stdio
    s = new_session()
    await up.request(inbound(INIT), s, True)
    reply = await up.request(
        inbound(tool_call(6, "flood", count=3, size=10), Accept="application/json"), s, False
    )
    assert reply.events is None and reply.message is not None
    assert reply.message["result"]["content"][0]["text"] == "flooded"


async def test_stdio_refuses_a_response_to_a_request_it_never_sent_that_session(stdio) -> None:
    up, record = stdio
    s = new_session()
    await up.request(inbound(INIT), s, True)
    n = len(recorded(record))
    with pytest.raises(Refused) as err:
        await up.send(inbound({"jsonrpc": "2.0", "id": "srv-1", "result": {}}), s)
    assert err.value.status == 400 and "awaiting an answer" in err.value.message
    assert len(recorded(record)) == n


async def test_stdio_close_session_ends_its_get_stream(stdio) -> None:
    up, _ = stdio
    s = new_session()
    await up.request(inbound(INIT), s, True)
    reply = await up.open_stream(inbound(None), s)
    assert up.state(s).get_queue is not None
    with pytest.raises(Refused) as err:  # one GET stream per session
        await up.open_stream(inbound(None), s)
    assert err.value.status == 409
    up.close_session(s, "deleted")
    assert await events_of(reply) == []  # the stream ends
    assert s not in up.processes["qa"].sessions


async def test_stdio_a_command_that_cannot_start_fails_unsent(tmp_path: Path) -> None:
    up = StdioUpstream("gone", [str(tmp_path / "no-such-binary")], {}, None, 5.0)
    try:
        with pytest.raises(UpstreamFailed) as err:
            await up.request(inbound(INIT), new_session(), True)
        assert not err.value.sent and err.value.code == jsonrpc.UPSTREAM_UNAVAILABLE
        assert err.value.data == {"upstream": "gone"}
    finally:
        await up.close()


@pytest.fixture
async def http() -> AsyncIterator[tuple[HttpUpstream, RecordingHttp]]:
    rec = RecordingHttp()
    await rec.start(free_port())
    up = HttpUpstream("rec", rec.url, 10.0)
    try:
        yield up, rec
    finally:
        await up.close()
        await rec.stop()


async def test_http_returns_the_body_as_received_and_the_upstream_session(http) -> None:
    up, rec = http
    s = new_session()
    reply = await up.request(inbound(INIT, Authorization="Bearer secret", Cookie="c=1"), s, True)
    assert reply.status == 200 and reply.upstream_session == "up-1" and reply.sent
    assert orjson.loads(reply.body or b"")["result"]["serverInfo"]["name"] == "recording-http"
    assert "mcp-session-id" not in {k.lower() for k in reply.headers}  # the proxy maps session ids
    s.upstream_session = reply.upstream_session
    await up.request(inbound(tool_call(1, "echo")), s, False)
    _, headers, body = rec.seen[-1]
    assert headers["Mcp-Session-Id"] == "up-1"
    assert not {"authorization", "cookie"} & {k.lower() for k in headers}  # the agent's key stays here
    assert orjson.loads(body) == tool_call(1, "echo")


async def test_http_forwards_the_parsed_message_never_the_agents_bytes(http) -> None:
    up, rec = http
    msg = {"jsonrpc": "2.0", "id": 2, "method": "ping", "extra": "dropped"}
    await up.request(inbound(msg), new_session(), False)
    assert rec.seen[-1][2] == b'{"jsonrpc":"2.0","id":2,"method":"ping"}'


async def test_http_refuses_an_unsendable_header_and_sends_nothing(http) -> None:
    up, rec = http
    with pytest.raises(Refused) as err:
        await up.request(inbound(tool_call(1, "echo"), User_Agent="a\nb"), new_session(), False)
    assert err.value.status == 400 and "user-agent" in err.value.message
    assert rec.seen == []


async def test_http_headers_follow_each_call_though_the_block_is_cached(http) -> None:
    """The header block is cached per (agent values, upstream session): a changed value, a
    new upstream session or a traceparent reaches the upstream; a refused value stays refused."""
    up, rec = http
    s = new_session()
    s.upstream_session = "up-a"
    await up.request(inbound(tool_call(1, "echo"), User_Agent="ua-1"), s, False)
    await up.request(inbound(tool_call(2, "echo"), User_Agent="ua-1"), s, False)
    await up.request(inbound(tool_call(3, "echo"), User_Agent="ua-2"), s, False)
    s.upstream_session = "up-b"
    await up.request(inbound(tool_call(4, "echo"), User_Agent="ua-2"), s, False)
    traced = inbound(tool_call(5, "echo"), User_Agent="ua-2")
    traced.traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await up.request(traced, s, False)
    lowered = [{k.lower(): v for k, v in h.items()} for _, h, _ in rec.seen]
    seen = [(h.get("user-agent"), h.get("mcp-session-id"), h.get("traceparent")) for h in lowered]
    assert seen == [
        ("ua-1", "up-a", None),
        ("ua-1", "up-a", None),
        ("ua-2", "up-a", None),
        ("ua-2", "up-b", None),
        ("ua-2", "up-b", traced.traceparent),
    ]
    for _ in range(2):  # refused each time, never cached
        with pytest.raises(Refused):
            await up.request(inbound(tool_call(6, "echo"), User_Agent="a\rb"), s, False)
    assert len(rec.seen) == 5


async def test_http_unreachable_is_an_unsent_failure() -> None:
    up = HttpUpstream("down", f"http://127.0.0.1:{free_port()}/mcp", 5.0)
    try:
        with pytest.raises(UpstreamFailed) as err:
            await up.request(inbound(tool_call(1, "echo")), new_session(), False)
        assert not err.value.sent and err.value.code == jsonrpc.UPSTREAM_UNAVAILABLE
    finally:
        await up.close()


async def test_http_non_post_answers_are_relayed_whole(http) -> None:
    up, _ = http
    reply = await up.open_stream(inbound(None, Accept="text/event-stream"), new_session())
    assert reply.status == 405 and reply.events is None
    reply = await up.delete(inbound(None), new_session())
    assert reply.status == 405
