"""Baseline: the real upstream parts work on their own, without the gateway.

Uses the official `mcp` SDK (2.x) client. These are what the gateway tests compare against:
the everything server (Streamable HTTP), whatsapp-mcp-server (stdio), and the official
conformance suite run directly against the conformance upstream (30/30 expected).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from mcp import Client, StdioServerParameters
from mcp_types import TextContent

from tests.conformance.run_conformance import EXPECTED_ACTIVE, list_scenarios, run_scenarios, summary

if TYPE_CHECKING:  # importing it here would register the plugin module before pytest can rewrite it
    from tests.support.upstreams import StdioCommand

WHATSAPP_TOOLS = {"open_session", "send_message", "get_chats", "create_group", "get_group_participants"}


def _texts(result) -> list[str]:
    return [c.text for c in result.content if isinstance(c, TextContent)]


async def test_everything_server_lists_tools_and_echoes(everything_server: str) -> None:
    # mode="legacy": the initialize handshake (the 2.x default "auto" first probes server/discover).
    async with Client(everything_server, mode="legacy", read_timeout_seconds=30) as client:
        assert client.server_info is not None
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "echo" in tools, tools
        result = await client.call_tool("echo", {"message": "hello ledgergate"})
        assert not result.is_error
        assert _texts(result) == ["Echo: hello ledgergate"]


async def test_whatsapp_stdio_tools_and_open_session(whatsapp_command: StdioCommand) -> None:
    params = StdioServerParameters(
        command=whatsapp_command.argv[0], args=whatsapp_command.argv[1:], env=whatsapp_command.env
    )
    async with Client(params, mode="legacy", read_timeout_seconds=60) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert tools == WHATSAPP_TOOLS
        first = await client.call_tool("open_session", {})
        assert _texts(first) == ["Success: Session created successfully"]
        again = await client.call_tool("open_session", {})
        assert _texts(again) == ["Error: Session already exists"]
        assert not again.is_error  # its failures are plain text, isError false


def test_conformance_suite_lists_expected_scenarios() -> None:
    assert tuple(list_scenarios()) == EXPECTED_ACTIVE


@pytest.mark.conformance
def test_conformance_direct(conformance_upstream: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    outdir = tmp_path_factory.mktemp("conformance-direct")
    t0 = time.monotonic()
    results = run_scenarios(conformance_upstream, outdir)
    elapsed = time.monotonic() - t0
    print(f"\nconformance direct against {conformance_upstream} ({elapsed:.1f}s, results {outdir}):")
    print(summary(results))
    passed = {name for name, (ok, _) in results.items() if ok}
    assert passed == set(EXPECTED_ACTIVE), summary(results)
