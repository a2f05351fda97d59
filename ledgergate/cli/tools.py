"""`ledgergate tools [--config FILE] [--server NAME] [--format table|json]`: every upstream's
inventory as the gateway's policy sees it.

For each configured server, its tools come from a LIVE tools/list: this command starts the
configured upstream itself for a moment (a stdio server: its command, with its env and cwd;
an HTTP server: initialize + tools/list at its url), whether or not a gateway runs, so the
answer is what the upstream says now under the config FILE given (which may be a
candidate, not the running one). Per tool: its risk class and level (from its MCP
annotations, else its name and description; the policy's override wins), the effective rule
(the JSON Pointer decide() would use: the tool's rule, its risk class's defaults, or
/default), the action (allow / deny / approve, and shadow) and its limits.
Exit codes: 0 ok, 2 bad config or policy, 3 an upstream could not be listed (the others
are still printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from typing import Any

import aiohttp
import orjson

from gateway.config import Config
from gateway.policy.engine import effective_risk
from gateway.policy.risk import classify
from schemas.policy import LoadedPolicy, load_policy, window_text

__all__ = ["add_commands", "inventory", "list_tools"]

INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "ledgergate-tools", "version": "1"},
}
TIMEOUT_S = 30.0
MAX_PAGES = 100


def inventory(tools: list[dict[str, Any]], policy: LoadedPolicy) -> list[dict[str, Any]]:
    """One row per tool: name, risk, effective rule, action, limits (pure)."""
    rows = []
    for t in tools:
        name = t.get("name")
        if not isinstance(name, str):
            continue
        ann = t.get("annotations") if isinstance(t.get("annotations"), dict) else None
        desc = t.get("description") if isinstance(t.get("description"), str) else None
        risk = effective_risk(name, policy, classify(name, desc, ann))
        plan = policy.plan(name, risk.cls if policy.class_plans else None)
        if plan is None:
            rule = "/default"
            action = "allow" if policy.default_allow else "deny"
            shadow, limits = policy.shadow, []
        else:
            rule = plan.action_pointer
            action = "deny" if plan.denied else "approve" if plan.approval is not None else "allow"
            shadow = plan.shadow
            limits = [
                {
                    "counter": lim[0],
                    "max": lim[4],
                    "window": window_text(lim[3]),
                    "scope": lim[1],
                    "rule": lim[5],
                }
                for lim in plan.limits
            ]
        rows.append(
            {
                "tool": name,
                "risk_class": risk.cls,
                "risk_level": risk.level,
                "risk_source": risk.source,
                "rule": rule,
                "action": action,
                "shadow": shadow,
                "limits": limits,
            }
        )
    return rows


# ---- a minimal MCP client: initialize, then tools/list (every page) ------------------------


async def _stdio_tools(cfg: Config, name: str) -> list[dict[str, Any]]:
    srv = cfg.servers[name]
    argv = cfg.command(name)
    env = {**os.environ, **(srv.env or {})}
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=str(cfg.resolve(srv.cwd)) if srv.cwd else None,
        limit=64 << 20,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def ask(id_: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
        stdin.write(orjson.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params}) + b"\n")
        await stdin.drain()
        while True:
            line = await stdout.readline()
            if not line:
                raise RuntimeError("the server exited before answering")
            with contextlib.suppress(orjson.JSONDecodeError):
                msg = orjson.loads(line)
                if isinstance(msg, dict) and msg.get("id") == id_:
                    return msg

    try:
        await ask(1, "initialize", INIT)
        stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        return await _pages(ask)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _http_tools(url: str) -> list[dict[str, Any]]:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http:

        async def post(body: dict[str, Any]) -> tuple[dict[str, Any] | None, Any]:
            async with http.post(url, data=orjson.dumps(body), headers=headers) as r:
                if r.status >= 400:
                    raise RuntimeError(f"HTTP {r.status} from {url}")
                raw = await r.read()
                if r.content_type == "text/event-stream":
                    msg = None
                    for line in raw.splitlines():
                        if line.startswith(b"data:"):
                            with contextlib.suppress(orjson.JSONDecodeError):
                                m = orjson.loads(line[5:])
                                if isinstance(m, dict) and m.get("id") == body.get("id"):
                                    msg = m
                    return msg, r.headers
                return (orjson.loads(raw) if raw.strip() else None), r.headers

        _, h = await post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INIT})
        sid = h.get("Mcp-Session-Id")
        if sid:
            headers["Mcp-Session-Id"] = sid
        headers["MCP-Protocol-Version"] = INIT["protocolVersion"]
        await post({"jsonrpc": "2.0", "method": "notifications/initialized"})

        async def ask(id_: int, method: str, params: dict[str, Any]) -> dict[str, Any]:
            msg, _ = await post({"jsonrpc": "2.0", "id": id_, "method": method, "params": params})
            if msg is None:
                raise RuntimeError(f"no answer to {method}")
            return msg

        try:
            return await _pages(ask)
        finally:
            if sid:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.delete(url, headers=headers):
                        pass


async def _pages(ask: Any) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = []
    cursor = None
    for page in range(MAX_PAGES):
        msg = await ask(2 + page, "tools/list", {} if cursor is None else {"cursor": cursor})
        if "error" in msg:
            raise RuntimeError(f"tools/list: {msg['error']}")
        result = msg.get("result") or {}
        tools += [t for t in result.get("tools") or [] if isinstance(t, dict)]
        cursor = result.get("nextCursor")
        if not cursor:
            break
    return tools


async def list_tools(cfg: Config, name: str) -> list[dict[str, Any]]:
    """The tools the upstream ``name`` lists right now (started briefly for the question)."""
    srv = cfg.servers[name]
    if srv.url is not None:
        return await asyncio.wait_for(_http_tools(srv.url), TIMEOUT_S)
    return await asyncio.wait_for(_stdio_tools(cfg, name), TIMEOUT_S)


async def _collect(cfg: Config, names: list[str]) -> dict[str, list[dict[str, Any]] | str]:
    async def one(name: str) -> list[dict[str, Any]] | str:
        try:
            return await list_tools(cfg, name)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    results = await asyncio.gather(*(one(n) for n in names))
    return dict(zip(names, results, strict=True))


def cmd_tools(args: argparse.Namespace) -> int:
    from ledgergate.cli.audit import CliError, _load

    try:
        cfg = _load(args.config)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    names = [args.server] if args.server else sorted(cfg.servers)
    for n in names:
        if n not in cfg.servers:
            print(f"error: no server {n!r} in {cfg.source}", file=sys.stderr)
            return 2
    policies = {}
    for n in names:
        try:
            policies[n] = load_policy(cfg.policy_path(n))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    listed = asyncio.run(_collect(cfg, names))
    doc: dict[str, Any] = {}
    failed = False
    for n in names:
        got = listed[n]
        if isinstance(got, str):
            doc[n] = {"error": got, "tools": []}
            failed = True
        else:
            doc[n] = {"tools": inventory(got, policies[n])}
    if args.format == "json":
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 3 if failed else 0
    for n in names:
        print(f"server {n} (policy {cfg.policy_path(n)})")
        if "error" in doc[n]:
            print(f"  cannot list its tools: {doc[n]['error']}")
            continue
        print(f"  {'TOOL':<28} {'RISK':<15} {'ACTION':<14} {'RULE':<34} LIMITS")
        for row in doc[n]["tools"]:
            limits = ", ".join(
                f"{x['counter']} {x['max']}/{x['window']} per {x['scope']}" for x in row["limits"]
            )
            action = row["action"] + (" (shadow)" if row["shadow"] else "")
            print(
                f"  {row['tool']:<28} {row['risk_class'] + ' ' + row['risk_level']:<15} {action:<14} "
                f"{row['rule']:<34} {limits or '-'}"
            )
    return 3 if failed else 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("tools", help="every upstream's tools: risk, effective rule, action, limits (live)")
    p.add_argument("--config", "-c", default="ledgergate.toml")
    p.add_argument("--server", help="only this server")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(fn=cmd_tools)
