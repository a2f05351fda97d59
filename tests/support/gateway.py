"""Run the real gateway (build_app from a real TOML config) in the test's event loop.

In-process so the clock can be injected (windows are tested by moving a fake clock,
never by sleeping across a window edge). The upstreams are real processes: stdio
servers are spawned by the gateway itself, HTTP servers come from fixtures.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.app import PROXY_KEY, build_app
from gateway.config import Config, load_config
from gateway.edge import App, HttpServer
from gateway.proxy import Proxy
from tests.support.procs import free_port

SEED_POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "open_session": {
            "limits": [{"counter": "open_session_rate", "window": "minute", "max": 10, "scope": "grant"}]
        }
    },
}


class FakeClock:
    """UTC seconds, moved by the test. Starts one second into a minute window."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else (time.time() // 60) * 60 + 1.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningGateway:
    base: str
    config: Config
    app: App
    keys: dict[str, str]
    clock: FakeClock
    runner: HttpServer
    extra: dict[str, Any] = field(default_factory=dict)

    def url(self, server: str) -> str:
        return f"{self.base}/mcp/{server}"

    @property
    def proxy(self) -> Proxy:
        return self.app[PROXY_KEY]

    def client(self, server: str, grant: str, **kwargs: Any) -> Client:
        """An official MCP SDK client talking Streamable HTTP to the gateway with grant's key."""
        http = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {self.keys[grant]}"},
            timeout=httpx2.Timeout(30.0, read=60.0),
        )
        kwargs.setdefault("mode", "legacy")
        return Client(streamable_http_client(self.url(server), http_client=http), **kwargs)


def toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def write_config(
    directory: Path,
    servers: dict[str, dict[str, Any]],
    policies: dict[str, dict[str, Any] | str],
    grants: dict[str, str],
    gateway: dict[str, Any] | None = None,
    agents: dict[str, str] | None = None,
    extra: str = "",
) -> Path:
    """Write policy files and a TOML config; servers[name] holds url or command/env."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[gateway]"]
    gw = {"listen": f"127.0.0.1:{free_port()}", "data_dir": str(directory / "data"), **(gateway or {})}
    lines += [f"{k} = {toml_value(v)}" for k, v in gw.items()]
    for name, srv in servers.items():
        pol = policies[name]
        path = directory / f"{name}.policy.json"
        path.write_text(pol if isinstance(pol, str) else json.dumps(pol))
        lines.append(f"\n[servers.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in srv.items()]
        lines.append(f'policy = "{path.name}"')
    for name, key in grants.items():
        lines.append(f"\n[grants.{name}]")
        lines.append(f"key = {json.dumps(key)}")
        if agents and name in agents:
            lines.append(f"agent = {json.dumps(agents[name])}")
    cfg = directory / "ledgergate.toml"
    cfg.write_text("\n".join(lines) + "\n" + extra)
    return cfg


@contextlib.asynccontextmanager
async def running_gateway(
    config_path: Path,
    keys: dict[str, str],
    clock: FakeClock | None = None,
    build: Callable[..., App] | None = None,
) -> AsyncIterator[RunningGateway]:
    cfg = load_config(config_path)
    clock = clock or FakeClock()
    app = (build or build_app)(cfg, clock=clock)
    runner = HttpServer(app, cfg.gateway.host, cfg.gateway.port)
    await runner.start()
    try:
        yield RunningGateway(f"http://{cfg.gateway.host}:{cfg.gateway.port}", cfg, app, keys, clock, runner)
    finally:
        await runner.close()


def start_gateway_process(
    config_path: Path, log_path: Path, env: dict[str, str] | None = None
) -> tuple[Any, str]:
    """`ledgergate run --config` as a separate process; (handle, base URL) once /healthz answers."""
    import sys

    from tests.support.procs import start_process, wait_http

    cfg = load_config(config_path)
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(config_path)], env=env, log_path=log_path
    )
    base = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    wait_http(f"{base}/healthz", timeout=60, handle=handle)
    return handle, base
