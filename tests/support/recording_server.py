"""A real MCP server (official SDK, stdio) that records every tool call it receives.

Used by the crash test: each call's `n` argument is appended and fsync'd to the file named by
$RECORD_FILE before the answer is sent, so the test knows exactly which calls reached the upstream.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("recording-upstream")
_record = open(os.environ["RECORD_FILE"], "a", buffering=1)


@server.tool()
def open_session(n: str) -> str:
    """Record that call `n` reached the upstream."""
    _record.write(n + "\n")
    _record.flush()
    os.fsync(_record.fileno())
    return f"recorded {n}"


if __name__ == "__main__":
    server.run("stdio")
