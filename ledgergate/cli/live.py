"""Live views: `ledgergate alerts tail` and `ledgergate audit calls --follow`.

Both read ``GET /admin/events?follow=1`` (Server-Sent Events) of the running gateway: a live
view needs one (it is what appends the events). Once the stream is open a line
``following ... (Ctrl-C to stop)`` goes to stderr; every event appended after it is shown.
Output: ``--format table`` one aligned line per event, ``json`` one JSON object per line
(the event as it is on the log). Exit codes as `audit`: 2 bad arguments or config, 3 no
gateway / stream lost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from gateway.config import Config
from ledgergate.cli.link import CliError
from ledgergate.cli.link import load_cli_config as _load
from ledgergate.cli.link import session as _session


async def find_gateway(cfg: Config) -> tuple[str, str | None, str | None]:
    """(base URL, admin token, unix socket) of the running gateway: its owner-only admin socket
    (no token), else TCP with [gateway] admin_token (ledgergate.cli.link.find_gateway)."""
    from ledgergate.cli.link import find_gateway as find_link

    link = await find_link(cfg)
    if link is None:
        raise CliError(
            3, f"no gateway runs on {cfg.data_dir}: a live view follows a running gateway (ledgergate run)"
        )
    return link.base, link.token, link.unix_socket


async def stream_events(cfg: Config, params: dict[str, str], show: Any, what: str) -> None:
    """Follow GET /admin/events with ``params``; ``show(kind, event)`` for each event."""
    base, token, sock = await find_gateway(cfg)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)
    try:
        async with (
            _session(timeout, token, sock) as http,
            http.get(f"{base}/admin/events", params={"follow": "1", **params}) as resp,
        ):
            if resp.status != 200:
                body = await resp.read()
                try:
                    message = orjson.loads(body).get("message")
                except (orjson.JSONDecodeError, AttributeError):
                    message = body[:200].decode(errors="replace")
                code = 2 if resp.status in (400, 401) else 3
                raise CliError(code, f"gateway at {base}: HTTP {resp.status}: {message}")
            print(f"following {what} at {base} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            kind, data = "", []
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if not line:
                    if data:
                        show(kind, orjson.loads("\n".join(data)))
                    kind, data = "", []
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
    except (aiohttp.ClientError, OSError) as exc:
        raise CliError(3, f"gateway at {base}: {type(exc).__name__}: {exc}") from None
    print("the gateway closed the stream (stopped?)", file=sys.stderr, flush=True)


def _ts(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _emit(fmt: str, event: dict[str, Any], cells: list[str]) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(event).decode() + "\n")
    else:
        sys.stdout.write("  ".join(cells) + "\n")
    sys.stdout.flush()


def _call_cells(ev: dict[str, Any]) -> list[str]:
    decision = str(ev.get("decision"))
    result = decision if decision != "allow" else "allow"
    why = f"{ev.get('reason') or ''} [{ev['rule']}]" if ev.get("rule") else (ev.get("reason") or "")
    args = orjson.dumps(ev.get("arguments")).decode() if ev.get("arguments") is not None else ""
    call = str(ev.get("call_id") or "")[-8:]
    return [
        _ts(ev.get("ts")),
        f"…{call}",
        f"{ev.get('tool') or ev.get('method')}",
        f"{ev.get('agent')}",
        result,
        why.strip(),
        args,
    ]


def _alert_cells(kind: str, ev: dict[str, Any]) -> list[str]:
    if kind == "alert.fired":
        return [
            _ts(ev.get("ts")),
            "FIRED",
            str(ev.get("alert_id")),
            str(ev.get("text")),
            str(ev.get("evidence")),
        ]
    if kind == "alert.delivered":
        return [
            _ts(ev.get("ts")),
            "delivered",
            str(ev.get("alert_id")),
            f"to {ev.get('sink')} after {ev.get('attempts')} tr{'y' if ev.get('attempts') == 1 else 'ies'}, "
            f"age {ev.get('age_ms')} ms",
        ]
    return [
        _ts(ev.get("ts")),
        "failed" if ev.get("final") else "retrying",
        str(ev.get("alert_id")),
        f"{ev.get('sink')}: {ev.get('error')} (try {ev.get('attempts')})",
    ]


def follow_calls(args: argparse.Namespace) -> int:
    """`audit calls --follow`: decisions as they happen, with the usual filters."""
    params = {k: str(getattr(args, k)) for k in ("tool", "server", "agent", "grant", "decision")}
    params = {k: v for k, v in params.items() if v != "None"}
    params["kind"] = "call"

    def show(kind: str, ev: dict[str, Any]) -> None:
        _emit(args.format, ev, _call_cells(ev))

    return _run(args, params, show, "decided calls")


def cmd_alerts_tail(args: argparse.Namespace) -> int:
    params = {"kind": "alert"}
    if args.rule:
        params["rule"] = args.rule

    def show(kind: str, ev: dict[str, Any]) -> None:
        if kind != "alert.fired" and not args.deliveries:
            return
        _emit(args.format, ev, _alert_cells(kind, ev))

    return _run(args, params, show, "alerts")


def _run(args: argparse.Namespace, params: dict[str, str], show: Any, what: str) -> int:
    if args.format == "csv":
        print("error: a live view prints table or json lines", file=sys.stderr)
        return 2
    try:
        cfg = _load(args.config)
        asyncio.run(stream_events(cfg, params, show, what))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        pass
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    alerts = sub.add_parser("alerts", help="alerts of the running gateway")
    asub = alerts.add_subparsers(dest="alerts_cmd", required=True)
    p = asub.add_parser("tail", help="alerts as they fire (and, with --deliveries, their delivery)")
    p.add_argument("--config", "-c", default="ledgergate.toml", help="the gateway's config file")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--rule", help="only this rule's alerts")
    p.add_argument("--deliveries", action="store_true", help="also alert.delivered / alert.failed")
    p.set_defaults(fn=cmd_alerts_tail)
