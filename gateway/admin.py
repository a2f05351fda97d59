"""The admin HTTP API: forensic questions and policy reload, JSON, behind a bearer token.

Routes (all need ``Authorization: Bearer <[gateway] admin_token>``; a missing or wrong
token gets 401 with ``WWW-Authenticate: Bearer``):

- ``GET /admin/audit/{who|calls|denials}?tool=&server=&since=&until=&decision=&agent=&grant=&limit=``
- ``POST /admin/audit/sql`` with ``{"sql": "SELECT ...", "params": {"name": value, ...}}``
- ``POST /admin/policies/reload`` (only when a ``reload`` callable is given)

Audit answers are ``{"columns": [...], "rows": [[...], ...]}``; datetimes are ISO 8601
strings (orjson's form, e.g. ``2025-01-06T10:00:00+00:00``). When a limit cut the answer
(``[store] query_max_rows`` / ``query_max_bytes``) it also has ``"truncated": true`` and
``"note": <text>``. Errors are ``{"error": <kind>, "message": <text>}``.

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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from gateway.httpserver import App, Request, Response

log = logging.getLogger("ledgergate.admin")

Answer = tuple[list[str], list[tuple[Any, ...]]]
AnswerFn = Callable[[str, dict[str, Any]], Awaitable[Answer]]
ReloadFn = Callable[[], dict[str, str | None]]

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


def answer_json(columns: list[str], rows: list[tuple[Any, ...]]) -> bytes:
    """``{"columns": [...], "rows": [[...], ...]}`` (datetimes as ISO strings), plus
    ``"truncated": true, "note": ...`` when the rows carry a note."""
    doc: dict[str, Any] = {"columns": list(columns), "rows": rows}
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


def _json(status: int, doc: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def _error(status: int, kind: str, message: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="ledgergate-admin"'} if status == 401 else None
    return _json(status, {"error": kind, "message": message}, headers)


def add_admin_routes(
    app: App,
    token: str,
    answer: AnswerFn,
    reload: ReloadFn | None = None,
) -> None:
    """Mount the admin API on ``app`` (see the module doc for routes and the error contract)."""
    if not token:
        raise ValueError("the admin API needs a non-empty admin token")
    expected = f"Bearer {token}".encode()

    def authorized(req: Request) -> bool:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, expected)

    async def run(question: str, params: dict[str, Any]) -> Response:
        try:
            columns, rows = await answer(question, params)
        except Exception as exc:
            status, kind = classify_error(exc)
            if status >= 500:
                log.error("admin %s failed: %s: %s", question, type(exc).__name__, exc, exc_info=exc)
            return _error(status, kind, str(exc) or type(exc).__name__)
        # a big answer takes a while to encode: off the event loop, agents' calls go on
        body = (
            await asyncio.to_thread(answer_json, columns, rows)
            if len(rows) > 1000
            else answer_json(columns, rows)
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
        return _json(200, reload())

    app.add_get("/admin/audit/{question:who|calls|denials}", audit)
    app.add_post("/admin/audit/sql", sql)
    if reload is not None:
        app.add_post("/admin/policies/reload", do_reload)
