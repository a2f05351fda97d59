"""The admin HTTP API: forensic questions and policy reload, JSON, behind a bearer token.

Routes (all need ``Authorization: Bearer <[gateway] admin_token>``; a missing or wrong
token gets 401 with ``WWW-Authenticate: Bearer``). The same routes are mounted without a
token (``token=None``) on the gateway's local admin socket (data_dir/admin.sock, mode 0600:
the file's permissions are the credential); those requests are audited with caller
``socket`` and, as remote, the peer's ``uid N pid N``:

- ``GET /admin/audit/{who|calls|denials}?tool=&server=&since=&until=&decision=&agent=&grant=&limit=``
- ``POST /admin/audit/sql`` with ``{"sql": "SELECT ...", "params": {"name": value, ...}}``
- ``GET /admin/events?follow=1`` (``add_event_stream``): decided events and alerts, live (SSE)
- ``POST /admin/policies/reload`` (only when a ``reload`` callable is given): ``{server:
  null | error}``, 200 when every policy loaded, 422 when one failed (it keeps its old policy)
- ``GET /admin/approvals``: the held calls, ``{"pending": [...]}`` (``add_approval_routes``)
- ``POST /admin/approvals/{id}`` with ``{"decision": "approve" | "deny", "comment": TEXT, "by":
  NAME}``: resolve one; 200 ``{"resolution": ...}``, 404 ``not_found`` (unknown id), 409
  ``conflict`` (already approved / denied / timed out / cancelled), 400 ``bad_request``.
  ``by`` is recorded as given (the CLI sends the OS user); without it: ``token`` on TCP, the
  peer's ``uid N pid N`` on the socket
- ``POST /admin/policies/simulate?server=NAME&since=7d`` with a candidate policy file as
  the body (mounted by ``add_simulate_route``): the recorded calls replayed through it,
  ``gateway.policy.simulate.Simulation.as_json()``; 400 ``bad_request`` for a broken policy
  (the message names its JSON Pointer) or an unknown server

Audit answers are ``{"columns": [...], "rows": [[...], ...]}``; datetimes are ISO 8601
strings (orjson's form, e.g. ``2025-01-06T10:00:00+00:00``), ``"lag": {"events": n,
"seconds": s}`` when the tables are behind the event log (absent when caught up), and
``"truncated": true, "note": <text>`` when a limit (``[store] query_max_rows`` /
``query_max_bytes``) cut the answer. Errors are ``{"error": <kind>, "message": <text>}``.

The gateway does not import ``consumers`` (dependency rule), so this module relies on a
contract with the ``answer`` callable (``ledgergate.embedded.Embedded.answer``):

- ``answer(question, params)``: ``question`` is one of ``who``, ``calls``, ``denials``,
  ``sql``; for the first three ``params`` holds the query-string filters as strings (only
  those given); for ``sql`` it is ``{"sql": str, "params": dict}``.
- it raises ``ValueError`` for bad input (an unparsable ``since``, a missing ``tool``,
  a bad ``limit``, ...)                                           -> 400 ``bad_request``
- the rows it returns may carry a ``note`` attribute (a str): the answer is incomplete
- it raises ``PermissionError`` for SQL the read-only store refused (an exception whose
  class, or a base class, is named ``ReadOnlyError`` is treated the same) -> 400 ``read_only``
- a store error (class named ``StoreError``) carrying a ClickHouse code that blames the
  query itself (syntax, unknown table/column/parameter, type errors) -> 400 ``query_error``
- any other store or I/O failure                                  -> 503 ``store_unavailable``

``classify_error`` implements that mapping; the CLI uses it too, so both surfaces agree.

Auditing the auditors: given ``addons`` (the gateway's AddonChain), every request is
reported once answered: ``addons.admin_request`` (question, SQL text and parameters or
filters, caller, status, row count; the audit addon writes admin.query / admin.reload)
and, for a missing or wrong token, ``addons.auth_failed`` with server ``(admin)``. The
handlers are wrapped from outside (``_audited``), so they stay as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import logging
import re
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp.web import Response, StreamResponse

from gateway.audit.hooks import Addon, AdminRequest
from gateway.auth import failure_reason
from gateway.edge import App, Request, json_error, json_response

log = logging.getLogger("ledgergate.admin")

Answer = tuple[list[str], list[tuple[Any, ...]]]
AnswerFn = Callable[[str, dict[str, Any]], Awaitable[Answer]]
ReloadFn = Callable[[], dict[str, str | None]]
# (policy file bytes, server, since or None) -> JSON-able answer; ValueError for bad input
SimulateFn = Callable[[bytes, str, str | None], Awaitable[dict[str, Any]]]

QUESTIONS = ("who", "calls", "denials")
FILTERS = {
    "who": ("tool", "server", "since", "until", "decision"),
    "calls": ("tool", "server", "since", "until", "decision", "agent", "grant", "limit"),
    "denials": ("tool", "server", "since", "until", "agent"),
}

# ClickHouse error names that blame the query text or its parameters (the caller's fault)
QUERY_ERRORS = frozenset(
    {
        "SYNTAX_ERROR",
        "UNKNOWN_TABLE",
        "UNKNOWN_DATABASE",
        "UNKNOWN_IDENTIFIER",
        "UNKNOWN_FUNCTION",
        "UNKNOWN_TYPE",
        "UNKNOWN_SETTING",
        "UNKNOWN_AGGREGATE_FUNCTION",
        "UNKNOWN_QUERY_PARAMETER",
        "BAD_QUERY_PARAMETER",
        "AMBIGUOUS_IDENTIFIER",
        "AMBIGUOUS_COLUMN_NAME",
        "NUMBER_OF_ARGUMENTS_DOESNT_MATCH",
        "ILLEGAL_TYPE_OF_ARGUMENT",
        "ILLEGAL_COLUMN",
        "ILLEGAL_AGGREGATION",
        "NOT_AN_AGGREGATE",
        "TYPE_MISMATCH",
        "NO_COMMON_TYPE",
        "BAD_ARGUMENTS",
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_CONVERT_TYPE",
        "ILLEGAL_DIVISION",
        "DIVISION_BY_ZERO",
        "TOO_LARGE_ARRAY_SIZE",
        "SIZES_OF_ARRAYS_DONT_MATCH",
        "UNEXPECTED_EXPRESSION",
        "UNSUPPORTED_METHOD",
        "NOT_IMPLEMENTED",
        "EMPTY_QUERY",
        # a forensic query over its [store] query_* limits
        "TIMEOUT_EXCEEDED",
        "TOO_MANY_ROWS_OR_BYTES",
        "MEMORY_LIMIT_EXCEEDED",
        "QUERY_WAS_CANCELLED",
    }
)
_CH_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)")


def _class_names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def classify_error(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error kind) of an exception raised by ``answer`` (see the module doc)."""
    names = _class_names(exc)
    if isinstance(exc, PermissionError) or "ReadOnlyError" in names:
        return 400, "read_only"
    if isinstance(exc, ValueError):
        return 400, "bad_request"
    if "StoreError" in names and QUERY_ERRORS.intersection(_CH_NAME.findall(str(exc))):
        return 400, "query_error"
    return 503, "store_unavailable"


def _default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)  # Decimal, IPv4Address, ... as their text


def answer_json(
    columns: list[str],
    rows: list[tuple[Any, ...]],
    lag: dict[str, Any] | None = None,
    rebuilding: dict[str, Any] | None = None,
) -> bytes:
    """``{"columns": [...], "rows": [[...], ...]}`` (datetimes as ISO strings), plus
    ``"lag": {"events": n, "seconds": s}`` when the tables are behind the event log and
    ``"truncated": true, "note": ...`` when the rows carry a note (a limit cut them)."""
    doc: dict[str, Any] = {"columns": list(columns), "rows": rows}
    if lag is not None:
        doc["lag"] = lag
    if rebuilding is not None:  # damaged tables being rebuilt from the log: the answer is partial
        doc["rebuilding"] = rebuilding
    note = getattr(rows, "note", None)
    if note:
        doc.update(truncated=True, note=str(note))
    try:
        return orjson.dumps(doc, default=_default, option=orjson.OPT_NAIVE_UTC)
    except orjson.JSONEncodeError:  # e.g. (U)Int128/256 beyond 64 bits: send big ints as text
        doc["rows"] = [
            [str(v) if isinstance(v, int) and not -(2**63) <= v < 2**64 else v for v in row] for row in rows
        ]
        return orjson.dumps(doc, default=_default)


def _error(status: int, kind: str, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="ledgergate-admin"'} if status == 401 else None
    return json_error(status, kind, message, headers)


ADMIN_SERVER = "(admin)"  # the server name of auth.failed events of the admin API
_RECORD: contextvars.ContextVar[AdminRequest | None] = contextvars.ContextVar("admin_record", default=None)

Handler = Callable[[Request], Awaitable[Response]]


def _recording(answer: AnswerFn) -> AnswerFn:
    """``answer`` that notes its row count or error kind on the request's record."""

    @functools.wraps(answer)
    async def recorded(question: str, params: dict[str, Any], *args: Any, **kwargs: Any) -> Answer:
        record = _RECORD.get()
        try:
            columns, rows = await answer(question, params, *args, **kwargs)
        except Exception as exc:
            if record is not None:
                record.error = classify_error(exc)[1]
            raise
        if record is not None:
            record.row_count = len(rows)
        return columns, rows

    return recorded


def peer_credentials(req: Request) -> str | None:
    """``uid N pid N`` of the process at the other end of a Unix socket request (Linux
    SO_PEERCRED), None when the transport cannot say."""
    try:
        sock = req.transport.get_extra_info("socket") if req.transport is not None else None
        if sock is None or not hasattr(socket, "SO_PEERCRED"):
            return None
        pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (OSError, AttributeError, struct.error):
        return None
    return f"uid {uid} pid {pid}"


def _audited(addons: Addon, action: str | None, handler: Handler, caller: str = "token") -> Handler:
    """``handler`` that reports each request to ``addons`` once answered (see module doc)."""

    async def wrapped(req: Request) -> Response:
        remote = req.remote if caller == "token" else peer_credentials(req)
        record = AdminRequest(action or req.match_info.get("question", "?"), caller=caller, remote=remote)
        if record.action in QUESTIONS:
            record.filters = {k: v for k, v in req.query.items()}
        elif record.action == "sql":
            with contextlib.suppress(Exception):  # best effort: the handler judges the body
                body = orjson.loads(await req.read())
                if isinstance(body, dict):
                    record.sql = body["sql"] if isinstance(body.get("sql"), str) else None
                    record.params = body["params"] if isinstance(body.get("params"), dict) else None
        reset = _RECORD.set(record)
        try:
            resp = await handler(req)
        except Exception as exc:
            record.status, record.message = 500, f"{type(exc).__name__}: {exc}"
            addons.admin_request(record)
            raise
        finally:
            _RECORD.reset(reset)
        record.status = resp.status
        if resp.status == 401:
            addons.auth_failed(req.remote, ADMIN_SERVER, failure_reason(req.headers.get("Authorization")))
            return resp
        if resp.status >= 400 or record.action == "reload":
            with contextlib.suppress(Exception):
                doc = orjson.loads(resp.body)  # type: ignore[arg-type]
                if resp.status >= 400:
                    record.error = record.error or str(doc.get("error"))
                    record.message = str(doc.get("message"))
                elif isinstance(doc, dict):
                    record.results = doc
        addons.admin_request(record)
        return resp

    return wrapped


def add_admin_routes(
    app: App,
    token: str | None,
    answer: AnswerFn,
    reload: ReloadFn | None = None,
    addons: Addon | None = None,
    *,
    health: Handler | None = None,
) -> None:
    """Mount the admin API on ``app`` (see the module doc for routes and the error contract).
    With ``addons``, every request is reported to them (admin_request / auth_failed).

    ``token=None`` mounts it with no authentication, for the owner-only local socket only
    (never on the TCP listener). ``health`` (a handler) is served as ``GET /admin/health``
    behind the same check."""
    if token is not None and not token:
        raise ValueError("the admin API needs a non-empty admin token")
    if addons is not None:
        answer = _recording(answer)
    expected = f"Bearer {token}".encode()
    caller = "token" if token is not None else "socket"

    def authorized(req: Request) -> bool:
        if token is None:  # the local socket: its file mode let the caller in
            return True
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, expected)

    async def run(question: str, params: dict[str, Any]) -> Response:
        try:
            result = await answer(question, params)
            columns, rows = result
        except Exception as exc:
            status, kind = classify_error(exc)
            if status >= 500:
                log.error("admin %s failed: %s: %s", question, type(exc).__name__, exc, exc_info=exc)
            return _error(status, kind, str(exc) or type(exc).__name__)
        lag = getattr(result, "lag", None)  # tables behind the log: {"events": n, "seconds": s}
        lag_doc = lag.as_json() if lag is not None else None
        rebuilding = getattr(result, "rebuilding", None)
        rb_doc = rebuilding.as_json() if rebuilding is not None else None
        # a big answer takes a while to encode: off the event loop, agents' calls go on
        body = (
            await asyncio.to_thread(answer_json, columns, rows, lag_doc, rb_doc)
            if len(rows) > 1000
            else answer_json(columns, rows, lag_doc, rb_doc)
        )
        return Response(body=body, content_type="application/json")

    async def audit(req: Request) -> Response:
        if not authorized(req):
            return _error(401, "unauthorized", "missing or wrong admin token")
        question = req.match_info["question"]
        allowed = FILTERS[question]
        params: dict[str, Any] = {}
        for key, value in req.query.items():
            if key not in allowed:
                return _error(
                    400, "bad_request", f"{question}: unknown filter {key!r}; known: {', '.join(allowed)}"
                )
            if key in params:
                return _error(400, "bad_request", f"{question}: filter {key!r} given more than once")
            params[key] = value
        if question == "who" and not params.get("tool"):
            return _error(400, "bad_request", "who: the tool filter is required (?tool=NAME)")
        return await run(question, params)

    async def sql(req: Request) -> Response:
        if not authorized(req):
            return _error(401, "unauthorized", "missing or wrong admin token")
        try:
            body = orjson.loads(await req.read())
        except orjson.JSONDecodeError as exc:
            return _error(400, "bad_request", f"body is not JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("sql"), str) or not body["sql"].strip():
            return _error(400, "bad_request", 'body must be {"sql": "SELECT ...", "params": {...}}')
        extra = set(body) - {"sql", "params"}
        if extra:
            return _error(400, "bad_request", f"unknown keys in body: {', '.join(sorted(extra))}")
        params = body.get("params") or {}
        if not isinstance(params, dict):
            return _error(400, "bad_request", "params must be an object of name -> value")
        return await run("sql", {"sql": body["sql"], "params": params})

    async def do_reload(req: Request) -> Response:
        if not authorized(req):
            return _error(401, "unauthorized", "missing or wrong admin token")
        assert reload is not None
        results = reload()
        # a policy that failed to load is an error for the caller, not a 200 with a message
        return json_response(results, 422 if any(v is not None for v in results.values()) else 200)

    def hooked(action: str | None, handler: Handler) -> Handler:
        return handler if addons is None else _audited(addons, action, handler, caller)

    app.add_get("/admin/audit/{question:who|calls|denials}", hooked(None, audit))
    app.add_post("/admin/audit/sql", hooked("sql", sql))
    if reload is not None:
        app.add_post("/admin/policies/reload", hooked("reload", do_reload))
    if health is not None:
        detail = health

        async def guarded_health(req: Request) -> Response:
            if not authorized(req):
                return _error(401, "unauthorized", "missing or wrong admin token")
            return await detail(req)

        app.add_get("/admin/health", guarded_health)


EventsFn = Callable[[dict[str, str]], Awaitable[AsyncIterator[tuple[int, str, bytes]]]]
KEEPALIVE_S = 15.0


def add_event_stream(
    app: App,
    token: str | None,
    events: EventsFn,
    addons: Addon | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> None:
    """``GET /admin/events?follow=1&kind=call,alert&tool=&server=&agent=&grant=&decision=&rule=``:
    decided events and alerts as Server-Sent Events (``id:`` the log offset, ``event:`` the kind,
    ``data:`` the event JSON), for a dashboard and the CLI's live views. ``follow=1`` keeps the
    stream open (a ``: keepalive`` comment every ``keepalive_s``); without it the stream ends at
    the end of the log. ``Last-Event-ID`` (or ``from=OFFSET``) resumes after that offset.
    ``events`` (the composition root's) raises ValueError for bad parameters -> 400."""
    expected = f"Bearer {token}".encode() if token is not None else None  # None: the owner-only socket

    async def stream(req: Request) -> StreamResponse:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if expected is not None and not hmac.compare_digest(given, expected):
            if addons is not None:
                addons.auth_failed(req.remote, ADMIN_SERVER, failure_reason(req.headers.get("Authorization")))
            return _error(401, "unauthorized", "missing or wrong admin token")
        params = dict(req.query)
        last = req.headers.get("Last-Event-ID")
        if last and "from" not in params and last.isdigit():
            params["from"] = str(int(last) + 1)
        try:
            it = await events(params)
        except ValueError as exc:
            return _error(400, "bad_request", str(exc))
        resp = StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(req)
        nxt: asyncio.Future[tuple[int, str, bytes]] | None = None
        try:
            while True:
                if nxt is None:
                    nxt = asyncio.ensure_future(anext(it))
                done, _ = await asyncio.wait({nxt}, timeout=keepalive_s)
                if not done:
                    await resp.write(b": keepalive\n\n")  # also finds a client that went away
                    continue
                try:
                    offset, kind, payload = nxt.result()
                except StopAsyncIteration:
                    break
                nxt = None
                await resp.write(b"id: %d\nevent: %s\ndata: %s\n\n" % (offset, kind.encode(), payload))
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away (or the server stops)
        finally:
            if nxt is not None and not nxt.done():
                nxt.cancel()
            with contextlib.suppress(BaseException):
                await it.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    app.add_get("/admin/events", stream)


def add_simulate_route(app: App, token: str, simulate: SimulateFn) -> None:
    """Mount ``POST /admin/policies/simulate`` (see the module doc) behind the admin token."""
    if not token:
        raise ValueError("the admin API needs a non-empty admin token")
    expected = f"Bearer {token}".encode()

    async def do_simulate(req: Request) -> Response:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return _error(401, "unauthorized", "missing or wrong admin token")
        server = req.query.get("server")
        if not server:
            return _error(400, "bad_request", "simulate: the server is required (?server=NAME)")
        extra = set(req.query) - {"server", "since"}
        if extra:
            return _error(400, "bad_request", f"simulate: unknown parameters: {', '.join(sorted(extra))}")
        body = await req.read()
        try:
            doc = await simulate(body, server, req.query.get("since"))
        except ValueError as exc:  # PolicyError is a ValueError: a broken candidate policy
            return _error(400, "bad_request", str(exc))
        except Exception as exc:
            log.error("admin simulate failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            return _error(503, "store_unavailable", f"{type(exc).__name__}: {exc}")
        return json_response(doc)

    app.add_post("/admin/policies/simulate", do_simulate)


def add_approval_routes(app: App, token: str | None, approvals: Any) -> None:
    """Mount ``GET /admin/approvals`` and ``POST /admin/approvals/{id}`` (module doc) for
    ``approvals`` (gateway.approvals_live.LiveApprovals). ``token=None``: the owner-only
    local socket, no authentication."""
    if token is not None and not token:
        raise ValueError("the admin API needs a non-empty admin token")
    expected = f"Bearer {token}".encode()

    def authorized(req: Request) -> bool:
        if token is None:
            return True
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, expected)

    async def listing(req: Request) -> Response:
        if not authorized(req):
            return _error(401, "unauthorized", "missing or wrong admin token")
        return json_response({"pending": [approvals.as_json(r) for r in approvals.pending()]})

    async def resolve(req: Request) -> Response:
        if not authorized(req):
            return _error(401, "unauthorized", "missing or wrong admin token")
        default_by = "token" if token is not None else (peer_credentials(req) or "socket")
        return resolve_approval(approvals, req.match_info["id"], await req.read(), default_by)

    app.add_get("/admin/approvals", listing)
    app.add_post("/admin/approvals/{id}", resolve)


def resolve_approval(
    approvals: Any, rid: str, raw: bytes, default_by: str, *, by_allowed: bool = True
) -> Response:
    """Decide held call ``rid`` from a request body ``{"decision": "approve"|"deny", "comment":
    ..., "by": ...}`` (module doc for the answers). The one path of every approver's HTTP
    surface: ``POST /admin/approvals/{id}`` and the dashboard's ``POST /ui/api/approvals/{id}``
    (``by_allowed=False``: the page cannot name someone else, ``default_by`` is recorded)."""
    from gateway.approvals_live import ApprovalError, resolution_json

    try:
        body = orjson.loads(raw or b"{}")
    except orjson.JSONDecodeError as exc:
        return _error(400, "bad_request", f"body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "bad_request", 'body must be {"decision": "approve"|"deny", "comment": ...}')
    extra = set(body) - ({"decision", "comment", "by"} if by_allowed else {"decision", "comment"})
    if extra:
        return _error(400, "bad_request", f"unknown keys in body: {', '.join(sorted(extra))}")
    decision = body.get("decision")
    if decision not in ("approve", "deny"):
        return _error(400, "bad_request", 'decision must be "approve" or "deny"')
    comment, by = body.get("comment"), body.get("by")
    if not isinstance(comment, str | None) or not isinstance(by, str | None):
        return _error(400, "bad_request", "comment and by must be strings")
    try:
        fn = approvals.approve if decision == "approve" else approvals.deny
        res = fn(rid, by or default_by, comment or None)
    except ApprovalError as exc:
        known = approvals.state.resolution(rid) is not None
        return _error(409 if known else 404, "conflict" if known else "not_found", str(exc))
    return json_response({"resolution": resolution_json(res)})
