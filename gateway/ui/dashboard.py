"""The dashboard at /ui: server-rendered HTML, a small vanilla script, no build step, no CDN.

Who gets in: a browser that logged in with the admin token (``POST /ui/login`` -> a random
session cookie, HttpOnly, SameSite=Strict, path /ui, 12 h), or any request that arrived
over a Unix socket (a local user who can reach the socket could read the data dir anyway).

Every forensic view is answered by the same ``answer(question, params)`` callable as the
admin API and the CLI (who / calls / denials, or read-only SQL over the same tables), so
the page and ``ledgergate audit ...`` always agree. Routes (JSON unless said):

- ``GET /ui`` the page (or the login form); ``POST /ui/login``, ``POST /ui/logout``
- ``GET /ui/static/{app.js|app.css}``
- ``GET /ui/api/{who|calls|denials}?...`` the admin API's filters
- ``GET /ui/api/call?call_id=`` one call's full record (arguments as stored: redacted)
- ``GET /ui/api/refusals?since=&until=`` refusals per minute and rule
- ``GET /ui/api/top?since=&until=`` top agents and tools
- ``GET /ui/api/inventory`` each server's tools with the rule that applies (from the live policies)
- ``GET /ui/api/approvals`` the held calls (``{"pending": [...]}``, as ``GET /admin/approvals``)
- ``POST /ui/api/approvals/{id}`` ``{"decision": "approve"|"deny", "comment": ...}``: decided by
  ``gateway.admin.resolve_approval`` on the proxy's live approvals (the admin API's one path),
  ``by`` recorded as ``dashboard``. Against cross-site requests, besides the SameSite=Strict
  cookie, it needs the header ``X-Requested-With: ledgergate-ui`` (a form cannot send it and a
  cross-origin script cannot without a CORS preflight, which nothing here answers)
- ``GET /ui/stream`` server-sent events: ``decided`` / ``completed`` of each call, from the
  event log's tail (fed by the ``events`` callable of the composition root)

Each question is reported to the addons (``admin_request``), like the admin API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp.web import Response, StreamResponse

from gateway.admin import FILTERS, answer_json, classify_error, resolve_approval
from gateway.audit.hooks import Addon, AdminRequest
from gateway.auth import failure_reason
from gateway.edge import App, Request
from schemas.policy import window_text

AnswerFn = Callable[[str, dict[str, Any]], Awaitable[tuple[list[str], list[tuple[Any, ...]]]]]
# the composition root's log tail: endless batches of event payloads (JSON bytes) from now on
EventsFn = Callable[[], AsyncIterator[list[bytes]]]

COOKIE = "ledgergate_ui"
SESSION_S = 12 * 3600
UI_SERVER = "(ui)"  # the server name of auth.failed events of the dashboard's login
REFUSED = ("deny", "rate_limited", "invalid_arguments")
STREAM_KINDS = frozenset({"call.decided", "call.completed"})
HEARTBEAT_S = 15.0
CSRF_HEADER, CSRF_VALUE = "X-Requested-With", "ledgergate-ui"
APPROVER = "dashboard"  # the `by` of decisions taken here: the login is the admin token, no name
_STATIC = {"app.js": "application/javascript", "app.css": "text/css"}

CALL_SQL = (
    "SELECT c.ts AS ts, c.call_id AS call_id, c.server AS server, c.method AS method, c.tool AS tool,\n"
    "  c.`grant` AS `grant`, c.agent AS agent, c.session AS session, c.remote AS remote,\n"
    "  c.client_name AS client_name, c.arguments AS arguments, c.decision AS decision, c.rule AS rule,\n"
    "  c.reason AS reason, c.retry_after_s AS retry_after_s, c.counters AS counters,\n"
    "  c.policy_version AS policy_version, o.outcome AS outcome, o.error_code AS error_code,\n"
    "  o.error_message AS error_message, o.upstream_ms AS upstream_ms, o.response_bytes AS response_bytes\n"
    "FROM audit_calls AS c FINAL\n"
    "LEFT JOIN (\n"
    "  SELECT call_id, argMax(outcome, ts) AS outcome, argMax(error_code, ts) AS error_code,\n"
    "    argMax(error_message, ts) AS error_message, argMax(upstream_ms, ts) AS upstream_ms,\n"
    "    argMax(response_bytes, ts) AS response_bytes\n"
    "  FROM audit_outcomes FINAL WHERE call_id = {call_id:String} GROUP BY call_id\n"
    ") AS o ON c.call_id = o.call_id\n"
    "WHERE c.call_id = {call_id:String}"
)


_REL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def when(text: str, now: datetime | None = None) -> datetime:
    """ "1h", "30m", "7d" (before now) or an ISO 8601 datetime (naive = UTC), as the CLI reads
    --since (consumers.forensics.parse_since; the gateway does not import consumers)."""
    m = _REL.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[m[2].lower()]: float(m[1])})
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a duration (7d, 1h, 30m) nor an ISO datetime: {text!r}") from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _range(params: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """``AND`` conditions on ``ts`` for since/until."""
    conds, p = "", {}
    if params.get("since"):
        conds += " AND ts >= {since:DateTime64(3, 'UTC')}"
        p["since"] = when(params["since"])
    if params.get("until"):
        conds += " AND ts < {until:DateTime64(3, 'UTC')}"
        p["until"] = when(params["until"])
    return conds, p


_REFUSED_IN = "(" + ", ".join(f"'{d}'" for d in REFUSED) + ")"


def refusals_sql(params: dict[str, str]) -> tuple[str, dict[str, Any]]:
    conds, p = _range(params)
    return (
        "SELECT toStartOfMinute(ts) AS minute, rule, decision, count() AS count\n"
        f"FROM audit_calls FINAL WHERE decision IN {_REFUSED_IN}{conds}\n"
        "GROUP BY minute, rule, decision ORDER BY minute, rule",
        p,
    )


def top_sql(params: dict[str, str], by: str) -> tuple[str, dict[str, Any]]:
    conds, p = _range(params)
    col = "agent" if by == "agent" else "if(tool = '', method, tool)"
    return (
        f"SELECT {col} AS {by}, count() AS calls,\n"
        f"  countIf(decision IN {_REFUSED_IN}) AS refused\n"
        f"FROM audit_calls FINAL WHERE decision != ''{conds}\n"
        f"GROUP BY {by} ORDER BY calls DESC, {by} LIMIT 20",
        p,
    )


def inventory(policies: Any) -> list[dict[str, Any]]:
    """Each server's tools as its live policy names them, with the rule that applies, and the
    default for every other tool (the effective rule; tools/list is not needed)."""
    rows: list[dict[str, Any]] = []
    for server in sorted(policies.current):
        lp = policies[server]
        model = lp.model
        for name in sorted(lp.tools):
            plan = lp.tools[name]
            rule = model.tools.get(name)
            rows.append(
                {
                    "server": server,
                    "tool": name,
                    "action": "deny"
                    if plan.denied
                    else ("approve" if plan.approval is not None else "allow"),
                    "rule": plan.action_pointer,
                    "limits": [
                        f"{lim.max} per {window_text(lim.window_s)} per {lim.scope} ({lim.pointer})"
                        for lim in plan.limits
                    ],
                    "arguments_schema": plan.validate is not None,
                    "redact": list(lp.redact_paths(name)),
                    "reason": rule.reason if rule is not None else None,
                }
            )
        rows.append(
            {
                "server": server,
                "tool": "*",
                "action": "allow" if lp.default_allow else "deny",
                "rule": "/default",
                "limits": [],
                "arguments_schema": False,
                "redact": [],
                "reason": lp.default_reason,
            }
        )
    return rows


class Dashboard:
    def __init__(
        self,
        token: str,
        answer: AnswerFn,
        policies: Any,
        addons: Addon | None = None,
        events: EventsFn | None = None,
        clock: Callable[[], float] = time.time,
        approvals: Any = None,
    ) -> None:
        self._token = token.encode()
        self.answer = answer
        self.policies = policies
        self.addons = addons
        self.events = events
        self.clock = clock
        self.approvals = approvals  # gateway.approvals_live.LiveApprovals (the proxy's)
        self.sessions: dict[str, float] = {}  # cookie value -> expiry
        self.closing = asyncio.Event()

    def close(self) -> None:
        """End the open event streams (before the server's graceful shutdown waits for them)."""
        self.closing.set()

    # ---- who gets in ------------------------------------------------------------------

    def authorized(self, req: Request) -> bool:
        sock = req.transport.get_extra_info("socket") if req.transport is not None else None
        if sock is not None and getattr(sock, "family", None) == socket.AF_UNIX:
            return True
        sid = req.cookies.get(COOKIE)
        if not sid:
            return False
        exp = self.sessions.get(sid)
        if exp is None:
            return False
        if exp < self.clock():
            del self.sessions[sid]
            return False
        return True

    async def login(self, req: Request) -> Response:
        form = parse_qs((await req.read()).decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._token):
            if self.addons is not None:
                self.addons.auth_failed(req.remote, UI_SERVER, failure_reason(f"Bearer {given.decode()}"))
            return _html(401, login_page("Wrong admin token."))
        now = self.clock()
        self.sessions = {k: v for k, v in self.sessions.items() if v > now}
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = now + SESSION_S
        resp = Response(status=303, headers={"Location": "/ui"})
        resp.set_cookie(COOKIE, sid, path="/ui", httponly=True, samesite="Strict", max_age=SESSION_S)
        return resp

    async def logout(self, req: Request) -> Response:
        sid = req.cookies.get(COOKIE)
        if sid:
            self.sessions.pop(sid, None)
        resp = Response(status=303, headers={"Location": "/ui"})
        resp.del_cookie(COOKIE, path="/ui")
        return resp

    # ---- pages ------------------------------------------------------------------------

    async def page(self, req: Request) -> Response:
        if not self.authorized(req):
            return _html(200, login_page())
        return _html(200, dashboard_page(sorted(self.policies.current)))

    async def static(self, req: Request) -> Response:
        name = req.match_info["name"]
        body = resources.files("gateway.ui").joinpath("static", name).read_bytes()
        return Response(body=body, headers={"Content-Type": _STATIC[name], "Cache-Control": "no-cache"})

    # ---- data -------------------------------------------------------------------------

    async def _ask(self, req: Request, question: str, params: dict[str, Any]) -> Response:
        record = AdminRequest(question if question in FILTERS else "sql", remote=req.remote)
        if question in FILTERS:
            record.filters = {k: str(v) for k, v in params.items()}
        else:
            record.sql, record.params = params.get("sql"), params.get("params")
        try:
            result = await self.answer(question, params)
            columns, rows = result
        except Exception as exc:
            status, kind = classify_error(exc)
            record.status, record.error, record.message = status, kind, str(exc)
            if self.addons is not None:
                self.addons.admin_request(record)
            return _json(status, {"error": kind, "message": str(exc) or type(exc).__name__})
        record.status, record.row_count = 200, len(rows)
        if self.addons is not None:
            self.addons.admin_request(record)
        lag = getattr(result, "lag", None)
        return Response(
            body=answer_json(columns, rows, lag.as_json() if lag is not None else None),
            content_type="application/json",
        )

    async def api(self, req: Request) -> Response:
        if not self.authorized(req):
            return _json(401, {"error": "unauthorized", "message": "log in at /ui"})
        view = req.match_info["view"]
        q = {k: v for k, v in req.query.items() if v != ""}
        if view in FILTERS:
            unknown = set(q) - set(FILTERS[view])
            if unknown:
                return _json(
                    400, {"error": "bad_request", "message": f"unknown filter {sorted(unknown)[0]!r}"}
                )
            if view == "who" and not q.get("tool"):
                return _json(400, {"error": "bad_request", "message": "who: the tool filter is required"})
            return await self._ask(req, view, q)
        if view == "call":
            if not q.get("call_id"):
                return _json(400, {"error": "bad_request", "message": "call_id is required"})
            return await self._ask(req, "sql", {"sql": CALL_SQL, "params": {"call_id": q["call_id"]}})
        if view in ("refusals", "top_agents", "top_tools"):
            try:
                if view == "refusals":
                    text, params = refusals_sql(q)
                else:
                    text, params = top_sql(q, "agent" if view == "top_agents" else "tool")
            except ValueError as exc:
                return _json(400, {"error": "bad_request", "message": str(exc)})
            return await self._ask(req, "sql", {"sql": text, "params": params})
        if view == "inventory":
            return _json(200, {"rows": inventory(self.policies)})
        if view == "approvals" and self.approvals is not None:
            return _json(200, {"pending": [self.approvals.as_json(r) for r in self.approvals.pending()]})
        return _json(404, {"error": "not_found", "message": f"no view {view!r}"})

    async def decide(self, req: Request) -> Response:
        """Approve or deny one held call (module doc)."""
        if not self.authorized(req):
            return _json(401, {"error": "unauthorized", "message": "log in at /ui"})
        if req.headers.get(CSRF_HEADER) != CSRF_VALUE:
            return _json(403, {"error": "forbidden", "message": f"missing {CSRF_HEADER} header"})
        if self.approvals is None:
            return _json(404, {"error": "not_found", "message": "no approvals on this gateway"})
        return resolve_approval(
            self.approvals, req.match_info["id"], await req.read(), APPROVER, by_allowed=False
        )

    async def stream(self, req: Request) -> StreamResponse:
        """Server-sent events of the calls decided and completed from now on."""
        if not self.authorized(req):
            return _json(401, {"error": "unauthorized", "message": "log in at /ui"})
        if self.events is None:
            return _json(404, {"error": "not_found", "message": "no event stream on this gateway"})
        resp = StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(req)
        queue: asyncio.Queue[list[bytes]] = asyncio.Queue(maxsize=64)
        source = self.events()

        async def pump() -> None:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for batch in source:
                    await queue.put(batch)

        task = asyncio.create_task(pump(), name="ui-stream")
        closing = asyncio.create_task(self.closing.wait())
        try:
            await resp.write(b": connected\n\n")
            while not self.closing.is_set() and not task.done():
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {get, closing, task}, timeout=HEARTBEAT_S, return_when="FIRST_COMPLETED"
                )
                if get not in done:
                    get.cancel()
                    if not done:
                        await resp.write(b": keep-alive\n\n")  # a dead client shows up as a write error
                    continue
                out = bytearray()
                for payload in get.result():
                    ev = _stream_event(payload)
                    if ev is not None:
                        out += ev
                if out:
                    await resp.write(bytes(out))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            closing.cancel()
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        return resp


_STREAM_KEYS = (
    "call_id",
    "ts",
    "server",
    "method",
    "tool",
    "grant",
    "agent",
    "decision",
    "rule",
    "reason",
    "outcome",
    "upstream_ms",
    "error_message",
)


def _stream_event(payload: bytes) -> bytes | None:
    try:
        ev = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    kind = ev.get("kind") if isinstance(ev, dict) else None
    if kind not in STREAM_KINDS:
        return None
    doc = {k: ev[k] for k in _STREAM_KEYS if k in ev}
    name = b"decided" if kind == "call.decided" else b"completed"
    return b"event: " + name + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def _json(status: int, doc: Any) -> Response:
    return Response(status=status, body=orjson.dumps(doc), content_type="application/json")


def _html(status: int, text: str) -> Response:
    return Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            # everything is served from /ui/static: no inline script, no third party
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _template(name: str) -> str:
    return resources.files("gateway.ui").joinpath("templates", name).read_text()


def login_page(error: str | None = None) -> str:
    msg = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    return _template("login.html").replace("{{error}}", msg)


def dashboard_page(servers: list[str]) -> str:
    options = "".join(f'<option value="{html.escape(s)}">{html.escape(s)}</option>' for s in servers)
    return _template("dashboard.html").replace("{{server_options}}", options)


def add_ui_routes(
    app: App,
    token: str,
    answer: AnswerFn,
    policies: Any,
    addons: Addon | None = None,
    events: EventsFn | None = None,
    approvals: Any = None,
) -> Dashboard:
    """Mount the dashboard on ``app`` (see the module doc); returns it (``close()`` at shutdown)."""
    ui = Dashboard(token, answer, policies, addons, events, approvals=approvals)
    app.add_get("/ui", ui.page)
    app.add_post("/ui/login", ui.login)
    app.add_post("/ui/logout", ui.logout)
    app.add_get("/ui/static/{name:app\\.js|app\\.css}", ui.static)
    app.add_get("/ui/api/{view}", ui.api)
    app.add_post("/ui/api/approvals/{id}", ui.decide)
    app.add_get("/ui/stream", ui.stream)
    return ui
