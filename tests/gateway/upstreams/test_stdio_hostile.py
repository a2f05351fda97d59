"""Hostile input toward a stdio upstream: one client message reaches the child as exactly one line.

A real stdio MCP server (tests/support/recording_stdio.py) records every raw line it reads;
the requests are exact bytes over a raw socket. The child splits lines at LF, CR and CRLF
(the most permissive framing), so any smuggled line break would show up as a line.
"""

from __future__ import annotations

import asyncio
import re
import resource
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.upstreams.stdio import StdioUpstream
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import (
    call,
    mcp_head,
    open_session,
    raw_post,
    recorded,
    recorded_calls,
    recording_stdio_server,
    sync_point,
)

KEY = "key-hostile-0123456789"
KEY2 = "key-other-grant-0123456789"
KEYS = {"qa": KEY, "other": KEY2}
LIMIT = 10
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "echo": {},
        "flood": {},
        "ask": {},
        "counter": {"limits": [{"counter": "c", "window": "minute", "max": LIMIT, "scope": "grant"}]},
        "delete_everything": {"action": "deny", "reason": "never"},
    },
}
ALLOWED_TOOLS = {"echo", "flood", "ask", "counter"}


@pytest.fixture
async def gw(tmp_path: Path):
    record = tmp_path / "record.log"
    cfg = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record)},
        policies={"rec": POLICY},
        grants=KEYS,
        gateway={"upstream_timeout_s": 30.0},
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g:
        g.extra["record"] = record
        yield g


def lines_since(gw: RunningGateway, n: int) -> list[bytes]:
    return recorded(gw.extra["record"])[n:]


# ---- A: the smuggled tools/call, exact bytes ---------------------------------------------------

SMUGGLED_DELETE = (
    b'{"jsonrpc":"2.0","method":"notifications/progress",'
    b'"params":{"progressToken":1,"progress":1},"pad":\n'
    b'{"jsonrpc":"2.0","id":99,"method":"tools/call","params":{"name":"delete_everything","arguments":{}}}'
    b"\n}"
)


async def test_smuggled_tools_call_in_a_notification_never_runs(gw: RunningGateway) -> None:
    sid = await open_session(gw, "rec", KEY)
    before = len(recorded(gw.extra["record"]))
    answer = await raw_post(gw, "rec", KEY, SMUGGLED_DELETE, sid)
    assert answer.status == 202
    await sync_point(gw, "rec", KEY, sid)
    got = lines_since(gw, before)
    # one line for the notification (re-serialised, its extra member dropped), one for the ping
    assert len(got) == 2, got
    assert orjson.loads(got[0]) == {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": 1},
    }
    assert recorded_calls(gw.extra["record"]) == []


@pytest.mark.parametrize("sep", [b"\n", b"\r", b"\r\n"])
async def test_smuggled_tools_call_in_a_response_is_refused(gw: RunningGateway, sep: bytes) -> None:
    sid = await open_session(gw, "rec", KEY)
    before = len(recorded(gw.extra["record"]))
    body = (
        b'{"jsonrpc":"2.0","id":"srv-1","result":{"x":'
        + sep
        + b'{"jsonrpc":"2.0","id":98,"method":"tools/call","params":{"name":"delete_everything"}}'
        + sep
        + b"}}"
    )
    answer = await raw_post(gw, "rec", KEY, body, sid)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == -32600
    assert "no request with id" in answer.json()["error"]["message"]
    await sync_point(gw, "rec", KEY, sid)
    assert len(lines_since(gw, before)) == 1  # the sync ping only
    assert recorded_calls(gw.extra["record"]) == []


async def test_smuggled_calls_do_not_bypass_the_rate_limit(gw: RunningGateway) -> None:
    sid = await open_session(gw, "rec", KEY)
    for i in range(15):
        body = (
            b'{"jsonrpc":"2.0","method":"notifications/roots/list_changed","params":{"p":\r\n'
            + orjson.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": 500 + i,
                    "method": "tools/call",
                    "params": {"name": "counter", "arguments": {"n": i}},
                }
            )
            + b"\r\n}}"
        )
        assert (await raw_post(gw, "rec", KEY, body, sid)).status == 202
    await sync_point(gw, "rec", KEY, sid)
    assert recorded_calls(gw.extra["record"]) == []
    # the whole quota is still there: 10 calls pass, the 11th is rate limited
    for i in range(LIMIT):
        r = await call(gw, "rec", KEY, sid, "counter", {"n": i}, rid=i + 1)
        assert r["result"]["content"][0]["text"] == str(i)
    r = await call(gw, "rec", KEY, sid, "counter", {"n": 99}, rid=99)
    assert r["result"]["isError"] is True
    assert r["result"]["structuredContent"]["decision"] == "rate_limited"
    assert [c["params"]["arguments"]["n"] for c in recorded_calls(gw.extra["record"])] == list(range(LIMIT))


# ---- A: responses only for the session's own server-to-client requests --------------------------


async def _ask(
    gw: RunningGateway, sid: str, rid: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Start the `ask` tool on a streamed call; return the open connection and the child's request id."""
    host, port = gw.base.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    body = orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {"name": "ask"}})
    writer.write(mcp_head(gw, "rec", KEY, sid) + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    buf = b""
    while b'"method":"ping"' not in buf:
        chunk = await reader.read(65536)
        assert chunk, buf
        buf += chunk
    srv_id = orjson.loads(buf.split(b"data: ", 1)[1].split(b"\n", 1)[0])["id"]
    return reader, writer, srv_id


async def _read_until(reader: asyncio.StreamReader, needle: bytes) -> bytes:
    buf = b""
    while needle not in buf:
        chunk = await reader.read(65536)
        assert chunk, buf
        buf += chunk
    return buf


async def test_a_response_is_forwarded_only_from_the_session_that_got_the_request(gw: RunningGateway) -> None:
    a = await open_session(gw, "rec", KEY)
    b = await open_session(gw, "rec", KEY)  # same grant: the same child
    reader, writer, srv_id = await _ask(gw, a, 7)
    try:
        before = len(recorded(gw.extra["record"]))
        answer = orjson.dumps({"jsonrpc": "2.0", "id": srv_id, "result": {"from": "b"}})
        r = await raw_post(gw, "rec", KEY, answer, b)  # another session answers: refused
        assert r.status == 400 and r.json()["error"]["code"] == -32600
        forged = orjson.dumps({"jsonrpc": "2.0", "id": "srv-999", "result": {}})
        r = await raw_post(gw, "rec", KEY, forged, a)  # an id the gateway never delivered: refused
        assert r.status == 400
        both = b'{"jsonrpc":"2.0","id":"%s","result":{},"error":{"code":1,"message":"x"}}' % srv_id.encode()
        r = await raw_post(gw, "rec", KEY, both, a)  # not a response shape: refused
        assert r.status == 400
        await sync_point(gw, "rec", KEY, b)
        assert len(lines_since(gw, before)) == 1  # only the sync ping reached the child
        # the right session answers: forwarded once, and the tool completes with that answer
        r = await raw_post(
            gw, "rec", KEY, orjson.dumps({"jsonrpc": "2.0", "id": srv_id, "result": {"from": "a"}}), a
        )
        assert r.status == 202
        out = await _read_until(reader, b'"id":7')
        events = [orjson.loads(d) for d in re.findall(rb"data: (\{.*?\})\n", out)]
        final = [m for m in events if m.get("id") == 7]
        assert final and 'client answered: {"from": "a"}' in final[0]["result"]["content"][0]["text"]
        # a second answer to the same request is refused (one answer per request)
        r = await raw_post(gw, "rec", KEY, answer, a)
        assert r.status == 400
    finally:
        writer.close()


async def test_cancelled_only_cancels_the_sessions_own_calls(gw: RunningGateway) -> None:
    a = await open_session(gw, "rec", KEY)
    b = await open_session(gw, "rec", KEY)
    _, writer, _ = await _ask(gw, a, 11)
    try:
        before = len(recorded(gw.extra["record"]))
        cancel = b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":11}}'
        assert (await raw_post(gw, "rec", KEY, cancel, b)).status == 202  # b has no call 11
        await sync_point(gw, "rec", KEY, b)
        assert len(lines_since(gw, before)) == 1  # the ping only: nothing cancelled a's call
        assert (await raw_post(gw, "rec", KEY, cancel, a)).status == 202
        await sync_point(gw, "rec", KEY, a)
        got = [orjson.loads(x) for x in lines_since(gw, before)[1:]]
        assert got[0]["method"] == "notifications/cancelled"
        assert got[0]["params"]["requestId"] != 11  # mapped to the gateway's id of a's call
    finally:
        writer.close()


# ---- A: property: any legal whitespace, one message, one line -------------------------------------

WS = st.text(alphabet=" \t\n\r", max_size=3)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
# a tools/call of the denied tool, nested as a value: raw line breaks around it would put it
# on a line of its own if client bytes reached the child
SMUGGLE = st.just(
    {"jsonrpc": "2.0", "id": 4242, "method": "tools/call", "params": {"name": "delete_everything"}}
)
VALUES = st.recursive(
    SCALARS | SMUGGLE,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
PARAMS = st.dictionaries(st.text(max_size=8), VALUES, max_size=3)


def dump(value: Any, draw: Any) -> bytes:
    """JSON text of `value` with hypothesis-chosen legal whitespace between every two tokens."""
    w = lambda: draw(WS).encode()  # noqa: E731
    if isinstance(value, dict):
        if not value:
            return b"{" + w() + b"}"
        items = [w() + orjson.dumps(k) + w() + b":" + w() + dump(v, draw) + w() for k, v in value.items()]
        return b"{" + b",".join(items) + b"}"
    if isinstance(value, list):
        if not value:
            return b"[" + w() + b"]"
        return b"[" + b",".join(w() + dump(v, draw) + w() for v in value) + b"]"
    return orjson.dumps(value)


@st.composite
def hostile_message(draw: Any) -> tuple[dict[str, Any], int]:
    """(message, lines the child must read for it)."""
    kind = draw(st.sampled_from(["notification", "response", "call_ok", "call_denied", "ping", "call_note"]))
    params = draw(PARAMS)
    if kind == "notification":
        method = draw(
            st.sampled_from(["notifications/progress", "notifications/roots/list_changed", "notifications/x"])
        )
        return {"jsonrpc": "2.0", "method": method, "params": params}, 1
    if kind == "response":  # answers nothing the gateway delivered: refused
        return {
            "jsonrpc": "2.0",
            "id": draw(st.integers(0, 10**6) | st.text(max_size=5)),
            "result": params,
        }, 0
    if kind == "call_note":  # tools/call as a notification: refused
        return {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "echo", "arguments": params}}, 0
    if kind == "ping":
        return {"jsonrpc": "2.0", "id": draw(st.integers(1, 10**6)), "method": "ping", "params": params}, 1
    name = "echo" if kind == "call_ok" else "delete_everything"
    args = {"text": draw(st.text(max_size=10)), **params}
    return {
        "jsonrpc": "2.0",
        "id": draw(st.integers(1, 10**6)),
        "method": "tools/call",
        "params": {"name": name, "arguments": args},
    }, int(kind == "call_ok")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_any_legal_whitespace_reaches_the_child_as_one_line(
    gw: RunningGateway, data: st.DataObject
) -> None:
    if "sid" not in gw.extra:
        gw.extra["sid"] = await open_session(gw, "rec", KEY)
    sid = gw.extra["sid"]
    msg, expected = data.draw(hostile_message())
    body = data.draw(WS).encode() + dump(msg, data.draw) + data.draw(WS).encode()
    assert orjson.loads(body) == msg  # the body is valid JSON and means exactly msg
    before = len(recorded(gw.extra["record"]))
    answer = await raw_post(gw, "rec", KEY, body, sid)
    assert answer.status < 500, answer
    await sync_point(gw, "rec", KEY, sid)
    got = lines_since(gw, before)
    assert len(got) == expected + 1, (body, got)
    for line in got:
        assert isinstance(orjson.loads(line), dict)
    if expected:
        assert orjson.loads(got[0]).get("params") == msg.get("params")
    # the only thing the child may execute is what the policy allowed
    for c in recorded_calls(gw.extra["record"]):
        assert c["params"]["name"] in ALLOWED_TOOLS, c


# ---- C: memory bounded toward clients that do not read -------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


async def _stalled_post(
    gw: RunningGateway, sid: str, body: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """POST on a socket whose receive buffer is tiny and never read: a client that does not read."""
    import socket

    host, port = gw.base.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.transport.pause_reading()  # never read what the gateway sends
    writer.write(mcp_head(gw, "rec", KEY, sid) + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return reader, writer


async def _wait_for(pred: Any, what: str) -> None:
    """Poll a condition of the gateway's objects (not a timed wait); fail after 60 s."""
    try:
        async with asyncio.timeout(60.0):
            while not pred():  # noqa: ASYNC110 - the objects have no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_a_client_that_does_not_read_its_call_stream_is_disconnected(gw: RunningGateway) -> None:
    up = gw.proxy.upstreams["rec"]
    assert isinstance(up, StdioUpstream)
    up.queue_bytes = 1 << 20  # well above one pipe read (256 KiB): a client that reads keeps up
    sid = await open_session(gw, "rec", KEY)
    other = await open_session(gw, "rec", KEY2)  # another grant: another child
    same = await open_session(gw, "rec", KEY)  # the same child
    rss0 = rss_bytes()
    flood = orjson.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "flood", "arguments": {"count": 1500, "size": 65536}},
        }
    )
    _, writer = await _stalled_post(gw, sid, flood)
    proc = up.processes["qa"]
    await _wait_for(
        lambda: any(p.session is not None and p.session.id == sid for p in proc.pending.values()), "the call"
    )
    pending = next(p for p in proc.pending.values() if p.session is not None and p.session.id == sid)
    queue = pending.queue
    peak = 0
    while not queue.overflowed:
        peak = max(peak, queue.nbytes)
        await asyncio.sleep(0)
    assert queue.overflowed
    assert queue.nbytes <= up.queue_bytes, queue.nbytes
    assert peak <= up.queue_bytes
    # the stalled client was disconnected (its call ended and was cancelled in the child),
    # and other sessions still get answers
    await _wait_for(lambda: pending not in proc.pending.values(), "the call to end")
    await _wait_for(
        lambda: any(b"notifications/cancelled" in x for x in recorded(gw.extra["record"])), "the cancel"
    )
    sent = [orjson.loads(x) for x in recorded(gw.extra["record"]) if b"notifications/cancelled" in x]
    assert sent[-1]["params"]["requestId"] == next(c for c in recorded_calls(gw.extra["record"]))["id"]
    r = await call(gw, "rec", KEY2, other, "echo", {"text": "hi"}, rid=5)
    assert r["result"]["content"][0]["text"] == "hi"
    await sync_point(gw, "rec", KEY, same)
    grew = rss_bytes() - rss0
    assert grew < 48 * 1024 * 1024, f"the gateway grew by {grew / 1e6:.1f} MB"
    writer.close()


async def test_a_client_that_does_not_read_its_get_stream_is_disconnected(gw: RunningGateway) -> None:
    up = gw.proxy.upstreams["rec"]
    assert isinstance(up, StdioUpstream)
    up.queue_bytes = 1 << 20  # well above one pipe read (256 KiB): a client that reads keeps up
    slow = await open_session(gw, "rec", KEY)
    worker = await open_session(gw, "rec", KEY)
    import socket

    host, port = gw.base.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    _, writer = await asyncio.open_connection(sock=sock)
    writer.transport.pause_reading()
    writer.write(
        b"GET /mcp/rec HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
        b"Accept: text/event-stream\r\n"
        b"Mcp-Session-Id: %s\r\n\r\n" % (KEY.encode(), slow.encode())
    )
    session = gw.proxy.sessions.get(slow)
    assert session is not None
    state = up.state(session)
    await _wait_for(lambda: state.get_queue is not None, "the GET stream")
    queue = state.get_queue
    assert queue is not None
    # answered first, then 400 x 64 KB with no call in flight: they go to the GET streams
    r = await call(gw, "rec", KEY, worker, "flood", {"count": 400, "size": 65536, "after": True}, rid=3)
    assert r["result"]["content"][0]["text"] == "flooding"
    await _wait_for(lambda: queue.overflowed, "the overflow")
    assert queue.nbytes <= up.queue_bytes
    await _wait_for(lambda: state.get_queue is None and session.active == 0, "the disconnect")
    await sync_point(gw, "rec", KEY, worker)
    writer.close()
