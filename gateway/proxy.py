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
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import orjson

from gateway import jsonrpc
from gateway.addons import Addon
from gateway.auth import Authenticator, Grant, failure_reason
from gateway.flow import CallFlow
from gateway.httpserver import BodyTooLarge, Request, Response, StreamResponse
from gateway.jsonrpc import InvalidMessage, Kind
from gateway.limiter import Limiter
from gateway.policies import PolicySet
from gateway.policy import Call, Decision, can_ever_call, decide, refusal_text
from gateway.sessions import MODERN_VERSIONS, SUPPORTED_VERSIONS, Session, SessionRegistry, new_session_id
from gateway.upstream import BODY, MESSAGE, Upstream, error_response, json_response

log = logging.getLogger("ledgergate.proxy")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


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
        if kind is not Kind.REQUEST:
            return await upstream.send(session, body, msg, req)
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
            log.error("decision of %s %s could not be recorded, not forwarding: %s", server, method, exc)
            flow.finish(
                "upstream_error", code=jsonrpc.INTERNAL_ERROR, message=f"audit log unavailable: {exc}"
            )
            return error_response(
                503,
                jsonrpc.INTERNAL_ERROR,
                "Service Unavailable: the audit log cannot record this call, so it was not forwarded",
                msg["id"],
                {"reason": str(exc)},
            )
        try:
            if not decision.allowed:
                return self._refuse(flow, decision)
            transform = self._tools_filter(server) if method == "tools/list" else None
            session.active += 1
            try:
                return await upstream.request(flow, req, session, transform, on_open)
            finally:
                session.active -= 1
                session.touch()
        finally:
            if flow.outcome is None:
                flow.finish("cancelled", message="the gateway stopped handling the call")
            self.addons.completed(flow)

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
            body = await req.read()  # received whole by the server, bounded by max_body_bytes
        except BodyTooLarge:
            return None
        return None if len(body) > self.max_body_bytes else body

    def _too_large(self) -> Response:
        return error_response(
            413,
            jsonrpc.INVALID_REQUEST,
            f"Payload Too Large: the body exceeds max_body_bytes ({self.max_body_bytes})",
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


def health(proxy: Proxy) -> Callable[[Request], Any]:
    async def handler(req: Request) -> Response:
        return Response(
            body=orjson.dumps({"ok": True, "sessions": len(proxy.sessions)}), content_type="application/json"
        )

    return handler
