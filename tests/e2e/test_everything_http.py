"""End to end over a Streamable HTTP upstream: the official SDK client -> gateway -> the
`everything` reference server. Streams, progress and server-to-client requests pass through."""

from __future__ import annotations

import time
from pathlib import Path

import mcp_types as types
import pytest

from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config

KEYS = {"ops": "key-ops-0123456789"}
POLICY = {
    "version": "1",
    "default": "allow",
    "tools": {
        "get-env": {"action": "deny", "reason": "environment variables may hold secrets"},
        "echo": {"limits": [{"counter": "echo_rate", "window": "hour", "max": 3, "scope": "session"}]},
        "get-sum": {"arguments": {"type": "object", "properties": {"a": {"type": "number", "maximum": 100}}}},
    },
}


@pytest.fixture
async def gw(tmp_path: Path, everything_server: str):
    cfg = write_config(
        tmp_path,
        servers={"everything": {"url": everything_server}},
        policies={"everything": POLICY},
        grants=KEYS,
    )
    async with running_gateway(cfg, KEYS, FakeClock()) as g:
        yield g


async def test_initialize_and_calls_pass_through(gw: RunningGateway) -> None:
    async with gw.client("everything", "ops") as c:
        assert c.server_info is not None and c.server_info.name
        r = await c.call_tool("echo", {"message": "hi there"})
        assert not r.is_error
        assert r.content[0].text == "Echo: hi there"
        r = await c.call_tool("get-sum", {"a": 2, "b": 3})
        assert "5" in r.content[0].text
        assert (await c.send_ping()) is not None
        resources = await c.list_resources()
        assert resources.resources
        prompts = await c.list_prompts()
        assert prompts.prompts


async def test_explicit_deny_with_reason_and_list_filtering(gw: RunningGateway) -> None:
    async with gw.client("everything", "ops") as c:
        names = [t.name for t in (await c.list_tools()).tools]
        assert "get-env" not in names and "echo" in names and "get-sum" in names
        r = await c.call_tool("get-env", {})
        assert r.is_error
        assert r.content[0].text == (
            "Refused by policy: environment variables may hold secrets [rule /tools/get-env/action]"
        )


async def test_argument_validation_refuses_before_the_upstream(gw: RunningGateway) -> None:
    async with gw.client("everything", "ops") as c:
        r = await c.call_tool("get-sum", {"a": 1000, "b": 1})
        assert r.is_error
        assert r.structured_content["decision"] == "invalid_arguments"
        assert r.structured_content["rule"] == "/tools/get-sum/arguments"


async def test_session_scope_counts_per_session(gw: RunningGateway) -> None:
    async with gw.client("everything", "ops") as c1, gw.client("everything", "ops") as c2:
        assert [(await c1.call_tool("echo", {"message": "x"})).is_error for _ in range(4)] == [
            False,
            False,
            False,
            True,
        ]
        assert not (await c2.call_tool("echo", {"message": "x"})).is_error


async def test_progress_notifications_arrive_while_the_tool_runs(gw: RunningGateway) -> None:
    seen: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((time.monotonic(), progress))

    async with gw.client("everything", "ops") as c:
        start = time.monotonic()
        r = await c.call_tool(
            "trigger-long-running-operation", {"duration": 2, "steps": 4}, progress_callback=on_progress
        )
        end = time.monotonic()
    assert not r.is_error
    assert [p for _, p in seen] == [1, 2, 3, 4]
    # streamed, not buffered: the first step arrived in the first half of the call
    assert seen[0][0] - start < (end - start) / 2


async def test_sampling_request_from_the_server_reaches_the_client(gw: RunningGateway) -> None:
    asked: list[str] = []

    async def sampling(ctx, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="42"),
            model="test-model",
            stop_reason="endTurn",
        )

    async with gw.client("everything", "ops", sampling_callback=sampling) as c:
        r = await c.call_tool("trigger-sampling-request", {"prompt": "meaning of life?"})
    assert asked and "meaning of life?" in asked[0]
    assert not r.is_error
    assert "42" in str(r.content)
