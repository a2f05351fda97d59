"""`ledgergate approvals list | approve ID | deny ID`: the calls a running gateway holds for a human.

Held calls live in the running gateway only, so these commands always ask it: over its
owner-only admin socket without configuration, else over TCP with [gateway] admin_token
(`ledgergate.cli.link.find_gateway`). ``--by`` defaults to the OS user running the command
(recorded on the approval.resolved event). Exit codes: 0 ok, 1 the approval is unknown or
already resolved, 2 bad arguments / config, 3 no gateway to ask.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from typing import Any

import aiohttp
import orjson

from ledgergate.cli.link import CliError, find_gateway

__all__ = ["add_commands"]


async def _ask(cfg: Any, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    link = await find_gateway(cfg)
    if link is None:
        raise CliError(
            3,
            f"no gateway is running for {cfg.source} (held calls live in the running gateway): "
            "start it with `ledgergate run`",
        )
    try:
        async with (
            link.session(aiohttp.ClientTimeout(total=30)) as http,
            http.request(method, link.url(path), data=None if body is None else orjson.dumps(body)) as resp,
        ):
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CliError(3, f"{link.where}: {type(exc).__name__}: {exc}") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if status == 404 and not (isinstance(doc, dict) and doc.get("error") == "not_found"):
        raise CliError(3, f"{link.where} serves no approvals API (an older gateway?)")
    if status == 401:
        raise CliError(2, f"{link.where} refused the admin token")
    return status, doc


def _load(path: str) -> Any:
    from ledgergate.cli.audit import _load as load

    return load(path)


def _ago(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def cmd_list(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
        status, doc = asyncio.run(_ask(cfg, "GET", "/admin/approvals"))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    if status != 200 or not isinstance(doc, dict):
        print(f"error: the gateway answered HTTP {status}: {doc}", file=sys.stderr)
        return 3
    pending = doc.get("pending", [])
    if args.format == "json":
        sys.stdout.write(orjson.dumps(pending, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not pending:
        print("no calls waiting for approval")
        return 0
    print(
        f"{'ID':<10} {'SERVER':<12} {'TOOL':<20} {'AGENT':<14} {'WAITING':>8} {'EXPIRES IN':>10}  ARGUMENTS"
    )
    for p in pending:
        args_text = orjson.dumps(p.get("arguments")).decode()
        if len(args_text) > 60:
            args_text = args_text[:57] + "..."
        print(
            f"{p['id']:<10} {p['server']:<12} {p['tool']:<20} {p['agent']:<14} "
            f"{_ago(p['waiting_s']):>8} {_ago(p['expires_in_s']):>10}  {args_text}"
        )
    return 0


def _resolve(args: argparse.Namespace, decision: str) -> int:
    try:
        cfg = _load(args.config)
        by = args.by or getpass.getuser()
        body = {"decision": decision, "comment": args.comment, "by": by}
        status, doc = asyncio.run(_ask(cfg, "POST", f"/admin/approvals/{args.id}", body))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    if status == 200 and isinstance(doc, dict):
        r = doc["resolution"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        extra = ""
        if r.get("remembered_until"):
            until = time.strftime("%H:%M:%S", time.gmtime(r["remembered_until"]))
            extra = f"; the same call is allowed without asking until {until} UTC"
        print(
            f"approval {r['id']} {r['outcome']} by {r['by']} at {when} UTC ({r['server']} {r['tool']}){extra}"
        )
        return 0
    message = doc.get("message") if isinstance(doc, dict) else str(doc)
    print(f"error: {message}", file=sys.stderr)
    return 1 if status in (404, 409) else 2 if status == 400 else 3


def add_commands(sub: Any) -> None:
    p = sub.add_parser("approvals", help="list, approve or deny the calls the running gateway holds")
    asub = p.add_subparsers(dest="approvals_cmd", required=True)
    q = asub.add_parser("list", help="the calls waiting for a human")
    q.add_argument("--config", "-c", default="ledgergate.toml")
    q.add_argument("--format", choices=("table", "json"), default="table")
    q.set_defaults(fn=cmd_list)
    for name, decision, what in (("approve", "approve", "forward it"), ("deny", "deny", "refuse it")):
        q = asub.add_parser(name, help=f"{name} a held call ({what})")
        q.add_argument("id", help="the approval id (`ledgergate approvals list`)")
        q.add_argument("--comment", "-m", default=None, help="why (the agent reads it on a denial)")
        q.add_argument("--by", default=None, help="who decides (default: the OS user)")
        q.add_argument("--config", "-c", default="ledgergate.toml")
        q.set_defaults(fn=lambda a, d=decision: _resolve(a, d))
