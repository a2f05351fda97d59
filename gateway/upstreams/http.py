"""Streamable HTTP upstream: a streaming relay, one upstream MCP session per gateway session.

Answers pass through unchanged: an SSE answer is relayed event by event as each event
completes (never buffered whole); only the final response of a tools/list is rewritten.
The client's key never goes upstream; the gateway's session id is mapped to the
upstream's.

Requests, notifications and responses go upstream as the gateway serialises them from the
message it parsed and decided on (`jsonrpc.members`), never as the client's bytes: a
duplicate key or an extra member that another JSON parser would read differently cannot
reach the upstream. A client's response must be a response (exactly one of result and
error); which ids it may answer is the upstream's business, because each gateway session
has its own upstream session (its own Mcp-Session-Id), so a forged id can only reach
requests of the client's own session.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp.web import Response, StreamResponse

from gateway.edge import Request
from gateway.http.client import Response as UpResponse
from gateway.http.client import UpstreamError, UpstreamPool, UpstreamUnreachable
from gateway.http.sse import EventTooLarge, SseSplitter, format_event
from gateway.mcp import jsonrpc
from gateway.upstreams.base import MESSAGE, STARTED, OnOpen, Transform, Upstream, error_response

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session

log = logging.getLogger("ledgergate.upstream.http")

_FORWARD_REQ = ("accept", "content-type", "mcp-protocol-version", "last-event-id", "user-agent")
_FORWARD_RESP = ("content-type", "cache-control", "x-accel-buffering", "allow")
_NETWORK_ERRORS = (UpstreamError, asyncio.TimeoutError, OSError, EventTooLarge)
_CLIENT_GONE = (ConnectionResetError,)


class HttpUpstream(Upstream):
    def __init__(
        self,
        name: str,
        url: str,
        timeout_s: float,
        *,
        max_head_bytes: int = 64 * 1024,
        max_body_bytes: int = 16 << 20,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout_s = timeout_s
        self.max_event_bytes = max_body_bytes  # one SSE event is buffered whole, no more
        # a lean keep-alive HTTP/1.1 client (gateway/http/client.py): aiohttp's client costs
        # ~4x the CPU per request, and this is the hot path of every forwarded call
        self.pool = UpstreamPool(
            url, connect_timeout=10.0, max_head_bytes=max_head_bytes, max_body_bytes=max_body_bytes
        )

    async def close(self) -> None:
        await self.pool.close()

    def _headers(self, req: Request, session: Session | None) -> list[tuple[str, str]]:
        headers = req.headers
        h = [(k, v) for k in _FORWARD_REQ if (v := headers.get(k)) is not None]
        if session is not None and session.upstream_session:
            h.append(("Mcp-Session-Id", session.upstream_session))
        return h

    @staticmethod
    def _unsendable(headers: list[tuple[str, str]]) -> str | None:
        """The name of a header that cannot be forwarded (not UTF-8 text, or a line break)."""
        for k, v in headers:
            try:
                v.encode()
            except UnicodeEncodeError:
                return k
            if "\r" in v or "\n" in v or "\x00" in v:
                return k
        return None

    def _failure(self, exc: BaseException) -> tuple[int, str]:
        if isinstance(exc, asyncio.TimeoutError):
            return (
                jsonrpc.UPSTREAM_TIMEOUT,
                f"upstream {self.name!r} did not answer within {self.timeout_s:g} s",
            )
        return (
            jsonrpc.UPSTREAM_UNAVAILABLE,
            f"upstream {self.name!r} unreachable: {exc.__class__.__name__}: {exc}",
        )

    def _resp_headers(self, up: UpResponse, session: Session | None) -> dict[str, str]:
        h = {k: v for k in _FORWARD_RESP if (v := up.headers.get(k)) is not None}
        if session is not None:
            h["Mcp-Session-Id"] = session.id
        return h

    async def request(
        self, flow: CallFlow, req: Request, session: Session, transform: Transform, on_open: OnOpen
    ) -> StreamResponse:
        headers = self._headers(req, session)
        bad = self._unsendable(headers)
        if bad is not None:
            text = f"Bad Request: the {bad} header is not valid UTF-8 text; the call was not forwarded"
            flow.finish("refused", code=jsonrpc.INVALID_REQUEST, message=text)
            return error_response(400, jsonrpc.INVALID_REQUEST, text, flow.request_id)
        body = orjson.dumps(jsonrpc.members(req[MESSAGE]))
        flow.forwarded_at = time.perf_counter()
        try:
            up = await self.pool.request("POST", headers, body, read_timeout=self.timeout_s)
            flow.sent = True
        except _NETWORK_ERRORS as exc:
            # no connection could be made: nothing was sent (the call is refunded)
            flow.sent = not isinstance(exc, UpstreamUnreachable)
            code, text = self._failure(exc)
            flow.finish("upstream_error", code=code, message=text)
            return error_response(200, code, text, flow.request_id, {"upstream": self.name})
        try:
            if on_open is not None and 200 <= up.status < 300:
                session.upstream_session = up.headers.get("mcp-session-id")
                on_open(session)
            ctype = up.headers.get("content-type", "")
            if up.status == 404 and session.upstream_session and on_open is None:
                flow.finish("upstream_error", code=404, message="upstream session expired")
                session.state["upstream_gone"] = True
            if ctype.startswith("text/event-stream"):
                return await self._relay_sse(flow, req, up, session, transform)
            data = await up.read()
            if ctype.startswith("application/json") and flow.outcome is None:
                data = self._observe_json(flow, data, transform)
            elif flow.outcome is None:
                flow.finish(
                    "upstream_error",
                    code=up.status,
                    message=f"upstream answered HTTP {up.status}",
                    nbytes=len(data),
                )
            return Response(body=data, status=up.status, headers=self._resp_headers(up, session))
        except _NETWORK_ERRORS as exc:
            code, text = self._failure(exc)
            flow.finish("upstream_error", code=code, message=text)
            return error_response(200, code, text, flow.request_id, {"upstream": self.name})
        finally:
            up.release()

    def _observe_json(self, flow: CallFlow, data: bytes, transform: Transform) -> bytes:
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

    async def _relay_sse(
        self,
        flow: CallFlow,
        req: Request,
        up: UpResponse,
        session: Session,
        transform: Transform,
    ) -> StreamResponse:
        resp = StreamResponse(status=up.status, headers=self._resp_headers(up, session))
        req[STARTED] = True
        await resp.prepare(req)
        splitter = SseSplitter(self.max_event_bytes)
        nbytes = 0
        try:
            async for chunk in up:
                for ev in splitter.feed(chunk):
                    raw = ev.raw
                    if ev.data and flow.outcome is None:
                        raw = self._maybe_final(flow, ev.data, raw, transform)
                    nbytes += len(raw)
                    await resp.write(raw)
            if splitter.pending:
                await resp.write(splitter.pending)
            if flow.outcome is None:
                flow.finish(
                    "upstream_error", message="upstream closed the stream before answering", nbytes=nbytes
                )
        except _CLIENT_GONE:
            # the client went away; per spec that is not a cancellation of the call
            if flow.outcome is None:
                flow.finish("cancelled", message="client disconnected before the answer", nbytes=nbytes)
            return resp
        except _NETWORK_ERRORS as exc:
            code, text = self._failure(exc)
            if flow.outcome is None:
                flow.finish("upstream_error", code=code, message=text, nbytes=nbytes)
                err = jsonrpc.error_bytes(flow.request_id, code, text, {"upstream": self.name})
                try:
                    await resp.write(format_event(err))
                except _CLIENT_GONE:
                    pass
        try:
            await resp.write_eof()
        except _CLIENT_GONE:
            pass
        return resp

    def _maybe_final(self, flow: CallFlow, data: bytes, raw: bytes, transform: Transform) -> bytes:
        try:
            msg: Any = orjson.loads(data)
        except orjson.JSONDecodeError:
            return raw
        if not isinstance(msg, dict) or "method" in msg or msg.get("id") != flow.request_id:
            return raw
        if "result" not in msg and "error" not in msg:
            return raw
        if transform is not None and "result" in msg:
            msg = transform(msg)
            new = orjson.dumps(msg)
            # keep the event's other fields (id, event), replace only the data
            head = b"".join(
                line + b"\n"
                for line in raw.replace(b"\r\n", b"\n").split(b"\n")
                if line and not line.startswith(b"data")
            )
            raw = head + b"data: " + new + b"\n\n"
            flow.observe(msg, len(new))
        else:
            flow.observe(msg, len(data))
        return raw

    async def send(self, session: Session, msg: dict[str, Any], req: Request) -> StreamResponse:
        if "method" not in msg and ("result" in msg) == ("error" in msg):
            return error_response(
                400,
                jsonrpc.INVALID_REQUEST,
                "Bad Request: a response carries exactly one of result and error",
                msg.get("id"),
            )
        headers = self._headers(req, session)
        if (refusal := self._bad_header(headers)) is not None:
            return refusal
        body = orjson.dumps(jsonrpc.members(msg))
        try:
            up = await self.pool.request("POST", headers, body, read_timeout=self.timeout_s)
            data = await up.read()
            return Response(body=data, status=up.status, headers=self._resp_headers(up, session))
        except _NETWORK_ERRORS as exc:
            code, text = self._failure(exc)
            return error_response(502, code, text, None, {"upstream": self.name})

    def _bad_header(self, headers: list[tuple[str, str]]) -> Response | None:
        bad = self._unsendable(headers)
        if bad is None:
            return None
        return error_response(
            400, jsonrpc.INVALID_REQUEST, f"Bad Request: the {bad} header is not valid UTF-8 text"
        )

    async def open_stream(self, session: Session, req: Request) -> StreamResponse:
        headers = self._headers(req, session)
        if (refusal := self._bad_header(headers)) is not None:
            return refusal
        try:
            # the stream may idle for long, but its head must come within the upstream timeout
            up = await self.pool.request("GET", headers, read_timeout=None, head_timeout=self.timeout_s)
        except _NETWORK_ERRORS as exc:
            code, text = self._failure(exc)
            return error_response(502, code, text, None, {"upstream": self.name})
        try:
            if not up.headers.get("content-type", "").startswith("text/event-stream"):
                data = await up.read()
                return Response(body=data, status=up.status, headers=self._resp_headers(up, session))
            resp = StreamResponse(status=up.status, headers=self._resp_headers(up, session))
            req[STARTED] = True
            await resp.prepare(req)
            try:
                async for chunk in up:
                    await resp.write(chunk)
                await resp.write_eof()
            except (*_CLIENT_GONE, *_NETWORK_ERRORS):
                pass
            return resp
        finally:
            up.release()

    async def end_session(self, session: Session, req: Request) -> StreamResponse:
        headers = self._headers(req, session)
        if (refusal := self._bad_header(headers)) is not None:
            return refusal
        try:
            up = await self.pool.request("DELETE", headers, read_timeout=self.timeout_s)
            data = await up.read()
            return Response(body=data, status=up.status, headers=self._resp_headers(up, None))
        except _NETWORK_ERRORS as exc:
            code, text = self._failure(exc)
            return error_response(502, code, text, None, {"upstream": self.name})

    async def forget(self, session: Session) -> None:
        """Best-effort DELETE upstream for a session the gateway expired."""
        if not session.upstream_session:
            return
        try:
            up = await self.pool.request(
                "DELETE", [("Mcp-Session-Id", session.upstream_session)], read_timeout=self.timeout_s
            )
            await up.read()
        except _NETWORK_ERRORS:
            pass
