"""Session-scoped pytest fixtures for the real upstream MCP servers.

Installed by `scripts/install-upstreams.sh [--test]` under `.upstreams/` (what `make test` runs):

- `everything_server`    -> "http://127.0.0.1:PORT/mcp", the official "everything" reference server
                            (@modelcontextprotocol/server-everything, Streamable HTTP).
- `conformance_upstream` -> "http://127.0.0.1:PORT/mcp", tests/conformance/server/server.mjs (official
                            TypeScript SDK), which passes the conformance suite's 30 active scenarios.
- `whatsapp_command`     -> StdioCommand(argv, env) to spawn whatsapp-mcp-server over stdio (the gateway
                            under test spawns it; the fixture only checks that it is installed).

Each server runs on a free loopback port, logs to a file in a pytest tmp dir, is polled until ready,
and is stopped by PID (SIGTERM, then SIGKILL) at the end of the session.
Registered for the whole suite by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.procs import (
    ProcHandle,
    free_port,
    log_tail,
    start_process,
    stop_process,
    wait_http,
)

__all__ = [
    "REPO_ROOT",
    "UPSTREAMS_DIR",
    "StdioCommand",
    "conformance_upstream",
    "everything_server",
    "node_for_conformance_server",
    "start_http_server",
    "whatsapp_command",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
UPSTREAMS_DIR = REPO_ROOT / ".upstreams"  # where scripts/install-upstreams.sh installs

EVERYTHING_BIN = UPSTREAMS_DIR / "everything" / "node_modules" / ".bin" / "mcp-server-everything"
CONFORMANCE_SERVER_DIR = UPSTREAMS_DIR / "conformance-server"
CONFORMANCE_SERVER_SRC = REPO_ROOT / "tests" / "conformance" / "server" / "server.mjs"
WHATSAPP_BIN = UPSTREAMS_DIR / "whatsapp" / "bin" / "whatsapp-mcp"

READY_TIMEOUT = 60.0


class StdioCommand(NamedTuple):
    """How to spawn a stdio MCP server: argv, plus env vars to add to the spawning environment."""

    argv: list[str]
    env: dict[str, str]


def _missing(what: str, path: Path, flag: str = "") -> None:
    pytest.fail(
        f"{what} is not installed ({path} missing). Run `make test`, or install it with "
        f"`bash scripts/install-upstreams.sh{flag}` from the repo root.",
        pytrace=False,
    )


def start_http_server(
    argv_for_port: Callable[[int], tuple[Sequence[str], dict[str, str]]],
    log_dir: Path,
    name: str,
    path: str = "/mcp",
    attempts: int = 3,
) -> tuple[ProcHandle, str]:
    """Start an HTTP server on a free loopback port and wait until it answers; return (handle, url).

    `argv_for_port(port)` returns (argv, env). A server that dies before it is ready (e.g. the port
    was taken between free_port() and its bind) is retried on another port, up to `attempts` times.
    """
    last: Exception | None = None
    for i in range(attempts):
        port = free_port()
        argv, env = argv_for_port(port)
        handle = start_process(argv, env, log_dir / f"{name}-{i}.log")
        url = f"http://127.0.0.1:{port}{path}"
        try:
            wait_http(url, READY_TIMEOUT, handle=handle)
            return handle, url
        except (RuntimeError, TimeoutError) as e:
            stop_process(handle)
            last = e
    raise RuntimeError(f"{name} did not start after {attempts} attempts: {last}")


def node_for_conformance_server() -> str:
    """The `node` for the conformance server (node >= 18: the one on PATH, else .upstreams/node22)."""
    for cand in (shutil.which("node"), UPSTREAMS_DIR / "node22" / "node_modules" / ".bin" / "node"):
        if cand and Path(cand).exists():
            return str(cand)
    pytest.fail("no `node` on PATH; run `bash scripts/install-upstreams.sh --test`", pytrace=False)


@pytest.fixture(scope="session")
def everything_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a running @modelcontextprotocol/server-everything (streamableHttp): http://127.0.0.1:PORT/mcp."""
    if not EVERYTHING_BIN.exists():
        _missing("@modelcontextprotocol/server-everything", EVERYTHING_BIN)
    log_dir = tmp_path_factory.mktemp("everything")

    def argv(port: int) -> tuple[Sequence[str], dict[str, str]]:
        return [str(EVERYTHING_BIN), "streamableHttp"], {"PORT": str(port)}

    handle, url = start_http_server(argv, log_dir, "everything")
    try:
        yield url
    finally:
        stop_process(handle)


@pytest.fixture(scope="session")
def conformance_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the conformance upstream (tests/conformance/server/server.mjs): http://127.0.0.1:PORT/mcp."""
    sdk = CONFORMANCE_SERVER_DIR / "node_modules" / "@modelcontextprotocol" / "sdk"
    if not sdk.is_dir():
        _missing("the conformance server's deps", sdk, " --test")
    script = CONFORMANCE_SERVER_DIR / "server.mjs"
    # ESM resolves imports next to the file, so it runs from the install dir; keep it in step with
    # the source in tests/ when that was edited after the install.
    if CONFORMANCE_SERVER_SRC.exists() and (
        not script.exists() or script.read_bytes() != CONFORMANCE_SERVER_SRC.read_bytes()
    ):
        shutil.copyfile(CONFORMANCE_SERVER_SRC, script)
    node = node_for_conformance_server()
    log_dir = tmp_path_factory.mktemp("conformance-upstream")

    def argv(port: int) -> tuple[Sequence[str], dict[str, str]]:
        return [node, str(script)], {"PORT": str(port)}

    handle, url = start_http_server(argv, log_dir, "conformance-server")
    try:
        yield url
    finally:
        stop_process(handle)
        if handle.proc.returncode not in (0, -15, 143, None):
            print(f"conformance server exited {handle.proc.returncode}:\n{log_tail(handle)}")


@pytest.fixture(scope="session")
def whatsapp_command() -> StdioCommand:
    """argv + extra env to spawn whatsapp-mcp-server (stdio). Offline-safe dummy GreenAPI credentials."""
    if not (WHATSAPP_BIN.exists() and os.access(WHATSAPP_BIN, os.X_OK)):
        _missing("whatsapp-mcp-server", WHATSAPP_BIN)
    return StdioCommand(
        argv=[str(WHATSAPP_BIN)],
        env={"GREENAPI_ID_INSTANCE": "1101000001", "GREENAPI_API_TOKEN": "dummy"},
    )
