"""MCP Streamable HTTP toward agents: authenticate, decide, log, forward or refuse.

POST /mcp/{server}   one JSON-RPC message (request -> JSON or SSE; notification/response -> 202)
GET  /mcp/{server}   the server-to-client SSE stream (or the upstream's 405)
DELETE /mcp/{server} end the session

Order of checks on every request: Host/Origin (403), credentials (401), server (404),
MCP-Protocol-Version (400), body size (413), JSON-RPC shape (400), session (400/404).
Only tools/call is policed; every other method is forwarded untouched (and still
logged). Only tools/list answers are rewritten (tools the grant can never call are
dropped); they also feed `UpstreamSchemas` (each tool's risk from its annotations, and
its inputSchema for servers with validate_upstream_schema). A server never listed yet is
not asked for its tools by the gateway: its tools' risk comes from their names and the
upstream judges their arguments, until an agent lists them.

A call whose decision is ``approval_required`` is HELD (`_hold`): registered in the
gateway's `LiveApprovals` (approval.requested), with ``notifications/progress`` on its SSE
stream every `approval_progress_s` when the client sent a progressToken; approved -> decided
again with ``approved=True`` and charged (no await between) and forwarded; denied, timed
out, or the client hung up -> refused with that reason. Its call.decided is written once,
with the final decision (a refused held call: ``deny`` with the approval's rule).
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
from gateway.approvals_live import LiveApprovals
from gateway.audit.hooks import Addon
from gateway.audit.redaction import args_sha256
from gateway.auth import Authenticator, Grant, failure_reason
from gateway.edge import Answer, Request, json_error, json_response
from gateway.http.sse import format_event
from gateway.mcp import jsonrpc
from gateway.mcp.flow import CallFlow
from gateway.mcp.jsonrpc import InvalidMessage, Kind
from gateway.mcp.sessions import MODERN_VERSIONS, SUPPORTED_VERSIONS, Session, SessionRegistry, new_session_id
from gateway.observability import propagate
from gateway.policy.engine import Call, Decision, can_ever_call, decide, effective_risk, refusal_text
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from gateway.policy.upstream_schema import UpstreamSchemas
from gateway.upstreams.base import Event, Inbound, Refused, Upstream, UpstreamFailed, UpstreamReply

log = logging.getLogger("ledgergate.proxy")
_UNRECORDED = AggregatingLog(log, 10.0)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# the audit `rule` of a request-only method (tools/call...) that arrived as a notification
NOTIFICATION_RULE = "gateway:request-only-method-as-notification"
_JSON = "application/json"

WENT_AWAY = "the client went away while waiting for approval"

# how long cut calls get to write their error once cancelled at shutdown (an agent that does
# not read its stream must not hold the shutdown)
CUT_GRACE_S = 2.0

# rewrites the final JSON-RPC response of a request (tools/list filtering)
Transform = Callable[[dict[str, Any]], dict[str, Any]]


def error_response(
    status: int,
    code: int,
    message: str,
    id: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON-RPC error answer to an agent, with the HTTP `status` (the one place they are built)."""
    return json_response(jsonrpc.error_bytes(id, code, message, data), status=status, headers=headers)


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
        drain_timeout_s: float = 10.0,
        schemas: UpstreamSchemas | None = None,
        approvals: LiveApprovals | None = None,
        redact_args: Callable[[str, str, dict[str, Any] | None], dict[str, Any] | None] | None = None,
        approval_progress_s: float = 5.0,
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
        # more for /admin/health, from the composition root (e.g. the Kafka log's spool depth and age)
        self.health_extras: list[Callable[[], dict[str, Any]]] = []
        self.drain_timeout_s = drain_timeout_s
        self._forwarding: dict[asyncio.Task[Any], CallFlow] = {}  # allowed calls being forwarded
        self._drained = asyncio.Event()  # set while _forwarding is empty
        self._drained.set()
        self.schemas = schemas if schemas is not None else UpstreamSchemas()
        self.approvals = approvals if approvals is not None else LiveApprovals(addons, clock)
        # the arguments an approver reads (and approval.requested stores): redacted like call.decided's
        self.redact_args = redact_args or (lambda server, tool, args: None)
        self.approval_progress_s = approval_progress_s

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
        if s.upstream_gone:
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
        inbound = Inbound(msg, req.headers, req)
        upstream = self.upstreams[server]
        if kind is Kind.REQUEST and msg["method"] == "initialize":
            return await self._initialize(inbound, grant, server, upstream)
        session = self._session(req, grant, server)
        if isinstance(session, Response):
            return session
        if kind is Kind.NOTIFICATION and not msg["method"].startswith("notifications/"):
            return await self._refuse_notification(req, msg, grant, server, session)
        if kind is not Kind.REQUEST:
            try:
                reply = await upstream.send(inbound, session)
            except Refused as exc:
                return error_response(exc.status, jsonrpc.INVALID_REQUEST, exc.message, msg.get("id"))
            except UpstreamFailed as exc:
                return error_response(502, exc.code, exc.message, None, exc.data)
            except Exception:
                log.exception("%s: forwarding a client %s failed", server, kind.value)
                return error_response(
                    500, jsonrpc.INTERNAL_ERROR, "Internal error: the message was not forwarded"
                )
            return self._answer(reply, session)
        return await self._call(inbound, grant, server, session, upstream)

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
        inbound = Inbound(None, req.headers, req)
        session.active += 1
        try:
            try:
                reply = await self.upstreams[server].open_stream(inbound, session)
            except Refused as exc:
                return error_response(exc.status, jsonrpc.INVALID_REQUEST, exc.message)
            except UpstreamFailed as exc:
                return error_response(502, exc.code, exc.message, None, exc.data)
            if reply.events is None:
                return self._answer(reply, session)
            return await self._relay_stream(inbound, reply, session)
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
        try:
            reply = await self.upstreams[server].delete(Inbound(None, req.headers, req), session)
        except Refused as exc:
            return error_response(exc.status, jsonrpc.INVALID_REQUEST, exc.message)
        except UpstreamFailed as exc:
            return error_response(502, exc.code, exc.message, None, exc.data)
        if reply.status < 300 or reply.status == 404:
            self._close(session, "deleted")
        return self._answer(reply, None)

    # ---- the call path ----------------------------------------------------------------------

    async def _initialize(
        self, inbound: Inbound, grant: Grant, server: str, upstream: Upstream
    ) -> StreamResponse:
        msg = inbound.message
        assert msg is not None
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
            remote=inbound.remote,
            protocol_version=params.get("protocolVersion")
            if isinstance(params.get("protocolVersion"), str)
            else None,
            client_name=str(info.get("name")) if info.get("name") is not None else None,
            client_version=str(info.get("version")) if info.get("version") is not None else None,
        )

        def on_open(s: Session) -> None:
            self.sessions.add(s)
            self.addons.session_opened(s)

        return await self._call(inbound, grant, server, session, upstream, on_open)

    async def _call(
        self,
        inbound: Inbound,
        grant: Grant,
        server: str,
        session: Session,
        upstream: Upstream,
        on_open: Callable[[Session], None] | None = None,
    ) -> StreamResponse:
        msg = inbound.message
        assert msg is not None
        method: str = msg["method"]
        params = msg.get("params")
        flow = CallFlow(
            server=server,
            method=method,
            request_id=msg["id"],
            params=params,
            grant=grant,
            session=session,
            remote=inbound.remote,
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
            schemas = self.schemas
            flow.risk = effective_risk(name, policy, schemas.risk(server, name))
            check = schemas.validator(server, name) if server in schemas.enabled else None
        else:
            check = None
        limiter = self.limiters[server]
        call = Call(
            server=server,
            method=method,
            tool=flow.tool,
            grant=grant.name,
            agent=grant.agent,
            session=session.id,
            arguments=flow.arguments,
        )
        decision = decide(
            call,
            policy,
            limiter.view(),
            self.clock(),
            risk=flow.risk,
            approvals=self.approvals.remembered(),
            upstream=check,
        )
        limiter.charge(decision)  # no await between decide and charge: atomic in asyncio
        held: StreamResponse | None = None  # the SSE answer a held call already started
        if decision.action == "approval_required" and not decision.shadow:
            decision, held = await self._hold(flow, inbound, call, decision, limiter, check)
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
            return await self._held_answer(
                held,
                error_response(
                    503,
                    jsonrpc.INTERNAL_ERROR,
                    "Service Unavailable: the audit log cannot record this call, so it was not forwarded",
                    msg["id"],
                ),
            )
        try:
            if not decision.allowed:
                if flow.outcome == "cancelled":  # a held call whose client hung up: nobody reads this
                    resp = self._refuse(flow, decision)
                    flow.finish("cancelled", message=WENT_AWAY)
                    return resp if held is None else held
                resp = self._refuse(flow, decision)
                return resp if held is None else await self._held_answer(held, resp)
            transform = self._tools_filter(server) if method == "tools/list" else None
            session.active += 1
            task = asyncio.current_task()
            if task is not None:
                self._forwarding[task] = flow
                self._drained.clear()
            try:
                resp = await self._forward(flow, inbound, session, upstream, transform, on_open, held)
                return resp if held is None else await self._held_answer(held, resp)
            except Exception:
                if inbound.started:
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
                if task is not None and self._forwarding.pop(task, None) is not None and not self._forwarding:
                    self._drained.set()
        finally:
            if decision.allowed and not flow.sent:
                # nothing reached the upstream (bad header, upstream down before the write,
                # a cached answer, an internal error): undo exactly this decision's charges,
                # and say so on call.completed, so the counter rebuild gives them back too
                limiter.refund(decision)
                flow.refunded = bool(decision.charges)
            if flow.outcome is None:
                flow.finish("cancelled", message="the gateway stopped handling the call")
            self.addons.completed(flow)

    # ---- held calls (policy action "approve") -------------------------------------------------

    async def _hold(
        self,
        flow: CallFlow,
        inbound: Inbound,
        call: Call,
        decision: Decision,
        limiter: Limiter,
        check: Callable[[Any], Any] | None,
    ) -> tuple[Decision, StreamResponse | None]:
        """Hold a call for a human; returns its final decision and the SSE answer already
        started (progress notifications), if any. Approved: decided again with approved=True
        against the policy and counters of then, and charged, with no await between."""
        spec = decision.approval
        assert spec is not None and flow.tool is not None
        server = flow.server
        args = flow.arguments
        req, fut = self.approvals.hold(
            server=server,
            grant=flow.grant.name,
            agent=flow.grant.agent,
            tool=flow.tool,
            args_sha256=args_sha256({} if args is None else args),
            timeout_s=spec.timeout_s,
            remember_s=spec.remember_s,
            rule=spec.pointer,
            session=flow.session.id if flow.session is not None else None,
            arguments=self.redact_args(server, flow.tool, args),
            call_id=flow.call_id,
        )
        meta = flow.params.get("_meta") if flow.params else None
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        held: StreamResponse | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.timeout_s
        progress = 0
        try:
            if token is not None and "text/event-stream" in inbound.headers.get("Accept", ""):
                headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                if flow.session is not None:
                    headers["Mcp-Session-Id"] = flow.session.id
                held = StreamResponse(status=200, headers=headers)
                inbound.started = True
                assert inbound.request is not None
                await held.prepare(inbound.request)
            while not fut.done():
                left = deadline - loop.time()
                if left <= 0:
                    self.approvals.timeout(req.id)
                    break
                await asyncio.wait((fut,), timeout=min(left, self.approval_progress_s))
                if fut.done() or held is None:
                    continue
                progress += 1
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {
                        "progressToken": token,
                        "progress": progress,
                        "message": f"waiting for approval {req.id} (`ledgergate approvals approve {req.id}`)",
                    },
                }
                await held.write(format_event(orjson.dumps(note)))
        except (asyncio.CancelledError, ConnectionResetError) as exc:
            # the client hung up (the edge cancels the handler on a lost connection, or a
            # progress write failed): the request is cancelled and the call recorded as such
            self.approvals.cancel(req.id, WENT_AWAY)
            if isinstance(exc, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is None or task.uncancel() > 0:
                    raise  # cancelled by more than the hang-up: let it through
            flow.finish("cancelled", message=WENT_AWAY)
        res = fut.result() if fut.done() else self.approvals.state.resolution(req.id)
        assert res is not None
        if res.approved:
            d = decide(
                call,
                self.policies[server],  # a reload while it waited applies
                limiter.view(),
                self.clock(),
                risk=flow.risk,
                approvals=self.approvals.remembered(),
                approved=True,
                upstream=check,
            )
            limiter.charge(d)  # no await between decide and charge
            if d.action == "allow" and d.reason is None:
                d = Decision(
                    d.action,
                    d.rule,
                    f"approved by {res.by or '?'}" + (f": {res.comment}" if res.comment else ""),
                    d.counters,
                    d.retry_after_s,
                    d.charges,
                )
            return d, held
        if res.outcome == "denied":
            who = res.by or "an approver"
            reason = f"approval {req.id} denied by {who}" + (f": {res.comment}" if res.comment else "")
        elif res.outcome == "timed_out":
            reason = f"approval {req.id} timed out after {spec.timeout_s} s with no answer"
        else:
            reason = f"approval {req.id} cancelled: {res.comment or 'the call stopped waiting'}"
        return Decision("deny", spec.pointer, reason, (), None, ()), held

    async def _held_answer(self, held: StreamResponse | None, resp: StreamResponse) -> StreamResponse:
        """A call whose SSE answer started while held: a whole JSON answer goes out as its
        last event (a relayed stream already wrote into ``held``)."""
        if held is None or resp is held:
            return resp
        body = getattr(resp, "body", None)
        try:
            if isinstance(body, bytes | bytearray) and body:
                await held.write(format_event(bytes(body)))
            await held.write_eof()
        except ConnectionResetError:
            pass
        return held

    async def _forward(
        self,
        flow: CallFlow,
        inbound: Inbound,
        session: Session,
        upstream: Upstream,
        transform: Transform | None,
        on_open: Callable[[Session], None] | None,
        held: StreamResponse | None = None,
    ) -> StreamResponse:
        """Forward an allowed request; answer the agent with what the upstream said, record how it ended."""
        initialize = on_open is not None
        flow.forwarded_at = time.perf_counter()
        inbound.traceparent = propagate.traceparent(flow)  # None unless tracing is on
        try:
            reply = await upstream.request(inbound, session, initialize)
        except Refused as exc:
            text = f"{exc.message}; the call was not forwarded"
            flow.finish("refused", code=jsonrpc.INVALID_REQUEST, message=text)
            return error_response(exc.status, jsonrpc.INVALID_REQUEST, text, flow.request_id)
        except UpstreamFailed as exc:
            flow.sent = exc.sent
            flow.finish("upstream_error", code=exc.code, message=exc.message)
            return error_response(
                200,
                exc.code,
                exc.message,
                flow.request_id,
                exc.data,
                None if initialize else {"Mcp-Session-Id": session.id},
            )
        except asyncio.CancelledError:
            if not flow.cut:
                raise
            # the head has not gone out: the agent gets a JSON-RPC error response
            text = self._cut(flow, 0)
            return error_response(
                200,
                jsonrpc.UPSTREAM_UNAVAILABLE,
                text,
                flow.request_id,
                {"upstream": flow.server, "shutdown": True, "upstream_answered": flow.answered},
                None if initialize else {"Mcp-Session-Id": session.id},
            )
        flow.sent = reply.sent
        status = reply.status
        if initialize:
            if 200 <= status < 300 and (reply.message is None or "result" in reply.message):
                session.upstream_session = reply.upstream_session
                on_open(session)  # type: ignore[misc]  # before the answer's head goes out
        elif status == 404 and session.upstream_session:
            flow.finish("upstream_error", code=404, message="upstream session expired")
            session.upstream_gone = True
        headers = reply.headers
        headers["Mcp-Session-Id"] = session.id
        if reply.events is not None:
            return await self._relay_stream(inbound, reply, session, flow, transform, held)
        if reply.message is not None:  # one message the transport parsed: the gateway serialises it
            msg = reply.message
            if transform is not None and "result" in msg:
                msg = transform(msg)
            data = orjson.dumps(msg)
            flow.observe(msg, len(data))
            return json_response(data, status, headers)
        data = reply.body or b""
        if flow.outcome is None:
            if headers.get("content-type", "").startswith(_JSON):
                data = self._observe_json(flow, data, transform)
            else:
                flow.answered = True
                flow.finish(
                    "upstream_error",
                    code=status,
                    message=f"upstream answered HTTP {status}",
                    nbytes=len(data),
                )
        return Answer(data, status, headers)

    @staticmethod
    def _observe_json(flow: CallFlow, data: bytes, transform: Transform | None) -> bytes:
        """Record the outcome of a JSON answer; returns the bytes to send (rewritten by `transform`)."""
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            flow.finish("upstream_error", message="upstream answered invalid JSON", nbytes=len(data))
            return data
        if isinstance(msg, dict):
            if transform is not None and "result" in msg:
                msg = transform(msg)
                data = orjson.dumps(msg)
            flow.observe(msg, len(data))
        return data

    async def _relay_stream(
        self,
        inbound: Inbound,
        reply: UpstreamReply,
        session: Session,
        flow: CallFlow | None = None,
        transform: Transform | None = None,
        held: StreamResponse | None = None,
    ) -> StreamResponse:
        """Relay an upstream's stream as SSE, event by event as each arrives (never buffered):
        a sampling or elicitation request mid-call reaches the agent while the call waits.
        With a `flow` (a call's answer) its final response is observed (and transformed).
        ``held``: the SSE answer a held call already started (written into, not prepared)."""
        events = reply.events
        assert events is not None
        headers = reply.headers
        headers["Mcp-Session-Id"] = session.id
        resp = held if held is not None else StreamResponse(status=reply.status, headers=headers)
        nbytes = 0
        try:
            inbound.started = True
            assert inbound.request is not None
            if held is None:
                await resp.prepare(inbound.request)
            async for ev in events:
                raw = ev.raw
                if ev.final and flow is not None and flow.outcome is None:
                    raw = self._final_event(flow, ev, transform)
                elif raw is None:
                    raw = format_event(orjson.dumps(ev.message))
                nbytes += len(raw)
                await resp.write(raw)  # waits while the agent does not read (backpressure)
            if flow is not None and flow.outcome is None:
                flow.finish(
                    "upstream_error", message="upstream closed the stream before answering", nbytes=nbytes
                )
        except ConnectionResetError:
            # the agent went away (or was disconnected for not reading); per spec no cancellation
            if flow is not None and flow.outcome is None:
                why = reply.dropped or "client disconnected before the answer"
                flow.finish("cancelled", message=why, nbytes=nbytes)
            return resp
        except UpstreamFailed as exc:
            if flow is not None and flow.outcome is None:
                flow.finish("upstream_error", code=exc.code, message=exc.message, nbytes=nbytes)
                err = jsonrpc.error_bytes(flow.request_id, exc.code, exc.message, exc.data)
                try:
                    await resp.write(format_event(err))
                except ConnectionResetError:
                    return resp
        except asyncio.CancelledError:
            if flow is None or not flow.cut or flow.outcome == "shutdown":
                raise
            text = self._cut(flow, nbytes)
            # the final answer already handed to the connection is the call's one response:
            # a second one (the error) for the same id would contradict it
            if not flow.answered:
                data = {"upstream": flow.server, "shutdown": True, "upstream_answered": False}
                err = jsonrpc.error_bytes(flow.request_id, jsonrpc.UPSTREAM_UNAVAILABLE, text, data)
                with contextlib.suppress(ConnectionResetError, TimeoutError):
                    await asyncio.wait_for(resp.write(format_event(err)), CUT_GRACE_S)
            with contextlib.suppress(ConnectionResetError, TimeoutError):
                await asyncio.wait_for(resp.write_eof(), CUT_GRACE_S)
            return resp
        finally:
            if reply.release is not None:
                reply.release()
            await events.aclose()
        try:
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    @staticmethod
    def _final_event(flow: CallFlow, ev: Event, transform: Transform | None) -> bytes:
        """The SSE bytes of a call's final response, its outcome recorded."""
        msg = ev.message
        assert msg is not None
        if transform is not None and "result" in msg:
            msg = transform(msg)
            data = orjson.dumps(msg)
            raw = ev.raw
            if raw is None:
                raw = format_event(data)
            else:  # keep the upstream event's other fields (id, event), replace only the data
                head = b"".join(
                    line + b"\n"
                    for line in raw.replace(b"\r\n", b"\n").split(b"\n")
                    if line and not line.startswith(b"data")
                )
                raw = head + b"data: " + data + b"\n\n"
            flow.observe(msg, len(data))
            return raw
        if ev.raw is not None and ev.data is not None:
            flow.observe(msg, len(ev.data))
            return ev.raw
        data = orjson.dumps(msg)
        flow.observe(msg, len(data))
        return format_event(data)

    def _cut(self, flow: CallFlow, nbytes: int) -> str:
        """Record a call cut at shutdown (cancelled by `drain`); returns the agent's error text.

        The task's cancellation is undone so the error can still be written."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        # a cut call counts as sent: it may have run upstream, and a charge kept is the safe side
        flow.sent = True
        said = "the upstream had answered" if flow.answered else "the upstream had not answered"
        text = (
            f"the gateway shut down before this call finished (drain timeout {self.drain_timeout_s:g} s); "
            f"{said}"
        )
        flow.finish("shutdown", code=jsonrpc.UPSTREAM_UNAVAILABLE, message=text, nbytes=nbytes)
        return text

    async def drain(self, timeout_s: float | None = None) -> int:
        """At shutdown (listener closed): let the calls being forwarded finish for up to
        `timeout_s` (drain_timeout_s), then cut the rest: each answers its agent with a
        JSON-RPC error and records outcome "shutdown". Returns how many were cut."""
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        held = self.approvals.cancel_all("the gateway is shutting down")
        if held:
            log.info("shutdown: %d held calls refused (no approval can reach them any more)", held)
        if self._forwarding:
            log.info("draining %d calls in flight (up to %g s)", len(self._forwarding), timeout_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        cut = list(self._forwarding.items())
        if not cut:
            return 0
        log.warning(
            "drain timeout (%g s): cutting %d calls in flight; each agent gets a JSON-RPC error",
            timeout_s,
            len(cut),
        )
        for task, flow in cut:
            flow.cut = True
            task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), CUT_GRACE_S * 2)
        return len(cut)

    def _answer(self, reply: UpstreamReply, session: Session | None) -> Response:
        """A whole (non-streamed) upstream answer, relayed with the gateway's session id."""
        headers = reply.headers
        if session is not None:
            headers["Mcp-Session-Id"] = session.id
        if reply.message is not None:
            return json_response(reply.message, reply.status, headers)
        return Answer(reply.body or b"", reply.status, headers)

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

    def _tools_filter(self, server: str) -> Transform:
        policy = self.policies[server]
        schemas = self.schemas

        def transform(msg: dict[str, Any]) -> dict[str, Any]:
            result = msg.get("result")
            tools = result.get("tools") if isinstance(result, dict) else None
            if not isinstance(tools, list):
                return msg
            schemas.update(server, tools)  # what the upstream says: risk, inputSchema
            kept = [
                t
                for t in tools
                if not isinstance(t, dict)
                or can_ever_call(str(t.get("name")), policy, schemas.risk(server, str(t.get("name"))))
            ]
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
        """The one way a session ends (deleted, expired, upstream_gone, shutdown)."""
        if self.sessions.remove(session.id) is not None:
            self.upstreams[session.server].close_session(session, reason)
            self.addons.session_closed(session, reason)

    def expire_idle(self) -> None:
        """Close the sessions idle for longer than the timeout; drop the ended rate-limit windows."""
        for s in self.sessions.idle():
            self._close(s, "expired")
        now = self.clock()
        for limiter in self.limiters.values():
            limiter.expire(now)

    async def expire_sessions(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.expire_idle()

    def close_all(self) -> None:
        for s in list(self.sessions):
            self._close(s, "shutdown")


_ALIVE = orjson.dumps({"ok": True})


async def health(req: Request) -> Response:
    """Unauthenticated: only that the gateway is alive (counts are behind the admin token)."""
    return json_response(_ALIVE)


def health_doc(proxy: Proxy) -> dict[str, Any]:
    """What /admin/health says: sessions, calls in flight, servers, and the extras the
    composition root adds (the Kafka log's spool)."""
    doc: dict[str, Any] = {
        "ok": True,
        "sessions": len(proxy.sessions),
        "inflight": sum(proxy.inflight.values()),
        "servers": sorted(proxy.upstreams),
    }
    for extra in proxy.health_extras:
        doc.update(extra())
    return doc


def health_detail(proxy: Proxy, admin_token: str) -> Callable[[Request], Any]:
    expected = f"Bearer {admin_token}".encode()

    async def handler(req: Request) -> Response:
        given = req.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return json_error(
                401,
                "unauthorized",
                "missing or wrong admin token",
                {"WWW-Authenticate": 'Bearer realm="ledgergate-admin"'},
            )
        return json_response(health_doc(proxy))

    return handler
