"""`ledgergate policy simulate | schema`: dry-run a candidate policy over history; the schema.

``policy simulate NEW.json --server NAME [--since 7d] [--format table|json] [-c CONFIG]``
replays the recorded ``call.decided`` events of NAME through NEW.json with the gateway's
own pure engine (counters folded in event order) and prints the decisions that would
change, by tool, agent and rule, with counts and example calls. While a gateway runs
(answering at [gateway] listen) it is asked over the admin API (POST
/admin/policies/simulate, needs admin_token); else the event log in data_dir is read
directly (no store needed). Exit codes: 0 ok (changes or not), 2 bad policy / arguments /
config, 3 log or gateway unavailable.

``policy schema`` prints the JSON Schema of the policy file (from the pydantic model; the
same text as schemas/policy.schema.json).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from ledgergate.cli.audit import CliError, _load, _since, gateway_answers, gateway_url

__all__ = ["add_commands", "policy_schema_text"]


def policy_schema() -> dict[str, Any]:
    from schemas.policy import Policy

    doc = Policy.model_json_schema(by_alias=True)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://ledgergate.dev/schemas/policy.schema.json",
        **doc,
    }


def policy_schema_text() -> str:
    """The committed schemas/policy.schema.json, byte for byte."""
    return orjson.dumps(policy_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"


def cmd_schema(args: argparse.Namespace) -> int:
    sys.stdout.write(policy_schema_text())
    return 0


async def _ask_gateway(base: str, token: str, data: bytes, server: str, since: str | None) -> dict[str, Any]:
    params = {"server": server, **({"since": since} if since else {})}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {token}"}) as http,
            http.post(f"{base}/admin/policies/simulate", params=params, data=data) as resp,
        ):
            status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CliError(3, f"gateway at {base}: {type(exc).__name__}: {exc}") from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if status == 200 and isinstance(doc, dict):
        return doc
    message = doc.get("message") if isinstance(doc, dict) else body[:200].decode(errors="replace")
    if status == 401:
        raise CliError(2, f"the gateway at {base} refused the admin token")
    if status == 404:
        raise CliError(3, f"the gateway at {base} serves no simulate API (started without admin_token?)")
    raise CliError(2 if status == 400 else 3, str(message))


async def _simulate_local(cfg: Any, data: bytes, server: str, since: str | None) -> dict[str, Any]:
    from eventlog import open_log
    from ledgergate.embedded import simulate_policy

    if not (cfg.data_dir / "events.db").exists() and cfg.eventlog.backend == "embedded":
        print(f"note: no event log in {cfg.data_dir} yet: nothing recorded to replay", file=sys.stderr)
    try:
        eventlog = open_log(
            cfg.eventlog.backend, cfg.data_dir, cfg.eventlog.durability, cfg.eventlog.flush_interval_ms
        )
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        await eventlog.open()
    except ValueError as exc:
        raise CliError(2, f"{cfg.source}: {exc}") from None
    except Exception as exc:
        raise CliError(3, f"cannot open the event log in {cfg.data_dir}: {exc}") from None
    try:
        return await simulate_policy(eventlog, cfg, data, server, since)
    finally:
        await eventlog.close()


async def simulate(cfg: Any, data: bytes, server: str, since: str | None) -> dict[str, Any]:
    base = gateway_url(cfg)
    if await gateway_answers(base):
        if not cfg.gateway.admin_token:
            raise CliError(
                2,
                f"a gateway is running at {base}: set [gateway] admin_token in {cfg.source} (and restart "
                "it) to simulate over its admin API, or stop it",
            )
        return await _ask_gateway(base, cfg.gateway.admin_token, data, server, since)
    try:
        return await _simulate_local(cfg, data, server, since)
    except ValueError as exc:  # PolicyError, unknown server, bad since
        raise CliError(2, str(exc)) from None


def _ts(ms: int | None) -> str:
    if ms is None:
        return "-"
    dt = datetime.fromtimestamp(ms / 1000, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def render_simulation(doc: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    from ledgergate.cli.audit import render, short_id

    print(
        f"server {doc['server']}: {doc['replayed']} recorded calls replayed "
        f"({_ts(doc.get('first_ts'))} .. {_ts(doc.get('last_ts'))}) through policy "
        f"{str(doc['policy_version'])[:12]}"
    )
    print(
        f"  allowed -> refused: {doc['allowed_to_refused']}   refused -> allowed: {doc['refused_to_allowed']}"
        f"   unchanged: {doc['unchanged']}"
        + (f"   undecidable (redacted arguments): {doc['undecidable']}" if doc.get("undecidable") else "")
    )
    changes = doc.get("changes") or []
    if not changes:
        print("no decision would change")
        return
    columns = ["change", "tool", "agent", "rule", "old", "new", "count", "example calls"]
    rows = [
        (
            c["change"],
            c["tool"],
            c["agent"],
            c["rule"],
            c["old"],
            c["new"],
            c["count"],
            " ".join(str(short_id(e.get("call_id"))) for e in c["examples"]),
        )
        for c in changes
    ]
    render(columns, rows, "table", wide=True)  # rules and tools whole: they are what to act on
    print("(example calls: `ledgergate audit calls` shows them; --format json gives full ids and reasons)")


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
        try:
            with open(args.policy, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CliError(2, f"{args.policy}: cannot read: {exc.strerror or exc}") from None
        from schemas.policy import PolicyError, parse_policy

        try:
            parse_policy(data, args.policy)  # errors name the file (the gateway calls it "candidate")
        except PolicyError as exc:
            raise CliError(2, str(exc)) from None
        doc = asyncio.run(simulate(cfg, data, args.server, args.since))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    render_simulation(doc, args.format)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `policy simulate` and `policy schema` on the main parser."""
    pol = sub.add_parser("policy", help="policy tools: simulate a candidate over history, print the schema")
    psub = pol.add_subparsers(dest="policy_cmd", required=True)
    p = psub.add_parser(
        "simulate", help="replay recorded calls through a candidate policy; print what would change"
    )
    p.add_argument("policy", help="the candidate policy file (JSON)")
    p.add_argument("--server", required=True, help="whose recorded calls to replay")
    p.add_argument("--since", type=_since, help="7d, 1h, 30m, or an ISO datetime (UTC); default: all")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--config", "-c", default="ledgergate.toml", help="the gateway's config file")
    p.set_defaults(fn=cmd_simulate)
    p = psub.add_parser("schema", help="print the JSON Schema of the policy file")
    p.set_defaults(fn=cmd_schema)
