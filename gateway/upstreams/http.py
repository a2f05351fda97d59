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
from collections.abc import AsyncGenerator, Coroutine
from typing import TYPE_CHECKING, Any

import orjson

from gateway.http.client import Headers, UpstreamError, UpstreamPool, UpstreamUnreachable
from gateway.http.client import Response as UpResponse
from gateway.http.sse import EventTooLarge, SseSplitter
from gateway.mcp import jsonrpc
from gateway.upstreams.base import Event, Inbound, Refused, Upstream, UpstreamFailed, UpstreamReply

if TYPE_CHECKING:
    from gateway.mcp.sessions import Session

log = logging.getLogger("ledgergate.upstream.http")

_FORWARD_REQ = ("accept", "content-type", "mcp-protocol-version", "last-event-id", "user-agent")
_FORWARD_RESP = ("content-type", "cache-control", "x-accel-buffering", "allow")
_NETWORK_ERRORS = (UpstreamError, asyncio.TimeoutError, OSError, EventTooLarge)
_MAX_PREPARED = 1024  # cached header blocks (about one per session); cleared when full


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
        self._deletes: set[asyncio.Task[None]] = set()  # best-effort DELETEs of expired sessions
        # the header block an agent's session sends is the same call after call: checked and
        # serialised once, keyed by every value that goes into it (see _prepared_headers)
        self._prepared: dict[tuple[str | None, ...], Headers] = {}

    async def close(self) -> None:
        for t in list(self._deletes):
            t.cancel()
        await asyncio.gather(*self._deletes, return_exceptions=True)
        await self.pool.close()

    def _headers(self, inbound: Inbound, session: Session) -> list[tuple[str, str]]:
        """The agent's forwardable headers plus the upstream's session id; Refused when one
        cannot be forwarded (not UTF-8 text, or a line break)."""
        headers = inbound.headers
        h = [(k, v) for k in _FORWARD_REQ if (v := headers.get(k)) is not None]
        for k, v in h:
            try:
                v.encode()
            except UnicodeEncodeError:
                raise Refused(400, f"Bad Request: the {k} header is not valid UTF-8 text") from None
            if "\r" in v or "\n" in v or "\x00" in v:
                raise Refused(400, f"Bad Request: the {k} header is not valid UTF-8 text")
        if session.upstream_session:
            h.append(("Mcp-Session-Id", session.upstream_session))
        if inbound.traceparent is not None:  # the gateway's upstream span continues the trace
            h.append(("traceparent", inbound.traceparent))
        return h

    def _prepared_headers(self, inbound: Inbound, session: Session) -> Headers:
        """`_headers` checked and serialised, from a cache keyed by all they are made of
        (a traceparent differs per call: then built each time)."""
        if inbound.traceparent is not None:
            return self.pool.prepare(self._headers(inbound, session))
        get = inbound.headers.get
        key = (  # the values of _FORWARD_REQ, in its order, and the upstream's session id
            get("accept"),
            get("content-type"),
            get("mcp-protocol-version"),
            get("last-event-id"),
            get("user-agent"),
            session.upstream_session,
        )
        blob = self._prepared.get(key)
        if blob is None:
            blob = self.pool.prepare(self._headers(inbound, session))  # Refused: never cached
            if len(self._prepared) >= _MAX_PREPARED:
                self._prepared.clear()
            self._prepared[key] = blob
        return blob

    def _failed(self, exc: BaseException, sent: bool = True) -> UpstreamFailed:
        if isinstance(exc, asyncio.TimeoutError):
            code = jsonrpc.UPSTREAM_TIMEOUT
            text = f"upstream {self.name!r} did not answer within {self.timeout_s:g} s"
        else:
            code = jsonrpc.UPSTREAM_UNAVAILABLE
            text = f"upstream {self.name!r} unreachable: {exc.__class__.__name__}: {exc}"
        return UpstreamFailed(code, text, {"upstream": self.name}, sent=sent)

    async def _exchange(self, method: str, inbound: Inbound, session: Session, sse: str) -> UpstreamReply:
        """One HTTP exchange. A JSON or plain answer is read whole (and the connection
        pooled again); an SSE answer (`sse` = "events" or "chunks"; "whole" reads it whole)
        becomes an events iterator that holds the connection until `reply.release()`."""
        headers = self._prepared_headers(inbound, session)
        try:
            if method == "GET":
                # the stream may idle for long, but its head must come within the upstream timeout
                up = await self.pool.request("GET", headers, read_timeout=None, head_timeout=self.timeout_s)
            else:
                msg = inbound.message
                body = orjson.dumps(jsonrpc.members(msg)) if msg is not None else None
                up = await self.pool.request(method, headers, body, read_timeout=self.timeout_s)
        except _NETWORK_ERRORS as exc:
            # no connection could be made: nothing was sent (a call is refunded)
            raise self._failed(exc, sent=not isinstance(exc, UpstreamUnreachable)) from None
        up_headers = up.headers
        headers_out = {k: v for k in _FORWARD_RESP if (v := up_headers.get(k)) is not None}
        upstream_session = up_headers.get("mcp-session-id")
        if sse != "whole" and up_headers.get("content-type", "").startswith("text/event-stream"):
            reply = UpstreamReply(up.status, headers_out, upstream_session=upstream_session)
            reply.events = self._sse(up, inbound) if sse == "events" else self._chunks(up)
            reply.release = up.release
            return reply
        try:
            body = await up.read()  # the bytes as received (no copy when they came in one read)
        except _NETWORK_ERRORS as exc:
            raise self._failed(exc) from None
        finally:
            up.release()
        return UpstreamReply(up.status, headers_out, body, None, None, upstream_session)

    def request(  # type: ignore[override]
        self, inbound: Inbound, session: Session, initialize: bool
    ) -> Coroutine[Any, Any, UpstreamReply]:
        # a plain def handing back _exchange's coroutine: one coroutine frame less per call
        return self._exchange("POST", inbound, session, "events")

    async def _sse(self, up: UpResponse, inbound: Inbound) -> AsyncGenerator[Event, None]:
        """The upstream's SSE events, each as soon as it is complete (never buffered whole)."""
        assert inbound.message is not None
        request_id = inbound.message.get("id")
        splitter = SseSplitter(self.max_event_bytes)
        answered = False
        try:
            async for chunk in up:
                for ev in splitter.feed(chunk):
                    msg: Any = None
                    final = False
                    if ev.data and not answered:
                        try:
                            msg = orjson.loads(ev.data)
                        except orjson.JSONDecodeError:
                            msg = None
                        if not isinstance(msg, dict):
                            msg = None
                        elif (
                            "method" not in msg
                            and msg.get("id") == request_id
                            and ("result" in msg or "error" in msg)
                        ):
                            final = answered = True
                    yield Event(msg, ev.raw, ev.data, final)
            if splitter.pending:
                yield Event(None, splitter.pending)
        except _NETWORK_ERRORS as exc:
            raise self._failed(exc) from None
        finally:
            up.release()

    async def _chunks(self, up: UpResponse) -> AsyncGenerator[Event, None]:
        """A GET stream: relayed chunk by chunk, unchanged (nothing in it ends a call)."""
        try:
            async for chunk in up:
                yield Event(None, chunk)
        except _NETWORK_ERRORS:
            pass  # the stream just ends
        finally:
            up.release()

    async def send(self, inbound: Inbound, session: Session) -> UpstreamReply:
        msg = inbound.message
        assert msg is not None
        if "method" not in msg and ("result" in msg) == ("error" in msg):
            raise Refused(400, "Bad Request: a response carries exactly one of result and error")
        return await self._exchange("POST", inbound, session, "whole")

    async def open_stream(self, inbound: Inbound, session: Session) -> UpstreamReply:
        return await self._exchange("GET", inbound, session, "chunks")

    async def delete(self, inbound: Inbound, session: Session) -> UpstreamReply:
        return await self._exchange("DELETE", inbound, session, "whole")

    def close_session(self, session: Session, reason: str) -> None:
        if reason == "expired" and session.upstream_session:
            # the agent just went away: end its upstream session too (best effort, in the background)
            t = asyncio.get_running_loop().create_task(self._delete_upstream(session.upstream_session))
            self._deletes.add(t)
            t.add_done_callback(self._deletes.discard)

    async def _delete_upstream(self, upstream_session: str) -> None:
        try:
            up = await self.pool.request(
                "DELETE", [("Mcp-Session-Id", upstream_session)], read_timeout=self.timeout_s
            )
            await up.read()
        except _NETWORK_ERRORS:
            pass
