"""A lean HTTP/1.1 server for the gateway: ``asyncio.Protocol`` + ``httptools`` (llhttp).

The gateway's inbound side used aiohttp's web server, which costs ~60-70 us of CPU per
request on this path; this one costs a fraction of that. It serves exactly what the
gateway needs, with aiohttp-like call shapes so the handlers barely changed:

    app = App(max_body_bytes=1 << 20)
    app.add_post("/mcp/{server}", handler)          # {name} or {name:regex} segments
    app.cleanup_ctx.append(lifecycle)               # async generator: setup, yield, teardown
    async with HttpServer(app, "127.0.0.1", 8080):  # start(): setup + listen; close(): graceful
        ...

    async def handler(req: Request) -> StreamResponse:
        body = await req.read()                     # the whole body (received before dispatch)
        return Response(body=b"{}", content_type="application/json", headers={"X-A": "b"})
        # or stream: resp = StreamResponse(status=200, headers=...); await resp.prepare(req)
        #            await resp.write(b"..."); await resp.write_eof(); return resp

Requests: ``method``, ``path`` (percent-decoded), ``query`` (MultiDict), ``headers``
(``CIMultiDictProxy``), ``match_info``, ``remote``, ``content_length``, ``version``,
``disconnected``, ``req[key]`` storage. The body is received whole before the handler
runs (Content-Length or chunked); a body over ``max_body_bytes`` does not wait: the
handler runs at once and ``read()`` raises ``BodyTooLarge`` (answered 413 unless the
handler catches it; the gateway's proxy answers its own JSON-RPC 413 from
``content_length`` or that exception), the rest of the body is discarded and the
connection closed after the answer.

Connections: keep-alive (idle ones are closed after ``keepalive_timeout``), requests on
one connection handled in order by one task per connection (pipelined requests wait
their turn, reading pauses when too many are queued), ``Connection: close`` and HTTP/1.0
close after the answer, ``Expect: 100-continue`` is answered ``100 Continue`` when the
connection is idle. Malformed requests, or a request line + headers over
``MAX_HEADER_BYTES``, get 400 and the connection is closed. A handler exception is
logged and answered 500 (JSON) if the answer had not started (the connection stays
usable), else the connection is closed. When the client disconnects, the running handler
is cancelled (like aiohttp's ``handler_cancellation=True``) and ``write()`` raises
``ConnectionResetError``.

Responses: ``Response`` is written in one ``transport.write`` with ``Content-Length``;
``StreamResponse`` sends its head at ``prepare()`` and each ``write()`` at once as a
chunk (``Transfer-Encoding: chunked``; HTTP/1.0: raw bytes, then close), awaiting the
transport's drain when its write buffer is over the high-water mark. A prepared stream
the handler left open is ended (last chunk) when the handler returns. GET routes answer
HEAD too (no body). Unknown paths are 404, known paths with another method 405 (with
``Allow``); these and server-side errors have a JSON body ``{"error", "message"}``.

Shutdown (``close()``): stop accepting, close idle connections, let in-flight requests
finish up to ``shutdown_timeout`` (their connections close after the answer), then close
the rest (cancelling their handlers), then run the app's cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, unquote

import httptools
import orjson
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

__all__ = [
    "App",
    "BodyTooLarge",
    "HttpServer",
    "Request",
    "Response",
    "StreamResponse",
    "json_response",
]

log = logging.getLogger("ledgergate.http")

Handler = Callable[["Request"], Awaitable["StreamResponse"]]
CleanupCtx = Callable[["App"], AsyncIterator[None]]

MAX_HEADER_BYTES = 32 * 1024  # request line + headers
MAX_QUEUED = 16  # pipelined requests queued on one connection before reading pauses
LINGER_S = 2.0  # after answering a too-large body, how long to keep discarding its rest

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_NO_BODY_STATUS = frozenset((204, 304))
_CLOSE = b"Connection: close\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_BIG = 64 * 1024  # above this a chunk is handed to writelines() rather than copied

_date_at = 0
_date = b""


def _date_line() -> bytes:
    global _date_at, _date
    now = int(time.time())
    if now != _date_at:
        _date_at = now
        _date = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def _header_block(headers: Any, content_type: str | None) -> bytes:
    if not headers:
        return b"Content-Type: " + content_type.encode() + b"\r\n" if content_type else b""
    text = "".join([f"{k}: {v}\r\n" for k, v in headers.items()])
    if content_type:
        text = f"Content-Type: {content_type}\r\n{text}"
    return text.encode()


class BodyTooLarge(Exception):
    """The request body is larger than the app's ``max_body_bytes``."""


class Request:
    __slots__ = (
        "_chunks",
        "_conn",
        "_query",
        "_size",
        "_store",
        "_too_large",
        "content_length",
        "headers",
        "keep_alive",
        "match_info",
        "method",
        "path",
        "query_string",
        "remote",
        "version",
    )

    def __init__(
        self,
        conn: _Conn | None,
        method: str,
        path: str,
        query_string: str,
        headers: CIMultiDictProxy[str],
        version: str,
        keep_alive: bool,
        content_length: int | None,
        remote: str | None,
    ) -> None:
        self._conn = conn
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.remote = remote
        self.match_info: dict[str, str] = {}
        self._chunks: list[bytes] = []
        self._size = 0
        self._too_large = False
        self._store: dict[Any, Any] | None = None
        self._query: MultiDictProxy[str] | None = None

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path}>"

    async def read(self) -> bytes:
        """The whole body (already received). Raises ``BodyTooLarge`` over the app's limit."""
        if self._too_large:
            raise BodyTooLarge("request body too large")
        chunks = self._chunks
        if len(chunks) == 1:
            return chunks[0]
        body = b"".join(chunks)
        self._chunks = [body]
        return body

    @property
    def query(self) -> MultiDictProxy[str]:
        q = self._query
        if q is None:
            q = self._query = MultiDictProxy(MultiDict(parse_qsl(self.query_string, keep_blank_values=True)))
        return q

    @property
    def disconnected(self) -> bool:
        """The client has gone (the connection is closed)."""
        return self._conn is None or self._conn.closed

    def __getitem__(self, key: Any) -> Any:
        if self._store is None:
            raise KeyError(key)
        return self._store[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._store is None:
            self._store = {}
        self._store[key] = value

    def __contains__(self, key: Any) -> bool:
        return self._store is not None and key in self._store

    def get(self, key: Any, default: Any = None) -> Any:
        return default if self._store is None else self._store.get(key, default)


class StreamResponse:
    """A streamed answer: ``await prepare(req)``, ``await write(b)``..., ``await write_eof()``."""

    __slots__ = ("_chunked", "_conn", "_finished", "_head", "headers", "status")

    def __init__(self, *, status: int = 200, headers: Any = None) -> None:
        self.status = status
        self.headers = headers
        self._conn: _Conn | None = None
        self._chunked = True
        self._finished = False
        self._head = False

    @property
    def prepared(self) -> bool:
        return self._conn is not None

    async def prepare(self, req: Request) -> None:
        if self._conn is not None:
            return
        conn = req._conn
        if conn is None or conn.closed:
            raise ConnectionResetError("the client disconnected")
        self._conn = conn
        conn.started = True
        head = [_status_line(self.status), _date_line(), _header_block(self.headers, None)]
        keep = req.keep_alive and not conn.must_close
        self._head = req.method == "HEAD"
        if self._head or self.status in _NO_BODY_STATUS:
            self._chunked = False
            head.append(b"Content-Length: 0\r\n" if self._head else b"")
        elif req.version == "1.0" or (self.headers and "content-length" in _lower_keys(self.headers)):
            self._chunked = False
            keep = keep and req.version != "1.0"
        else:
            head.append(_CHUNKED)
        if not keep:
            conn.must_close = True
            head.append(_CLOSE)
        head.append(b"\r\n")
        conn.transport.write(b"".join(head))  # type: ignore[union-attr]
        if conn.paused:
            await conn.drain()

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            raise RuntimeError("write() before prepare()")
        if conn.closed:
            raise ConnectionResetError("the client disconnected")
        if self._finished:
            raise RuntimeError("write() after write_eof()")
        if not data or self._head:
            return
        t = conn.transport
        if not self._chunked:
            t.write(data)  # type: ignore[union-attr]
        elif len(data) <= _BIG:
            t.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        else:
            t.writelines((b"%x\r\n" % len(data), data, b"\r\n"))  # type: ignore[union-attr]
        if conn.paused:
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._finished:
            return
        if data:
            await self.write(data)
        conn = self._conn
        if conn is None:
            raise RuntimeError("write_eof() before prepare()")
        if conn.closed:
            raise ConnectionResetError("the client disconnected")
        self._finished = True
        if self._chunked and not self._head:
            conn.transport.write(_LAST_CHUNK)  # type: ignore[union-attr]
        if conn.paused:
            await conn.drain()


def _lower_keys(headers: Any) -> set[str]:
    return {k.lower() for k in headers}


class Response(StreamResponse):
    """A whole answer, written at once with its Content-Length."""

    __slots__ = ("body", "content_type")

    def __init__(
        self,
        *,
        body: bytes | None = None,
        status: int = 200,
        headers: Any = None,
        content_type: str | None = None,
        text: str | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = text.encode() if text is not None and body is None else body
        if text is not None and content_type is None:
            content_type = "text/plain; charset=utf-8"
        self.content_type = content_type
        self._conn = None
        self._chunked = False
        self._finished = False
        self._head = False

    def _encode(self, head_only: bool, keep: bool) -> bytes:
        body = self.body or b""
        status = self.status
        parts = [_status_line(status), _date_line(), _header_block(self.headers, self.content_type)]
        if status not in _NO_BODY_STATUS:
            parts.append(b"Content-Length: %d\r\n" % len(body))
        if not keep:
            parts.append(_CLOSE)
        parts.append(b"\r\n")
        if not head_only and status not in _NO_BODY_STATUS:
            parts.append(body)
        return b"".join(parts)


def json_response(doc: Any, status: int = 200, headers: Any = None) -> Response:
    return Response(body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json")


def _error(status: int, kind: str, message: str, headers: Any = None) -> Response:
    return json_response({"error": kind, "message": message}, status, headers)


# ---- the application: routes and lifecycle ---------------------------------------------------

_PARAM = re.compile(r"\{(\w+)(?::([^{}]+))?\}")


class App:
    """Routes (exact paths and ``{name}``/``{name:regex}`` patterns), state, lifecycle."""

    def __init__(self, *, max_body_bytes: int = 1024**2) -> None:
        self.max_body_bytes = max_body_bytes
        self.cleanup_ctx: list[CleanupCtx] = []
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._state: dict[Any, Any] = {}
        self._running: list[AsyncIterator[None]] = []

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

    @property
    def router(self) -> App:  # aiohttp's app.router.add_get(...) call shape
        return self

    def add_route(self, method: str, path: str, handler: Handler) -> None:
        if "{" not in path:
            methods = self._exact.setdefault(path, {})
        else:
            pos = 0
            regex = ""
            for m in _PARAM.finditer(path):
                regex += re.escape(path[pos : m.start()]) + f"(?P<{m[1]}>{m[2] or '[^{}/]+'})"
                pos = m.end()
            regex += re.escape(path[pos:])
            found = [ms for p, ms in self._patterns if p.pattern == regex]
            if found:
                methods = found[0]
            else:
                methods = {}
                self._patterns.append((re.compile(regex), methods))
        methods[method.upper()] = handler

    def add_get(self, path: str, handler: Handler) -> None:
        self.add_route("GET", path, handler)
        self.add_route("HEAD", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add_route("POST", path, handler)

    def add_delete(self, path: str, handler: Handler) -> None:
        self.add_route("DELETE", path, handler)

    def resolve(self, req: Request) -> Handler | Response:
        """The handler for ``req`` (``match_info`` filled in), or a 404/405 answer."""
        path = req.path
        methods = self._exact.get(path)
        if methods is None:
            for pattern, ms in self._patterns:
                m = pattern.fullmatch(path)
                if m is not None:
                    methods = ms
                    req.match_info = m.groupdict()
                    break
            else:
                return _error(404, "not_found", f"no route for {path}")
        handler = methods.get(req.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return _error(405, "method_not_allowed", f"{req.method} not allowed here", {"Allow": allow})
        return handler

    async def startup(self) -> None:
        for ctx in self.cleanup_ctx:
            it = ctx(self).__aiter__()
            await it.__anext__()
            self._running.append(it)

    async def cleanup(self) -> None:
        errors: list[BaseException] = []
        while self._running:
            it = self._running.pop()
            try:
                await it.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as exc:
                errors.append(exc)
            else:
                errors.append(RuntimeError(f"{it!r} has more than one yield"))
        if errors:
            raise errors[0]


# ---- the connection ---------------------------------------------------------------------------


class _HeaderTooLarge(Exception):
    pass


class _Bad:
    """Queued in place of a request: answer 400 and close (after the answers before it)."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_drain",
        "_hdrs",
        "_hsize",
        "_linger",
        "_loop",
        "_parser",
        "_server",
        "_url",
        "_waiter",
        "app",
        "busy",
        "closed",
        "cur",
        "discard",
        "discard_done",
        "idle_at",
        "lingering",
        "must_close",
        "paused",
        "queue",
        "reading_paused",
        "remote",
        "started",
        "stopped",
        "task",
        "transport",
    )

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self.app = server.app
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.queue: deque[Request | _Bad] = deque()
        self.cur: Request | None = None
        self._url = b""
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._hsize = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._linger: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.paused = False
        self.reading_paused = False
        self.busy = False  # a handler is running
        self.started = False  # the current request's answer has started going out
        self.must_close = False  # close after the current answer
        self.stopped = False  # parse nothing more (bad input, upgrade, too-large body)
        self.discard = False  # dropping the rest of a too-large body
        self.discard_done = False
        self.lingering = False
        self.idle_at = self._loop.time()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple | list) and peer else None
        self._server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._server.conns.discard(self)
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        d = self._drain
        if d is not None:
            self._drain = None
            if not d.done():
                d.set_result(None)  # the writer sees `closed` and raises ConnectionResetError
        task = self.task
        if task is not None and not task.done():
            task.cancel()  # like aiohttp's handler_cancellation: the client is gone

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d = self._drain
        if d is not None:
            self._drain = None
            if not d.done():
                d.set_result(None)

    async def drain(self) -> None:
        if self.paused and not self.closed:
            d = self._drain
            if d is None:
                d = self._drain = self._loop.create_future()
            await d
        if self.closed:
            raise ConnectionResetError("the client disconnected")

    def eof_received(self) -> bool | None:
        # the client closed its side: treat it as gone (like aiohttp), so a handler streaming
        # to it, or waiting for an upstream on its behalf, is cancelled
        self.must_close = True
        self.stopped = True
        return None

    def data_received(self, data: bytes) -> None:
        if self.stopped and not self.discard:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.stopped = True  # no protocol switch here: answer, then close
            self.must_close = True
        except (httptools.HttpParserError, _HeaderTooLarge) as exc:
            if self.discard:
                self._close()
                return
            self.stopped = True
            self.must_close = True
            self._enqueue(_Bad(f"malformed request: {exc}"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._hdrs = []
        self._hsize = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._hsize += len(url)
        if self._hsize > MAX_HEADER_BYTES:
            raise _HeaderTooLarge("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hdrs.append((name, value))
        self._hsize += len(name) + len(value) + 4
        if self._hsize > MAX_HEADER_BYTES:
            raise _HeaderTooLarge("request headers too large")

    def on_headers_complete(self) -> None:
        if self.discard:
            return
        p = self._parser
        raw, _, qs = self._url.partition(b"?")
        path = raw.decode("utf-8", "surrogateescape")
        if "%" in path:
            path = unquote(path)
        headers = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self._hdrs]
        )
        version = p.get_http_version()
        cl = headers.get("Content-Length")
        req = Request(
            self,
            p.get_method().decode("ascii", "surrogateescape"),
            path,
            qs.partition(b"#")[0].decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(headers),
            version,
            p.should_keep_alive() and version != "1.0",
            int(cl) if cl is not None and "Transfer-Encoding" not in headers else None,
            self.remote,
        )
        if req.content_length is not None and req.content_length > self.app.max_body_bytes:
            self._too_large(req)
            return
        self.cur = req
        expect = headers.get("Expect")
        if (
            expect is not None
            and expect.lower() == "100-continue"
            and version == "1.1"
            and not self.busy
            and not self.queue
        ):
            self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        req = self.cur
        if self.discard or req is None:
            return
        req._size += len(body)
        if req._size > self.app.max_body_bytes:
            self.cur = None
            req._chunks = []
            self._too_large(req)
            return
        req._chunks.append(body)

    def on_message_complete(self) -> None:
        if self.discard:
            self.discard_done = True
            if self.lingering:  # the answer is out already: nothing more to wait for
                self._close()
            return
        req = self.cur
        if req is not None:
            self.cur = None
            self._enqueue(req)

    def _too_large(self, req: Request) -> None:
        req._too_large = True
        req.keep_alive = False
        self.discard = True
        self.stopped = True
        self._enqueue(req)

    # -- dispatch ----------------------------------------------------------------------------

    def _enqueue(self, item: Request | _Bad) -> None:
        self.queue.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        elif self.task is None:
            self.task = self._loop.create_task(self._run())
        if len(self.queue) > MAX_QUEUED and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()

    async def _run(self) -> None:
        q = self.queue
        loop = self._loop
        try:
            while not self.closed:
                if not q:
                    if self.stopped and not self.discard:
                        self._close()
                        return
                    w = self._waiter = loop.create_future()
                    await w
                    continue
                item = q.popleft()
                if self.reading_paused and len(q) <= MAX_QUEUED // 2:
                    self.reading_paused = False
                    self.transport.resume_reading()  # type: ignore[union-attr]
                if isinstance(item, _Bad):
                    self.transport.write(  # type: ignore[union-attr]
                        _error(400, "bad_request", item.message)._encode(False, False)
                    )
                    self._close()
                    return
                self.busy = True
                try:
                    keep = await self._handle(item)
                finally:
                    self.busy = False
                if not keep:
                    if self.discard and not self.discard_done:
                        self.lingering = True  # close when the body ends
                        self._linger = loop.call_later(LINGER_S, self._close)
                    else:
                        self._close()
                    return
                self.idle_at = loop.time()
        except asyncio.CancelledError:
            pass  # the client disconnected (or the server closed the connection)

    async def _handle(self, req: Request) -> bool:
        self.started = False
        try:
            resolved = self.app.resolve(req)
            if isinstance(resolved, Response):
                resp: StreamResponse = resolved
            else:
                try:
                    resp = await resolved(req)
                except BodyTooLarge:
                    if self.started:
                        raise
                    resp = _error(413, "payload_too_large", f"body over {self.app.max_body_bytes} bytes")
                if not isinstance(resp, StreamResponse):
                    raise TypeError(f"handler returned {resp!r}, not a response")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("error handling %s %s: %r", req.method, req.path, exc, exc_info=exc)
            if self.started or self.closed:
                self.must_close = True
                return False
            resp = _error(500, "internal_error", f"{type(exc).__name__}: {exc}")
        if self.closed:
            return False
        keep = req.keep_alive and not self.must_close and not self._server.closing
        if self.started:
            if resp._conn is self and not resp._finished:
                try:
                    await resp.write_eof()
                except ConnectionResetError:
                    return False
            return keep and not self.must_close
        if not isinstance(resp, Response):  # a StreamResponse never prepared: send it empty
            resp = Response(status=resp.status, headers=resp.headers)
        self.transport.write(resp._encode(req.method == "HEAD", keep))  # type: ignore[union-attr, attr-defined]
        if self.paused:
            try:
                await self.drain()
            except ConnectionResetError:
                return False
        return keep


# ---- the server -------------------------------------------------------------------------------


class HttpServer:
    """Serve ``app`` on host:port. ``start()`` runs the app's setup then listens; ``close()``
    shuts down gracefully (see the module doc) then runs the app's cleanup."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        *,
        shutdown_timeout: float = 5.0,
        keepalive_timeout: float = 75.0,
        backlog: int = 1024,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.keepalive_timeout = keepalive_timeout
        self.backlog = backlog
        self.conns: set[_Conn] = set()
        self.closing = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.app.startup()
        self._started = True
        try:
            self._server = await self.loop.create_server(
                lambda: _Conn(self), self.host, self.port, backlog=self.backlog, reuse_address=True
            )
        except BaseException:
            self._started = False
            await self.app.cleanup()
            raise
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = self.loop.create_task(self._sweep(), name="http-keepalive-sweeper")

    async def _sweep(self) -> None:
        interval = max(0.5, min(10.0, self.keepalive_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            limit = self.loop.time() - self.keepalive_timeout
            for c in list(self.conns):
                if not c.busy and not c.queue and c.cur is None and c.idle_at < limit:
                    c._close()

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # let requests already received start
        deadline = self.loop.time() + self.shutdown_timeout
        while True:
            for c in list(self.conns):
                if not c.busy and not c.queue:
                    c._close()
            if not self.conns or self.loop.time() >= deadline:
                break
            await asyncio.sleep(0.02)
        for c in list(self.conns):
            c._close()
        tasks = [c.task for c in list(self.conns) if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._started:
            self._started = False
            await self.app.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
