"""A hung stdio child is killed and replaced (issue 17, item 5).

Real children (tests/support/recording_stdio.py) that hang in the two ways the gateway can
see: one that answers nothing (its calls time out, N in a row), one that stops reading its
stdin (the bytes waiting for it pass a bound). Each time the calls in flight on the hung
child get a JSON-RPC error naming the upstream at once, and the next call is answered by a
fresh child (a new pid) with the handshake replayed. The record file (every line each child
read) shows what the children executed.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import (
    call,
    open_session,
    raw_post,
    recorded_calls,
    recording_stdio_server,
    sse_messages,
)

KEY = "key-hung-child-0123456789"
KEYS = {"qa": KEY}
POLICY = {"version": "1", "default": "allow", "tools": {}}


async def poll(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def pid_of(answer: dict[str, Any]) -> int:
    assert "result" in answer, answer
    return int(answer["result"]["content"][0]["text"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie until the gateway reaps it: that counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def tools_call(tool: str, args: dict[str, Any], rid: Any, meta: dict[str, Any] | None = None) -> bytes:
    params: dict[str, Any] = {"name": tool, "arguments": args}
    if meta:
        params["_meta"] = meta
    return orjson.dumps({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params})


def final(body: bytes, rid: Any) -> dict[str, Any]:
    return [m for m in sse_messages(body) if m.get("id") == rid][-1]


def assert_names_upstream(answer: dict[str, Any], *words: str) -> None:
    assert "error" in answer, answer
    err = answer["error"]
    assert "upstream 'rec'" in err["message"], err
    assert err["data"]["upstream"] == "rec", err
    for w in words:
        assert w in err["message"], err


async def gateway(tmp_path: Path, gateway: dict[str, Any], server: dict[str, Any] | None = None) -> Any:
    record = tmp_path / "record.log"
    cfg = write_config(
        tmp_path,
        servers={"rec": {**recording_stdio_server(record), **(server or {})}},
        policies={"rec": POLICY},
        grants=KEYS,
        gateway=gateway,
    )
    return running_gateway(cfg, KEYS, FakeClock()), record


def in_flight(gw: RunningGateway, n: int) -> Callable[[], bool]:
    def check() -> bool:
        proc = gw.proxy.upstreams["rec"].processes.get("qa")  # type: ignore[attr-defined]
        return proc is not None and len(proc.pending) >= n

    return check


async def test_a_child_that_answers_nothing_is_replaced_after_n_consecutive_timeouts(tmp_path: Path) -> None:
    ctx, record = await gateway(tmp_path, {"upstream_timeout_s": 1.0}, server={"max_consecutive_timeouts": 3})
    async with ctx as gw:
        sid = await open_session(gw, "rec", KEY)
        first = pid_of(await call(gw, "rec", KEY, sid, "pid", {}))

        # a long call that stays alive (progress every 0.2 s) while the hang calls time out
        slow: asyncio.Task[Any] = asyncio.create_task(
            raw_post(
                gw,
                "rec",
                KEY,
                tools_call("slow", {"seconds": 60, "every": 0.2}, "slow", {"progressToken": "p"}),
                sid,
            )
        )
        await poll(
            lambda: any(c["params"]["name"] == "slow" for c in recorded_calls(record)), "slow to start"
        )

        hangs = await asyncio.gather(
            *(raw_post(gw, "rec", KEY, tools_call("hang", {}, f"h{i}"), sid) for i in range(3))
        )
        for i, a in enumerate(hangs):
            assert_names_upstream(final(a.body, f"h{i}"), "did not answer within 1 s")

        # the third timeout in a row killed the child: the call still in flight on it gets an
        # error naming the upstream now (not after its own timeout, 60 s away)
        a = await asyncio.wait_for(slow, 10)
        assert a.status == 200
        msgs = sse_messages(a.body)
        assert any(m.get("method") == "notifications/progress" for m in msgs), msgs[:3]
        assert_names_upstream(final(a.body, "slow"), "killed and is being restarted", "3 calls in a row")
        assert final(a.body, "slow")["error"]["data"]["restarted"] is True

        # the next call is answered by a fresh child, initialized by the replayed handshake
        second = pid_of(await call(gw, "rec", KEY, sid, "pid", {}))
        assert second != first
        await poll(lambda: not alive(first), "the hung child to be gone")
        inits = [ln for ln in record.read_bytes().splitlines() if b'"initialize"' in ln]
        assert len(inits) == 2, inits
        # what the children executed: pid, slow, 3 hangs on the first; pid on the second
        assert [c["params"]["name"] for c in recorded_calls(record)] == [
            "pid",
            "slow",
            "hang",
            "hang",
            "hang",
            "pid",
        ]


async def test_an_answer_resets_the_consecutive_timeouts(tmp_path: Path) -> None:
    ctx, _ = await gateway(tmp_path, {"upstream_timeout_s": 1.0, "stdio_max_consecutive_timeouts": 2})
    async with ctx as gw:
        sid = await open_session(gw, "rec", KEY)
        first = pid_of(await call(gw, "rec", KEY, sid, "pid", {}))
        # timeout, answer, timeout: never two in a row, the child stays
        assert_names_upstream(await call(gw, "rec", KEY, sid, "hang", {}, rid=10), "did not answer")
        assert pid_of(await call(gw, "rec", KEY, sid, "pid", {})) == first
        assert_names_upstream(await call(gw, "rec", KEY, sid, "hang", {}, rid=11), "did not answer")
        # the second in a row (limit 2, from [gateway]): replaced
        assert_names_upstream(await call(gw, "rec", KEY, sid, "hang", {}, rid=12), "did not answer")
        assert pid_of(await call(gw, "rec", KEY, sid, "pid", {})) != first


async def test_a_child_that_stops_reading_stdin_is_replaced(tmp_path: Path) -> None:
    limit = 256 << 10
    ctx, record = await gateway(tmp_path, {"upstream_timeout_s": 30.0, "stdio_max_stdin_bytes": limit})
    async with ctx as gw:
        sid = await open_session(gw, "rec", KEY)
        first = pid_of(await call(gw, "rec", KEY, sid, "pid", {}))

        def post(body: bytes) -> Awaitable[Any]:
            return raw_post(gw, "rec", KEY, body, sid)

        hang = asyncio.create_task(post(tools_call("hang", {"stop_reading": True}, "hang")))
        await poll(lambda: any(c["params"]["name"] == "hang" for c in recorded_calls(record)), "hang read")
        big = "x" * 200_000
        # fills the pipe (64 KiB) and leaves ~136 KB waiting in the gateway: under the limit
        echo1 = asyncio.create_task(post(tools_call("echo", {"text": big}, "e1")))
        await poll(in_flight(gw, 2), "echo 1 written")
        # ~336 KB waiting: over the limit, the child is hung
        a2 = await asyncio.wait_for(post(tools_call("echo", {"text": big}, "e2")), 10)
        assert_names_upstream(final(a2.body, "e2"), "stopped reading its stdin")
        for task, rid in ((hang, "hang"), (echo1, "e1")):
            a = await asyncio.wait_for(task, 10)
            assert_names_upstream(
                final(a.body, rid), "killed and is being restarted", "stopped reading its stdin"
            )

        second = pid_of(await call(gw, "rec", KEY, sid, "pid", {}))
        assert second != first
        assert (await call(gw, "rec", KEY, sid, "echo", {"text": "after"}))["result"]["content"][0][
            "text"
        ] == "after"
        await poll(lambda: not alive(first), "the hung child to be gone")
        # neither big echo ever reached a child
        assert [c["params"]["name"] for c in recorded_calls(record)] == ["pid", "hang", "pid", "echo"]
