"""`ledgergate audit ...` and `ledgergate replay`: forensic questions and projection rebuilds.

Part of the CLI composition root (it may wire gateway and consumers together).

While a gateway runs it holds the embedded store (one chDB data dir per process), so
`audit` asks it over the admin API when the config has ``[gateway] admin_token`` and a
gateway answers ``GET /healthz`` at ``[gateway] listen``; with no gateway running it opens
the log and store itself (``ledgergate.embedded.Embedded``), folds what the consumers have not
yet folded, answers and closes. `replay` only runs with no gateway running.

Exit codes: 0 ok; 2 bad arguments, config error, bad filter, SQL refused (read-only) or
rejected by ClickHouse as invalid; 3 store or gateway unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from datetime import datetime
from typing import Any, get_args

import aiohttp
import orjson

from gateway.admin import classify_error
from gateway.config import Config, ConfigError, load_config
from schemas.events import Decision

FORMATS = ("table", "json", "csv")
HEALTH_TIMEOUT_S = 1.5
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# orjson's datetime form, as the admin API sends DateTime values
_ISO_DT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(\+00:00|Z)$")
_LABEL = {
    "bad_request": "bad request",
    "read_only": "read-only violation",
    "query_error": "query error",
    "store_unavailable": "store error",
}


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- argument types


def _since(text: str) -> str:
    from consumers.forensics import parse_since

    try:
        parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, not {n}")
    return n


def _offset(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def _param(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not _PARAM_NAME.match(name):
        raise argparse.ArgumentTypeError(f"expected name=value with a plain name, not {text!r}")
    return name, value


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `audit` (who / calls / denials / sql) and `replay` on the main parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default="ledgergate.toml", help="the gateway's config file")
    common.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")

    def filters(p: argparse.ArgumentParser, *, tool_required: bool = False) -> None:
        p.add_argument("--tool", required=tool_required, help="tool name (or a JSON-RPC method)")
        p.add_argument("--server", help="server name from the config")
        p.add_argument("--since", type=_since, help="7d, 1h, 30m, 45s, 2w ago, or an ISO datetime (UTC)")
        p.add_argument("--until", type=_since, help="same forms as --since (exclusive)")

    audit = sub.add_parser("audit", help="forensic questions over the audit trail")
    asub = audit.add_subparsers(dest="question", required=True)

    p = asub.add_parser("who", parents=[common], help="who called a tool: per agent and grant")
    filters(p, tool_required=True)
    p.add_argument("--decision", choices=get_args(Decision))
    p.set_defaults(fn=cmd_audit)

    p = asub.add_parser("calls", parents=[common], help="each call with arguments, decision, outcome")
    filters(p)
    p.add_argument("--decision", choices=get_args(Decision))
    p.add_argument("--agent")
    p.add_argument("--grant")
    p.add_argument("--limit", type=_positive, default=100, help="at most N calls, newest first (100)")
    p.set_defaults(fn=cmd_audit)

    p = asub.add_parser("denials", parents=[common], help="refusals grouped by agent, tool and rule")
    filters(p)
    p.add_argument("--agent")
    p.set_defaults(fn=cmd_audit)

    p = asub.add_parser("sql", parents=[common], help="read-only SQL with {name:Type} parameters")
    p.add_argument(
        "sql",
        help='e.g. "SELECT agent, count() FROM audit_calls FINAL WHERE tool = {t:String} GROUP BY agent"',
    )
    p.add_argument(
        "--param",
        "-p",
        type=_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a value for {NAME:Type}; repeat for several",
    )
    p.set_defaults(fn=cmd_audit)

    p = sub.add_parser("replay", help="rebuild the ClickHouse projections from the event log")
    p.add_argument("--config", "-c", default="ledgergate.toml")
    p.add_argument(
        "--from",
        dest="from_offset",
        type=_offset,
        default=0,
        metavar="N",
        help="first log offset to replay (default 0)",
    )
    p.set_defaults(fn=cmd_replay)


def question_params(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The question and its params, as Embedded.answer and the admin API take them."""
    q = args.question
    if q == "sql":
        params: dict[str, str] = {}
        for name, value in args.param:
            if name in params:
                raise CliError(2, f"--param {name} given more than once")
            params[name] = value
        return q, {"sql": args.sql, "params": params}
    names = {
        "who": ("tool", "server", "since", "until", "decision"),
        "calls": ("tool", "server", "since", "until", "decision", "agent", "grant", "limit"),
        "denials": ("tool", "server", "since", "until", "agent"),
    }[q]
    out: dict[str, Any] = {}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out[name] = str(value)
    return q, out


# ---------------------------------------------------------------- gateway or local store


def gateway_url(cfg: Config) -> str:
    host = cfg.gateway.host
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{cfg.gateway.port}"


async def gateway_answers(base: str, timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """A ledgergate gateway answers GET /healthz at ``base``."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(f"{base}/healthz") as resp,
        ):
            if resp.status != 200:
                return False
            doc = orjson.loads(await resp.read())
            return isinstance(doc, dict) and doc.get("ok") is True
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError):
        return False


def _revive(value: Any) -> Any:
    if isinstance(value, str) and _ISO_DT.match(value):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


async def ask_gateway(
    base: str, token: str, question: str, params: dict[str, Any]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)
    try:
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
            if question == "sql":
                req = http.post(
                    f"{base}/admin/audit/sql",
                    data=orjson.dumps(params),
                    headers={"Content-Type": "application/json"},
                )
            else:
                req = http.get(f"{base}/admin/audit/{question}", params=params)
            async with req as resp:
                status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CliError(3, f"gateway at {base}: {type(exc).__name__}: {exc}") from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if status == 200 and isinstance(doc, dict) and "columns" in doc and "rows" in doc:
        return list(doc["columns"]), [tuple(_revive(v) for v in row) for row in doc["rows"]]
    message = doc.get("message") if isinstance(doc, dict) else None
    kind = doc.get("error") if isinstance(doc, dict) else None
    if status == 401:
        raise CliError(
            2,
            f"the gateway at {base} refused the admin token: does [gateway] admin_token "
            "match the running gateway's?",
        )
    if status == 404:
        raise CliError(3, f"the gateway at {base} serves no admin API (started without admin_token?)")
    if status == 400:
        raise CliError(2, f"{_LABEL.get(kind or '', 'bad request')}: {message}")
    raise CliError(3, f"gateway at {base}: HTTP {status}: {message or body[:200].decode(errors='replace')}")


async def ask_local(
    cfg: Config, question: str, params: dict[str, Any]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    if not cfg.data_dir.exists():
        print(
            f"note: no data dir at {cfg.data_dir} yet (has the gateway run with this config?)",
            file=sys.stderr,
        )
    embedded = await _open(cfg)
    try:
        return await embedded.answer(question, params)
    except Exception as exc:
        status, kind = classify_error(exc)
        raise CliError(2 if status < 500 else 3, f"{_LABEL[kind]}: {exc}") from None
    finally:
        await embedded.close()


async def _open(cfg: Config) -> Any:
    from ledgergate.embedded import Embedded

    try:
        return await Embedded.open(cfg, run_consumers=False)
    except ValueError as exc:  # e.g. an unknown store spec or log backend
        raise CliError(2, f"{cfg.source}: {exc}") from None
    except Exception as exc:
        raise CliError(3, f"cannot open the log and store in {cfg.data_dir}: {exc}") from None


async def ask(cfg: Config, question: str, params: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Ask the running gateway (admin API) if there is one, else the store itself."""
    base = gateway_url(cfg)
    if await gateway_answers(base):
        if not cfg.gateway.admin_token:
            raise CliError(
                2,
                f"a gateway is running at {base} and holds the store: set [gateway] admin_token in "
                f"{cfg.source} (and restart the gateway) to ask it over the admin API, or stop it",
            )
        return await ask_gateway(base, cfg.gateway.admin_token, question, params)
    return await ask_local(cfg, question, params)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        raise CliError(2, str(exc)) from None


def cmd_audit(args: argparse.Namespace) -> int:
    from consumers.forensics import render

    try:
        cfg = _load(args.config)
        question, params = question_params(args)
        columns, rows = asyncio.run(ask(cfg, question, params))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    render(columns, rows, args.format)
    return 0


# ---------------------------------------------------------------- replay

COUNT_TABLES = ("audit_calls", "audit_outcomes", "audit_sessions", "audit_policy_loads", "counters_minute")


def _span(end: dict[int, int]) -> str:
    """The end of a replay: an offset (one partition) or partition:offset pairs."""
    if list(end) == [0]:
        return str(end[0])
    return ",".join(f"{p}:{o}" for p, o in sorted(end.items()))


async def replay(cfg: Config, from_offset: int) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    base = gateway_url(cfg)
    if await gateway_answers(base):
        raise CliError(
            2, f"a gateway is running at {base} and holds the embedded store: stop it, then run replay"
        )
    embedded = await _open(cfg)
    try:
        end = await embedded.log.end_position()
        total = sum(max(0, o - from_offset) for o in end.values())
        err = Console(stderr=True)
        with Progress(
            TextColumn("{task.description:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            done: dict[str, int] = {}
            for name, consumer in (("audit", embedded.audit), ("counters", embedded.counters)):
                task = bar.add_task(name, total=total)

                def progress(n: int, of: int, task: Any = task) -> None:
                    bar.update(task, completed=n, total=of)

                done[name] = await consumer.replay(from_offset, progress=progress)
                bar.update(task, completed=done[name], total=max(total, done[name]))
        counts = []
        for table in COUNT_TABLES:
            _, rows = await embedded.store.query(f"SELECT count() FROM {table} FINAL")  # fixed names
            counts.append((table, rows[0][0]))
    except CliError:
        raise
    except Exception as exc:
        raise CliError(3, f"replay failed: {type(exc).__name__}: {exc}") from None
    finally:
        await embedded.close()
    print(
        f"replayed log offsets {from_offset}..{_span(end)}: {done['audit']} records into the audit tables, "
        f"{done['counters']} into the counters"
    )
    for table, n in counts:
        print(f"  {table:<20} {n} rows")


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        cfg = _load(args.config)
        asyncio.run(replay(cfg, args.from_offset))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    return 0
