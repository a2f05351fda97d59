"""`ledgergate audit ...` and `ledgergate replay`: forensic questions and projection rebuilds.

Part of the CLI composition root (it may wire gateway and consumers together).

While a gateway runs it holds the embedded store (one chDB data dir per process), so
`audit` asks it over the admin API: on its local socket (data_dir/admin.sock, named in
data_dir/lock; owner only, no token), else over TCP at ``[gateway] listen`` with ``[gateway]
admin_token`` (``ledgergate.cli.link.find_gateway``); with no gateway running it opens the
log and store itself (``ledgergate.embedded.Embedded``), folds what the consumers have not
yet folded, answers and closes. `replay` only runs with no gateway running.

Output: timestamps are RFC 3339 UTC with milliseconds and ``Z`` in every format
(``2026-12-02T07:11:17.123Z``). ``audit calls`` as a table fits the terminal: short ids and
the columns that matter, ``--wide`` for every column in full (json and csv are always
full). When the tables are behind the log (consumers still folding), a table ends with a
``note:`` line saying by how many events and seconds; json and csv keep their shape and
print that note on stderr.

Exit codes: 0 ok; 2 bad arguments, config error, bad filter (an unknown --server too), SQL
refused (read-only) or rejected by ClickHouse as invalid, replay --from past the end of the
log; 3 store or gateway unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
from datetime import UTC, datetime
from typing import IO, Any, get_args

import aiohttp
import orjson

from gateway.admin import classify_error
from gateway.audit.hooks import AdminRequest
from gateway.config import Config
from ledgergate.cli.link import (  # noqa: F401  (gateway_answers, gateway_url: this module's API too)
    HEALTH_TIMEOUT_S,
    CliError,
    GatewayLink,
    find_gateway,
    gateway_answers,
    gateway_url,
    load_cli_config,
)
from schemas.events import Decision

FORMATS = ("table", "json", "csv")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# orjson's datetime form, as the admin API sends DateTime values
_ISO_DT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(\+00:00|Z)$")
_LABEL = {
    "bad_request": "bad request",
    "read_only": "read-only violation",
    "query_error": "query error",
    "store_unavailable": "store error",
}


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
    common.add_argument(
        "--clickhouse",
        metavar="URL",
        help="ask this ClickHouse server directly (the tables `ledgergate consume` fills), e.g. "
        "http://127.0.0.1:8123; user and password from CLICKHOUSE_USER / CLICKHOUSE_PASSWORD or "
        "LEDGERGATE_STORE_USER / LEDGERGATE_STORE_PASSWORD",
    )

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
    p.add_argument("--wide", action="store_true", help="table: every column, full ids (json/csv always are)")
    p.add_argument(
        "--follow",
        "-f",
        action="store_true",
        help="decisions as they happen (a running gateway; ledgergate/cli/live.py)",
    )
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


def _revive(value: Any) -> Any:
    if isinstance(value, str) and _ISO_DT.match(value):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


async def ask_gateway(
    base: str, token: str | None, question: str, params: dict[str, Any], *, unix_socket: str | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Ask the gateway's admin API at ``base`` (with ``token``, or over ``unix_socket``)."""
    return await ask_link(GatewayLink(base, token=token, unix_socket=unix_socket), question, params)


async def ask_link(
    link: GatewayLink, question: str, params: dict[str, Any]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Ask the running gateway's admin API; the answer carries ``.lag`` when it is behind."""
    from consumers.forensics import Lag, LaggedAnswer

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600)
    where = link.where
    try:
        async with link.session(timeout) as http:
            if question == "sql":
                req = http.post(
                    link.url("/admin/audit/sql"),
                    data=orjson.dumps(params),
                    headers={"Content-Type": "application/json"},
                )
            else:
                req = http.get(link.url(f"/admin/audit/{question}"), params=params)
            async with req as resp:
                status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CliError(3, f"{where}: {type(exc).__name__}: {exc}") from None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if status == 200 and isinstance(doc, dict) and "columns" in doc and "rows" in doc:
        from consumers.store.base import Rows

        lag = doc.get("lag")
        rows = Rows(tuple(_revive(v) for v in row) for row in doc["rows"])
        rows.note = doc.get("note") if doc.get("truncated") else None
        answer = LaggedAnswer(
            list(doc["columns"]),
            rows,
            Lag(int(lag["events"]), float(lag["seconds"])) if isinstance(lag, dict) else None,
        )
        rb = doc.get("rebuilding")
        if isinstance(rb, dict):
            answer.rebuilding = _RemoteRebuild(list(rb.get("tables", [])), int(rb.get("percent", 0)))
        return answer
    message = doc.get("message") if isinstance(doc, dict) else None
    kind = doc.get("error") if isinstance(doc, dict) else None
    if status == 401:
        raise CliError(
            2,
            f"{where} refused the admin token: does [gateway] admin_token match the running gateway's?",
        )
    if status == 404:
        raise CliError(3, f"{where} serves no admin API (started without admin_token?)")
    if status == 400:
        raise CliError(2, f"{_LABEL.get(kind or '', 'bad request')}: {message}")
    raise CliError(3, f"{where}: HTTP {status}: {message or body[:200].decode(errors='replace')}")


async def ask_local(
    cfg: Config, question: str, params: dict[str, Any]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    if not cfg.data_dir.exists() and cfg.store.clickhouse == "embedded":
        print(
            f"note: no data dir at {cfg.data_dir} yet (has the gateway run with this config?)",
            file=sys.stderr,
        )
    embedded = await _open(cfg)
    record = AdminRequest(question, caller="local")
    if question == "sql":
        record.sql, record.params = params.get("sql"), params.get("params")
    else:
        record.filters = {k: str(v) for k, v in params.items()}
    try:
        columns, rows = await embedded.answer(question, params)
        record.row_count = len(rows)
        return columns, rows
    except Exception as exc:
        status, kind = classify_error(exc)
        record.error, record.message = kind, str(exc)
        raise CliError(2 if status < 500 else 3, f"{_LABEL[kind]}: {exc}") from None
    finally:
        try:
            await record_local(embedded, cfg, record)  # the auditors are audited, locally too
        finally:
            await embedded.close()


async def record_local(embedded: Any, cfg: Config, record: AdminRequest) -> None:
    """Append the admin.query event of a question answered on the store itself."""
    from gateway.audit.writer import AuditAddon, instance_id

    addon = AuditAddon(embedded.log, instance_id(cfg.gateway.instance_id))
    addon.admin_request(record)
    try:
        await addon.close()
    except Exception as exc:  # the answer stands; say the record is missing
        print(f"warning: the question could not be recorded in the audit log: {exc}", file=sys.stderr)


async def _open(cfg: Config) -> Any:
    from ledgergate.embedded import Embedded

    try:
        return await Embedded.open(cfg, run_consumers=False)
    except ValueError as exc:  # e.g. an unknown store spec or log backend
        raise CliError(2, f"{cfg.source}: {exc}") from None
    except Exception as exc:
        raise CliError(3, f"cannot open the log and store in {cfg.data_dir}: {exc}") from None


async def ask(
    cfg: Config, question: str, params: dict[str, Any], clickhouse: str | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Ask the running gateway (its admin socket, else TCP with the admin token) if there is
    one, else the store itself (``find_gateway`` says which); with ``clickhouse`` (a server
    URL), that server's tables directly, whatever runs."""
    if clickhouse:
        cfg.store.clickhouse = clickhouse
        return await ask_local(cfg, question, params)
    link = await find_gateway(cfg)
    if link is not None:
        return await ask_link(link, question, params)
    return await ask_local(cfg, question, params)


_load = load_cli_config


def cmd_audit(args: argparse.Namespace) -> int:
    if getattr(args, "follow", False):
        from ledgergate.cli.live import follow_calls

        return follow_calls(args)
    try:
        cfg = _load(args.config)
        question, params = question_params(args)
        answer = asyncio.run(ask(cfg, question, params, args.clickhouse))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    columns, rows = answer
    note = getattr(rows, "note", None)
    if question == "calls" and args.format == "table" and not args.wide:
        columns, rows = narrow_calls(columns, rows)
    render(columns, rows, args.format, wide=getattr(args, "wide", False))
    lag = getattr(answer, "lag", None)
    if lag is not None:
        print(lag.note(), file=sys.stdout if args.format == "table" else sys.stderr)
    rebuilding = getattr(answer, "rebuilding", None)
    if rebuilding is not None:  # never silently partial
        print(rebuilding.note(), file=sys.stdout if args.format == "table" else sys.stderr)
    if note:  # a limit cut the answer: say so (stderr keeps json/csv clean)
        print(f"note: {note}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- output

# `audit calls` as a table without --wide: these columns, ids shortened
NARROW_CALLS = ("ts", "call_id", "tool", "agent", "decision", "upstream_ms", "arguments")
SHORT_ID = 8


def short_id(value: Any) -> Any:
    """The last 8 characters of a long id: a UUIDv7 starts with its timestamp (shared by the
    calls of one minute) and ends with random bits, so the tail is what tells calls apart."""
    if isinstance(value, str) and len(value) > SHORT_ID + 4:
        return "…" + value[-SHORT_ID:]
    return value


def narrow_calls(columns: list[str], rows: list[tuple[Any, ...]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The columns that fit a terminal: a short call id, and one `result` column (the
    refusal for a refused call, else how it ended: ok, error, upstream_error, ...)."""
    keep = [columns.index(c) for c in NARROW_CALLS if c in columns]
    names = {"call_id": "call", "upstream_ms": "ms", "decision": "result"}
    out_cols = [names.get(columns[i], columns[i]) for i in keep]
    d = columns.index("decision") if "decision" in columns else -1
    o = columns.index("outcome") if "outcome" in columns else -1

    def cell(row: tuple[Any, ...], i: int) -> Any:
        if columns[i] == "call_id":
            return short_id(row[i])
        if i == d and row[i] == "allow" and o >= 0:
            return row[o] or "allow"  # no outcome yet: in flight
        if columns[i] == "upstream_ms" and isinstance(row[i], float):
            return round(row[i])
        return row[i]

    return out_cols, [tuple(cell(row, i) for i in keep) for row in rows]


def rfc3339(value: datetime) -> str:
    """RFC 3339 UTC with milliseconds and Z: 2026-12-02T07:11:17.123Z (naive means UTC)."""
    dt = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    return value


def render(
    columns: list[str],
    rows: list[tuple[Any, ...]],
    fmt: str,
    out: IO[str] | None = None,
    *,
    wide: bool = False,
) -> None:
    """Print an answer as a table (fits the terminal unless ``wide``), JSON (a list of
    objects) or CSV. Timestamps are RFC 3339 UTC with Z in all three."""
    import csv

    out = out or sys.stdout
    if fmt == "json":
        doc = [dict(zip(columns, map(_cell, row), strict=True)) for row in rows]
        out.write(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if v is None else _cell(v) for v in row])
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    # COLUMNS, else the terminal's width, else (output piped to a file) 200
    width = shutil.get_terminal_size((200, 24)).columns
    cells = [["" if v is None else str(_cell(v)) for v in row] for row in rows]
    natural = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    # light borders: two spaces between columns, so more of the terminal carries data
    table = Table(
        show_header=True,
        header_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1, 0, 0),
    )
    if wide:  # every cell whole: the terminal wraps long lines, copy-paste gets full values
        width = max(width, sum(natural) + 2 * len(columns))
    # timestamps, ids and counts are copied: always whole; names and arguments give way
    # (cut with an ellipsis) when the terminal is too narrow for every column
    whole = ("ts", "first", "last", "call", "call_id", "result", "decision", "ms", "count")
    sizes = list(natural)
    floor = [n if (c in whole or wide) else min(n, 10) for c, n in zip(columns, natural, strict=True)]
    excess = sum(sizes) + 2 * len(columns) - width
    while excess > 0 and any(s > f for s, f in zip(sizes, floor, strict=True)):
        i = max(range(len(sizes)), key=lambda k: sizes[k] - floor[k])  # the widest flexible one
        cut = min(excess, sizes[i] - floor[i], max(1, (sizes[i] - floor[i]) // 2))
        sizes[i] -= cut
        excess -= cut
    for col, size in zip(columns, sizes, strict=True):
        table.add_column(col, overflow="ellipsis", no_wrap=True, width=size)
    width = max(width, sum(sizes) + 2 * len(columns))  # too narrow even so: lines wrap, no value cut
    for row_cells in cells:
        table.add_row(*row_cells)
    Console(file=out, width=width, soft_wrap=False).print(table)
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


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

    try:
        link = await find_gateway(cfg)
        running = link.where if link is not None else None
    except CliError:  # one runs, even if this CLI cannot ask it
        running = "a gateway"
    if running is not None:
        raise CliError(2, f"{running} holds the embedded store: stop it, then run replay")
    embedded = await _open(cfg)
    try:
        end = await embedded.log.end_position()
        end_total = sum(end.values())
        if len(end) == 1 and from_offset > end_total:
            # committing an offset past the end would freeze the projections: the consumers
            # would wait for offsets the next events never get
            raise CliError(
                2,
                f"--from {from_offset} is past the end of the event log, which holds {end_total} records "
                f"(offsets 0..{end_total - 1}); give --from 0..{end_total} (0 rebuilds everything)",
            )
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


class _RemoteRebuild:
    """The running gateway's "rebuilding" field: tables and percent."""

    def __init__(self, tables: list[str], percent: int) -> None:
        self.tables, self.percent = tables, percent

    def note(self) -> str:
        return (
            f"note: rebuilding: {self.percent} % (the tables {', '.join(self.tables)} were damaged and are "
            "being rebuilt from the event log); this answer is partial until the rebuild ends"
        )
