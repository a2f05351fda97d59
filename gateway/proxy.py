"""MCP Streamable HTTP toward agents: authenticate, decide, log, forward or refuse.

POST /mcp/{server}   one JSON-RPC message (request -> JSON or SSE; notification/response -> 202)
GET  /mcp/{server}   the server-to-client SSE stream (or the upstream's 405)
DELETE /mcp/{server} end the session

Order of checks on every request: Host/Origin (403), credentials (401), server (404),
MCP-Protocol-Version (400), body size (413), JSON-RPC shape (400), session (400/404).
Only tools/call is policed; every other method is forwarded untouched (and still
logged). Only tools/list answers are rewritten (tools the grant can never call are
dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp.web import HTTPRequestEntityTooLarge, Response, StreamResponse

from eventlog.ratelog import AggregatingLog
from gateway.audit.hooks import Addon
from gateway.auth import Authenticator, Grant, failure_reason
from gateway.edge import Request
from gateway.mcp import jsonrpc
from gateway.mcp.flow import CallFlow
from gateway.mcp.jsonrpc import InvalidMessage, Kind
from gateway.mcp.sessions import MODERN_VERSIONS, SUPPORTED_VERSIONS, Session, SessionRegistry, new_session_id
from gateway.policy.engine import Call, Decision, can_ever_call, decide, refusal_text
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from gateway.upstreams.base import BODY, MESSAGE, STARTED, Upstream, error_response, json_response

log = logging.getLogger("ledgergate.proxy")
_UNRECORDED = AggregatingLog(log, 10.0)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# the audit `rule` of a request-only method (tools/call...) that arrived as a notification
NOTIFICATION_RULE = "gateway:request-only-method-as-notification"


class Proxy:
    def __init__(
        self,
        *,
        auth: Authenticator,
        policies: PolicySet,
        upstreams: dict[str, Upstream],
        addons: Addon,
        max_body_bytes: int,
        session_idle_timeout_s: float,
        allowed_hosts: list[str] | None = None,
        allowed_origins: list[str] | None = None,
        clock: Callable[[], float] = time.time,
        max_sessions_per_grant: int = 256,
        max_inflight_per_grant: int = 64,
    ) -> None:
        self.auth = auth
        self.policies = policies
        self.upstreams = upstreams
        self.addons = addons
        self.max_body_bytes = max_body_bytes
        self.sessions = SessionRegistry(session_idle_timeout_s)
        self.limiters: dict[str, Limiter] = {name: Limiter() for name in upstreams}
        self.clock = clock
        self.allowed_hosts = LOOPBACK_HOSTS | {h.lower() for h in allowed_hosts or ()}
        self.allowed_origins = {o.lower().rstrip("/") for o in allowed_origins or ()}
        self.max_sessions_per_grant = max_sessions_per_grant
        self.max_inflight_per_grant = max_inflight_per_grant
        self.inflight: dict[str, int] = {}  # grant name -> POSTs being handled

    # ---- checks shared by POST, GET and DELETE -------------------------------------------

    def _host_ok(self, req: Request) -> bool:
        host = (req.headers.get("Host") or "").lower()
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name not in self.allowed_hosts:
            return False
        origin = req.headers.get("Origin")
        if origin is None:
            return True
        origin = origin.lower().rstrip("/")
        if origin in self.allowed_origins:
            return True
        oh = urlsplit(origin).hostname
        return oh is not None and (oh in LOOPBACK_HOSTS or oh in self.allowed_hosts)

    def _front(self, req: Request) -> tuple[Grant, str] | Response:
        if not self._host_ok(req):
            return error_response(
                403,
                jsonrpc.INVALID_REQUEST,
                "Forbidden: Host or Origin not allowed (DNS rebinding protection)",
            )
        authorization = req.headers.get("Authorization")
        grant = self.auth.authenticate(authorization)
        if grant is None:
            # a security event (aggregated by the audit addon: a flood costs no fsync per 401)
            server = req.match_info.get("server", "")
            self.addons.auth_failed(req.remote, server, failure_reason(authorization))
            why = "missing" if "Authorization" not in req.headers else "invalid"
            return error_response(
                401,
                jsonrpc.INVALID_REQUEST,
                f"Unauthorized: {why} bearer key",
                headers={
                    "WWW-Authenticate": f'Bearer realm="ledgergate", error="invalid_token", '
                    f'error_description="{why} bearer key"'
                },
            )
        server = req.match_info["server"]
        if server not in self.upstreams:
            return error_response(404, jsonrpc.INVALID_REQUEST, f"Not Found: no MCP server named {server!r}")
        version = req.headers.get("MCP-Protocol-Version")
        if version is not None and version not in SUPPORTED_VERSIONS:
            hint = (
                " (the stateless 2026-07-28 revision is not served yet)" if version in MODERN_VERSIONS else ""
            )
            return error_response(
                400,
                jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
                f"Bad Request: unsupported MCP-Protocol-Version {version!r}{hint}",
                data={"supported": sorted(SUPPORTED_VERSIONS), "requested": version},
            )
        return grant, server

    def _session(self, req: Request, grant: Grant, server: str) -> Session | Response:
        sid = req.headers.get("Mcp-Session-Id")
        if not sid:
            return error_response(
                400, jsonrpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required"
            )
        s = self.sessions.get(sid)
        if s is None or s.server != server or s.grant is not grant:
            return error_response(
                404, jsonrpc.INVALID_REQUEST, "Not Found: unknown or expired session; initialize a new one"
            )
        if s.state.get("upstream_gone"):
            self._close(s, "upstream_gone")
            return error_response(
                404,
                jsonrpc.INVALID_REQUEST,
                "Not Found: the upstream ended this session; initialize a new one",
            )
        s.touch()
        return s

    # ---- handlers ---------------------------------------------------------------------------

    async def post(self, req: Request) -> StreamResponse:
        front = self._front(req)
        if isinstance(front, Response):
            return front
        grant, server = front
        n = self.inflight.get(grant.name, 0)
        if n >= self.max_inflight_per_grant:
            return self._too_many(f"{n} calls of this grant are in flight (max_inflight_per_grant)", 1)
        self.inflight[grant.name] = n + 1
        try:
            return await self._post(req, grant, server)
        finally:
            n = self.inflight[grant.name] - 1
            if n:
                self.inflight[grant.name] = n
            else:
                del self.inflight[grant.name]

    async def _post(self, req: Request, grant: Grant, server: str) -> StreamResponse:
        if req.content_length is not None and req.content_length > self.max_body_bytes:
            return self._too_large()
        body = await self._read_body(req)
        if body is None:
            return self._too_large()
        try:
            msg, kind = jsonrpc.parse(body)
        except InvalidMessage as exc:
            return error_response(400, exc.code, exc.message, exc.id)
        req[BODY] = body
        req[MESSAGE] = msg
        upstream = self.upstreams[server]
        if kind is Kind.REQUEST and msg["method"] == "initialize":
            return await self._initialize(req, msg, grant, server, upstream)
        session = self._session(req, grant, server)
        if isinstance(session, Response):
            return session
        if kind is Kind.NOTIFICATION and not msg["method"].startswith("notifications/"):
            return await self._refuse_notification(req, msg, grant, server, session)
        if kind is not Kind.REQUEST:
            try:
                return await upstream.send(session, msg, req)
            except Exception:
                if req.get(STARTED):
                    raise
                log.exception("%s: forwarding a client %s failed", server, kind.value)
                return error_response(
                    500, jsonrpc.INTERNAL_ERROR, "Internal error: the message was not forwarded"
                )
        return await self._call(req, msg, grant, server, session, upstream)

    async def get(self, req: Request) -> StreamResponse:
        front = self._front(req)
        if isinstance(front, Response):
            return front
        grant, server = front
        if "text/event-stream" not in req.headers.get("Accept", ""):
            return error_response(
                406, jsonrpc.INVALID_REQUEST, "Not Acceptable: GET needs Accept: text/event-stream"
            )
        session = self._session(req, grant, server)
        if isinstance(session, Response):
            return session
        session.active += 1
        try:
            return await self.upstreams[server].open_stream(session, req)
        finally:
            session.active -= 1
            session.touch()

    async def head(self, req: Request) -> StreamResponse:
        front = self._front(req)
        if isinstance(front, Response):
            return front
        # answered here: a HEAD relayed as GET would pull an endless upstream stream to drop it
        return Response(status=405, headers={"Allow": "GET, POST, DELETE"})

    async def delete(self, req: Request) -> StreamResponse:
        front = self._front(req)
        if isinstance(front, Response):
            return front
        grant, server = front
        session = self._session(req, grant, server)
        if isinstance(session, Response):
            return session
        resp = await self.upstreams[server].end_session(session, req)
        if resp.status < 300 or resp.status == 404:
            self._close(session, "deleted")
        return resp

    # ---- the call path ----------------------------------------------------------------------

    async def _initialize(
        self, req: Request, msg: dict[str, Any], grant: Grant, server: str, upstream: Upstream
    ) -> StreamResponse:
        if self.sessions.count(grant.name) >= self.max_sessions_per_grant:
            return self._too_many(
                f"this grant has {self.max_sessions_per_grant} open sessions (max_sessions_per_grant); "
                "end one with DELETE or let it expire",
                self.sessions.retry_after(grant.name),
                msg["id"],
            )
        params = msg.get("params") or {}
        info = params.get("clientInfo") if isinstance(params.get("clientInfo"), dict) else {}
        session = Session(
            id=new_session_id(),
            server=server,
            grant=grant,
            remote=req.remote,
            protocol_version=params.get("protocolVersion")
            if isinstance(params.get("protocolVersion"), str)
            else None,
            client_name=str(info.get("name")) if info.get("name") is not None else None,
            client_version=str(info.get("version")) if info.get("version") is not None else None,
        )

        def on_open(s: Session) -> None:
            self.sessions.add(s)
            self.addons.session_opened(s)

        return await self._call(req, msg, grant, server, session, upstream, on_open)

    async def _call(
        self,
        req: Request,
        msg: dict[str, Any],
        grant: Grant,
        server: str,
        session: Session,
        upstream: Upstream,
        on_open: Callable[[Session], None] | None = None,
    ) -> StreamResponse:
        method: str = msg["method"]
        params = msg.get("params")
        flow = CallFlow(
            server=server,
            method=method,
            request_id=msg["id"],
            params=params,
            grant=grant,
            session=session,
            remote=req.remote,
        )
        policy = self.policies[server]
        flow.policy_version = policy.version
        if method == "tools/call":
            name = params.get("name") if params else None
            if not isinstance(name, str) or not name:
                return error_response(
                    200,
                    jsonrpc.INVALID_PARAMS,
                    "Invalid params: tools/call needs params.name (a string)",
                    msg["id"],
                )
            args = params.get("arguments") if params else None
            if args is not None and not isinstance(args, dict):
                return error_response(
                    200,
                    jsonrpc.INVALID_PARAMS,
                    "Invalid params: tools/call params.arguments must be an object",
                    msg["id"],
                )
            flow.tool = name
        limiter = self.limiters[server]
        decision = decide(
            Call(
                server=server,
                method=method,
                tool=flow.tool,
                grant=grant.name,
                agent=grant.agent,
                session=session.id,
                arguments=flow.arguments,
            ),
            policy,
            limiter.view(),
            self.clock(),
        )
        limiter.charge(decision)  # no await between decide and charge: atomic in asyncio
        flow.decision = decision
        try:
            await self.addons.decided(flow)
        except Exception as exc:
            limiter.refund(decision)  # not recorded, so not forwarded: it must not cost quota
            _UNRECORDED.error(  # a full disk refuses every call: one line per interval, with counts
                "calls not forwarded (audit log unavailable)",
                "decision of %s %s could not be recorded, not forwarding: %r",
                server,
                method,
                exc,
            )
            flow.finish("upstream_error", code=jsonrpc.INTERNAL_ERROR, message="audit log unavailable")
            # the exception's text stays in the gateway's log: it may name paths or hosts
            return error_response(
                503,
                jsonrpc.INTERNAL_ERROR,
                "Service Unavailable: the audit log cannot record this call, so it was not forwarded",
                msg["id"],
            )
        try:
            if not decision.allowed:
                return self._refuse(flow, decision)
            transform = self._tools_filter(server) if method == "tools/list" else None
            session.active += 1
            try:
                return await upstream.request(flow, req, session, transform, on_open)
            except Exception:
                if req.get(STARTED):
                    raise  # the answer's head is out: only closing the connection is left
                log.exception("%s %s: the gateway failed before answering", server, method)
                flow.finish("upstream_error", code=jsonrpc.INTERNAL_ERROR, message="gateway internal error")
                return error_response(
                    500,
                    jsonrpc.INTERNAL_ERROR,
                    "Internal error: the gateway failed to handle this call"
                    + ("" if flow.sent else "; it was not forwarded"),
                    msg["id"],
                )
            finally:
                session.active -= 1
                session.touch()
        finally:
            if decision.allowed and not flow.sent:
                # nothing reached the upstream (bad header, upstream down before the write,
                # a cached answer, an internal error): undo exactly this decision's charges
                limiter.refund(decision)
            if flow.outcome is None:
                flow.finish("cancelled", message="the gateway stopped handling the call")
            self.addons.completed(flow)

    async def _refuse_notification(
        self, req: Request, msg: dict[str, Any], grant: Grant, server: str, session: Session
    ) -> Response:
        """A request-only method (tools/call...) sent without an id: refused and recorded.

        It cannot be answered, so it is never forwarded: an upstream would run it with no
        decision and no way to return the result or the refusal. The refusal is still a
        decision on the audit log (`audit denials` lists it).
        """
        method: str = msg["method"]
        params = msg.get("params")
        flow = CallFlow(
            server=server,
            method=method,
            request_id=None,
            params=params,
            grant=grant,
            session=session,
            remote=req.remote,
        )
        flow.policy_version = self.policies[server].version
        if method == "tools/call" and params is not None and isinstance(params.get("name"), str):
            flow.tool = params["name"]
        reason = (
            f"{method} must be a request: a notification (no id) cannot be answered, so it was not forwarded"
        )
        flow.decision = Decision("deny", NOTIFICATION_RULE, reason, (), None, ())
        try:
            await self.addons.decided(flow)
        except Exception as exc:
            log.error("refusal of a %s notification on %s could not be recorded: %r", method, server, exc)
        flow.finish("refused", message=reason)
        self.addons.completed(flow)
        return error_response(400, jsonrpc.INVALID_REQUEST, f"Invalid Request: {reason}")

    def _refuse(self, flow: CallFlow, decision: Decision) -> Response:
        text = refusal_text(decision)
        blocking = None
        if decision.action == "rate_limited" and decision.rule:
            for snap in decision.counters:
                if snap.count + 1 > snap.max:
                    blocking = snap
                    break
        detail: dict[str, Any] = {
            "decision": decision.action,
            "rule": decision.rule,
            "reason": decision.reason,
            "counter": None
            if blocking is None
            else {
                "name": blocking.key.counter,
                "scope": blocking.key.scope,
                "key": blocking.key.key,
                "count": blocking.count,
                "max": blocking.max,
                "window_s": blocking.key.window_s,
            },
            "retry_after_s": None if decision.retry_after_s is None else round(decision.retry_after_s, 3),
        }
        flow.finish("refused", message=text)
        headers = {"Mcp-Session-Id": flow.session.id} if flow.session is not None else None
        if flow.method == "tools/call":
            result = {
                "content": [{"type": "text", "text": text}],
                "isError": True,
                "structuredContent": detail,
            }
            return json_response({"jsonrpc": "2.0", "id": flow.request_id, "result": result}, headers=headers)
        return json_response(
            jsonrpc.error(flow.request_id, jsonrpc.POLICY_REFUSED, text, detail), headers=headers
        )

    def _tools_filter(self, server: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        policy = self.policies[server]

        def transform(msg: dict[str, Any]) -> dict[str, Any]:
            result = msg.get("result")
            tools = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(tools, list):
                return msg
            kept = [t for t in tools if not isinstance(t, dict) or can_ever_call(str(t.get("name")), policy)]
            if len(kept) == len(tools):
                return msg
            return {**msg, "result": {**result, "tools": kept}}

        return transform

    # ---- helpers ------------------------------------------------------------------------------

    async def _read_body(self, req: Request) -> bytes | None:
        try:
            body = await req.read()  # bounded by max_body_bytes and the body deadline
        except HTTPRequestEntityTooLarge:
            return None
        return None if len(body) > self.max_body_bytes else body

    def _too_large(self) -> Response:
        return error_response(
            413,
            jsonrpc.INVALID_REQUEST,
            f"Payload Too Large: the body exceeds max_body_bytes ({self.max_body_bytes})",
        )

    def _too_many(self, why: str, retry_after_s: float, id: Any = None) -> Response:
        wait = str(max(1, math.ceil(retry_after_s)))
        return error_response(
            429,
            jsonrpc.INVALID_REQUEST,
            f"Too Many Requests: {why}",
            id,
            {"retry_after_s": int(wait)},
            headers={"Retry-After": wait},
        )

    def _close(self, session: Session, reason: str) -> None:
        if self.sessions.remove(session.id) is not None:
            self.upstreams[session.server].session_closed(session)
            self.addons.session_closed(session, reason)

    async def expire_sessions(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            for s in self.sessions.expired():
                self.upstreams[s.server].session_closed(s)
                self.addons.session_closed(s, "expired")
                forget = getattr(self.upstreams[s.server], "forget", None)
                if forget is not None:
                    with contextlib.suppress(Exception):
                        await forget(s)
            now = self.clock()
            for limiter in self.limiters.values():
                limiter.expire(now)

    def close_all(self) -> None:
        for s in list(self.sessions):
            self._close(s, "shutdown")


_ALIVE = orjson.dumps({"ok": True})


async def health(req: Request) -> Response:
    """Unauthenticated: only that the gateway is alive (counts are behind the admin token)."""
    return Response(body=_ALIVE, content_type="application/json")


def health_detail(proxy: Proxy, admin_token: str) -> Callable[[Request], Any]:
    expected = f"Bearer {admin_token}".encode()

    async def handler(req: Request) -> Response:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return Response(
                status=401,
                body=orjson.dumps({"error": "unauthorized", "message": "missing or wrong admin token"}),
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="ledgergate-admin"'},
            )
        doc = {
            "ok": True,
            "sessions": len(proxy.sessions),
            "inflight": sum(proxy.inflight.values()),
            "servers": sorted(proxy.upstreams),
        }
        return Response(body=orjson.dumps(doc), content_type="application/json")

    return handler
