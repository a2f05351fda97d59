"""Connect to ledgergate with the official MCP SDK and watch the seed policy at work.

usage: .venv/bin/python examples/client.py [URL] [KEY] [CALLS]
defaults: http://127.0.0.1:8080/mcp/whatsapp, the demo key of examples/ledgergate.toml, 12 calls
"""

import asyncio
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/mcp/whatsapp"
KEY = sys.argv[2] if len(sys.argv) > 2 else "lg-demo-key-change-me"
CALLS = int(sys.argv[3]) if len(sys.argv) > 3 else 12


async def main() -> None:
    # 30 s: the first call starts the WhatsApp server process behind the gateway
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30.0)
    async with Client(streamable_http_client(URL, http_client=http)) as client:
        tools = await client.list_tools()
        print("tools this key may call:", [t.name for t in tools.tools])
        for i in range(CALLS):
            result = await client.call_tool("open_session", {})
            print(f"open_session #{i + 1}: {'REFUSED ' if result.is_error else ''}{result.content[0].text}")
        result = await client.call_tool("send_message", {"phone_number": "+10000000000", "content": "hi"})
        print("send_message:", result.content[0].text)


asyncio.run(main())
