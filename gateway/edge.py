"""The agent-facing HTTP server: aiohttp's low-level server with nginx-class limits on top.

aiohttp parses and writes HTTP (its C parser, llhttp: per-line and header-count limits,
duplicate singleton headers such as ``Host`` refused with 400); this module adds what it
does not do, all set from ``[gateway]`` (see ``EdgeLimits`` and the README table):

- a deadline for the request head (from its first byte, or from the connection's start),
  so a client that sends half a head, or nothing, is closed;
- a deadline for the request body (from the end of the head, trickle or not): ``read()``
  raises ``HTTPRequestTimeout`` (408) after it;
- a cap on open connections: beyond it a new connection gets a clean 503 and is closed;
- HTTP versions other than 1.0/1.1 get 505; an ``Expect`` other than ``100-continue`` gets
  417; ``100 Continue`` goes out only when the handler first reads the body, that is after
  it checked the key (never for a request it refused, never on GET);
- a tiny router (exact paths, ``{name}``/``{name:regex}`` segments) in one handler: an
  ``aiohttp.web.Application`` costs its router and middleware machinery on every call.

    app = App(EdgeLimits(max_body_bytes=1 << 20))
    app.add_post("/mcp/{server}", handler)          # handlers take an aiohttp request
    app.cleanup_ctx.append(lifecycle)               # async generator: setup, yield, teardown
    async with HttpServer(app, "127.0.0.1", 8080):  # start(): setup + listen; close(): graceful
        ...

The same server listens on a Unix socket instead: ``HttpServer(app, unix_path=path)`` (owner-only
from the first instant, a stale file replaced, removed by ``close()``: ``bind_private_unix_socket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import stat
import sys
import tempfile
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

__all__ = [
    "Answer",
    "App",
    "EdgeLimits",
    "HttpServer",
    "Request",
    "bind_private_unix_socket",
    "json_error",
    "json_response",
]

log = logging.getLogger("ledgergate.http")

Handler = Callable[["Request"], Awaitable[web.StreamResponse]]
CleanupCtx = Callable[["App"], AsyncIterator[None]]

_VERSIONS = (HttpVersion11, HttpVersion10)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# chunked framing (size lines, extensions, CRLFs) allowed beyond the body's own bytes: llhttp
# skips chunk extensions without storing them, so this bounds the bytes a client can make the
# gateway read for nothing (a 1 GB extension on a 3-byte chunk)
MAX_CHUNK_FRAMING_BYTES = 4096
_BODY_LATE = orjson.dumps(
    {"error": "request_timeout", "message": "Request Timeout: the body did not arrive in time"}
).decode()


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """Limits of the agent-facing server (``[gateway]`` keys of the same names)."""

    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 15.0  # first byte of a head (or the connection's start) -> its end
    body_timeout_s: float = 30.0  # end of the head -> end of the body
    keepalive_timeout_s: float = 75.0  # idle time between requests on one connection
    max_connections: int = 1024
    max_header_line_bytes: int = 8192  # one header line (name + value), and the request line
    max_headers: int = 100
    lingering_s: float = 2.0  # how long an unread body is drained after the answer


_CONTENT_TYPE = hdrs.CONTENT_TYPE
_CONTENT_LENGTH = hdrs.CONTENT_LENGTH
_DATE = hdrs.DATE
_SERVER = hdrs.SERVER
_CONNECTION = hdrs.CONNECTION
_NO_BODY_METHODS = frozenset({hdrs.METH_HEAD, hdrs.METH_CONNECT})


class Answer(web.Response):
    """A whole answer with a bytes body (every non-streamed answer of the gateway).

    aiohttp's ``Response`` with its per-answer work cut to what such an answer needs: built
    without the checks for text, charset and payload bodies, and prepared in one step (no
    compression, cookies or chunking to consider). The head is still serialised by aiohttp's
    writer (which refuses CR/LF in a header) with the same headers aiohttp adds; a HEAD, a
    1xx/204/304 answer or anything unusual takes aiohttp's own path."""

    # set by Response.__init__, which is not called: read only if someone compresses an Answer
    _zlib_executor_size = MAX_SYNC_CHUNK_SIZE
    _zlib_executor = None

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        headers: Any = None,
        content_type: str | None = None,
    ) -> None:
        # what StreamResponse/Response.__init__ set for a bytes body (the rest are class defaults)
        h: CIMultiDict[str] = CIMultiDict(headers) if headers else CIMultiDict()
        if content_type is not None and _CONTENT_TYPE not in h:
            h[_CONTENT_TYPE] = content_type
        self._state = {}
        self._headers = h
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._body = body

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        status = self._status
        if (
            self._payload_writer is not None
            or self._eof_sent
            or self._compression
            or self._chunked
            or self._cookies
            or status < 200
            or status == 204
            or status == 304
            or request.method in _NO_BODY_METHODS
        ):
            return await super().prepare(request)
        self._must_be_empty_body = False
        self._req = request
        writer = self._payload_writer = request._payload_writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        headers = self._headers
        body = self._body
        assert isinstance(body, bytes | bytearray)
        n = len(body)
        writer.length = n
        headers[_CONTENT_LENGTH] = str(n)
        if n and _CONTENT_TYPE not in headers:
            headers[_CONTENT_TYPE] = "application/octet-stream"
        if _DATE not in headers:
            headers[_DATE] = rfc822_formatted_time()
        if _SERVER not in headers:
            headers[_SERVER] = SERVER_SOFTWARE
        version = request.version
        if _CONNECTION not in headers:
            if keep_alive:
                if version == HttpVersion10:
                    headers[_CONNECTION] = "keep-alive"
            elif version == HttpVersion11:
                headers[_CONNECTION] = "close"
        await writer.write_headers(f"HTTP/{version[0]}.{version[1]} {status} {self._reason}", headers)
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        writer = self._payload_writer
        if self._eof_sent or writer is None or self._must_be_empty_body is not False:
            return await super().write_eof(data)
        await writer.write_eof(self._body)  # one write: the buffered head and the body
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer (`doc` as bytes already serialised, or anything orjson serialises)."""
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return Answer(body, status, headers, "application/json")


def json_error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An HTTP-level error (edge limits, admin API, health): ``{"error": kind, "message": ...}``.
    MCP agents get JSON-RPC errors instead (`gateway.proxy.error_response`)."""
    return json_response({"error": kind, "message": message}, status, headers)


def _busy_answer() -> bytes:
    body = orjson.dumps({"error": "busy", "message": "Service Unavailable: too many open connections"})
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )


_BUSY = _busy_answer()


class Request(web.BaseRequest):
    """aiohttp's request, plus ``match_info`` (from the router), the body deadline and the
    deferred ``100 Continue``."""

    ATTRS = web.BaseRequest.ATTRS | frozenset(["match_info", "_body_deadline", "_expect_continue"])

    def __init__(self, *args: Any, body_deadline: float, expect_continue: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.match_info: dict[str, str] = {}
        self._body_deadline = body_deadline
        self._expect_continue = expect_continue

    async def read(self) -> bytes:
        """The whole body: raises ``HTTPRequestEntityTooLarge`` over ``max_body_bytes``,
        ``HTTPRequestTimeout`` when it has not arrived by the body deadline."""
        if self._expect_continue:
            # the handler reads the body only after it accepted the request (key checked)
            self._expect_continue = False
            await self._payload_writer.write(_CONTINUE)
        data = self._read_bytes
        if data is not None:
            return data
        payload = self._payload
        if payload.is_eof():
            # the whole body is buffered already (the usual small POST): take it in one go,
            # not through aiohttp's readany loop (two awaits, a bytearray and a copy per call)
            data = payload.read_nowait(-1)  # raises what the parser set (a broken body)
            if len(data) > self._client_max_size:
                raise web.HTTPRequestEntityTooLarge(self._client_max_size, len(data))
            self._read_bytes = data
            return data
        try:
            async with asyncio.timeout_at(self._body_deadline):
                return await super().read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=_BODY_LATE,
                content_type="application/json",
            ) from None


# Python 3.11: aiohttp runs each request's handler in a Task of its own (from 3.12 it starts
# it eagerly), only so that a handler's context variables cannot leak into the next request
# of the connection. That Task costs ~10 us per request (its creation and two loop hops).
# The gateway's handlers reset every context variable they set, so on 3.11 the edge's
# requests run inline in the connection's task: `_Conn` gets its own copy of aiohttp's
# `_handle_request` (same body, a code object of its own) and a loop task factory returns
# that coroutine itself, which aiohttp then awaits; every other coroutine gets a plain Task.
_INLINE_REQUESTS = sys.version_info < (3, 12)
_base_handle = RequestHandler._handle_request
_EDGE_HANDLE_CODE = _base_handle.__code__.replace()  # a copy: identity marks the edge's requests


def _edge_task_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
    if getattr(coro, "cr_code", None) is _EDGE_HANDLE_CODE:
        return coro
    return asyncio.Task(coro, loop=loop, **kwargs)


class _Conn(RequestHandler):
    """aiohttp's connection protocol plus the head deadline and the connection cap."""

    __slots__ = ("_edge", "_framing", "_head_timer", "_last_payload", "_refused")

    if _INLINE_REQUESTS:
        _handle_request = types.FunctionType(
            _EDGE_HANDLE_CODE, _base_handle.__globals__, "_handle_request", _base_handle.__defaults__
        )

    def __init__(self, manager: _Server, *, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._edge = manager.edge
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_payload: Any = None
        self._framing = 0  # bytes of chunk framing received for the current body
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        edge = self._edge
        if edge.open_connections >= edge.app.limits.max_connections:
            # answer 503 and half-close; drain what the client sends (so the answer is not
            # lost to a reset) for a moment, then close: a refused connection costs nothing
            self._refused = True
            self._force_close = True  # aiohttp's data_received ignores everything from now on
            self._manager = None  # and connection_lost has nothing to undo
            tr: asyncio.Transport = transport  # type: ignore[assignment]
            tr.write(_BUSY)
            # half-close where the transport can (TLS transports raise NotImplementedError, a
            # transport already closing RuntimeError/OSError): the 503 is written either way
            with contextlib.suppress(OSError, NotImplementedError, RuntimeError):
                tr.write_eof()
            self._loop.call_later(1.0, tr.close)
            return
        edge.open_connections += 1
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._edge.open_connections -= 1
        t = self._head_timer
        if t is not None:
            t.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._edge.app.limits.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        log.debug("closing a connection whose request head did not arrive in time")
        self.force_close()

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        count = self._request_count
        p = self._last_payload
        in_body = p is not None and not p.is_eof()
        before = p.total_bytes if in_body else 0
        super().data_received(data)
        if self._request_count != count:  # a head is complete: its deadline is met
            t = self._head_timer
            if t is not None:
                t.cancel()
                self._head_timer = None
            if self._messages:
                self._last_payload = self._messages[-1][1]
                self._framing = 0
        elif in_body:
            if not p.is_eof():  # every byte of `data` belonged to this body
                self._framing += len(data) - (p.total_bytes - before)
                if self._framing > MAX_CHUNK_FRAMING_BYTES:
                    log.debug("closing a connection whose chunk framing is over the limit")
                    p.set_exception(
                        web.HTTPBadRequest(
                            text=orjson.dumps(
                                {"error": "bad_request", "message": "Bad Request: chunk extensions too long"}
                            ).decode(),
                            content_type="application/json",
                        )
                    )
                    self._lingering_time = 0.0  # close right after the answer
                    self.close()
        elif self._head_timer is None and data:  # the first bytes of the next head
            self._arm_head_timer()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # a malformed request is the client's fault: no traceback in the log (a flood of them
        # must not fill it), a short JSON answer, and the connection closes
        log.debug("malformed request from %s: %s", request.remote, exc)
        if isinstance(exc, BadStatusLine) and "Invalid HTTP version" in str(exc):
            status = 505  # llhttp refuses e.g. HTTP/1.2 in the request line itself
        text = (message or exc.message or "malformed request").strip().splitlines()[0][:200]
        resp = json_error(status, "bad_request" if status == 400 else "http_version_not_supported", text)
        resp.force_close()
        return resp


class _Server(web.Server):
    def __init__(self, edge: HttpServer, **kwargs: Any) -> None:
        super().__init__(edge.app.handle, request_factory=self._request, handler_cancellation=True, **kwargs)
        self.edge = edge
        limits = edge.app.limits
        self._max_body = limits.max_body_bytes
        self._body_timeout = limits.body_timeout_s

    def _request(
        self,
        message: Any,
        payload: Any,
        protocol: RequestHandler,
        writer: Any,
        task: asyncio.Task[None],
    ) -> Request:
        expect = message.headers.get("Expect")
        return Request(
            message,
            payload,
            protocol,
            writer,
            task,
            self._loop,
            client_max_size=self._max_body,
            body_deadline=self._loop.time() + self._body_timeout,
            expect_continue=expect is not None
            and expect.lower() == "100-continue"
            and message.version == HttpVersion11,
        )

    def __call__(self) -> RequestHandler:
        return _Conn(self, loop=self._loop, **self._kwargs)


# ---- the application: routes and lifecycle ---------------------------------------------------

_PARAM = re.compile(r"\{(\w+)(?::([^{}]+))?\}")
_MAX_MATCHED = 1024  # paths whose pattern route is remembered


async def _ready(resp: web.StreamResponse) -> web.StreamResponse:
    return resp


class App:
    """Routes (exact paths and ``{name}``/``{name:regex}`` patterns), state, lifecycle."""

    def __init__(self, limits: EdgeLimits | None = None) -> None:
        self.limits = limits or EdgeLimits()
        self.cleanup_ctx: list[CleanupCtx] = []
        # run by HttpServer.close once the listener is closed, before in-flight requests are
        # cancelled: the place to drain them (and cut the late ones with a proper answer)
        self.on_shutdown: list[Callable[[], Awaitable[Any]]] = []
        self._exact: dict[str, dict[str, Handler]] = {}
        self._patterns: list[tuple[re.Pattern[str], dict[str, Handler]]] = []
        self._matched: dict[str, tuple[dict[str, Handler], dict[str, str]]] = {}
        self._state: dict[Any, Any] = {}
        self._running: list[AsyncIterator[None]] = []

    def __getitem__(self, key: Any) -> Any:
        return self._state[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._state[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._state.get(key, default)

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
        self._matched.clear()

    def add_get(self, path: str, handler: Handler) -> None:
        """GET only: HEAD is routed only where added (add_head), so it never runs a GET."""
        self.add_route("GET", path, handler)

    def add_head(self, path: str, handler: Handler) -> None:
        self.add_route("HEAD", path, handler)

    def add_post(self, path: str, handler: Handler) -> None:
        self.add_route("POST", path, handler)

    def add_delete(self, path: str, handler: Handler) -> None:
        self.add_route("DELETE", path, handler)

    def handle(self, req: Request) -> Awaitable[web.StreamResponse]:
        """The one handler of the low-level server: checks, route, call.

        A plain function returning the handler's coroutine (aiohttp awaits it): one coroutine
        and one frame less on every resumption of every request."""
        if req.version not in _VERSIONS:
            return _ready(
                json_error(505, "http_version_not_supported", "HTTP Version Not Supported: use 1.0 or 1.1")
            )
        expect = req.headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            return _ready(json_error(417, "expectation_failed", f"Expectation Failed: {expect[:64]!r}"))
        path = req.path
        methods = self._exact.get(path)
        if methods is None:
            hit = self._matched.get(path)
            if hit is None:
                hit = self._match(path)
                if hit is None:
                    return _ready(json_error(404, "not_found", f"no route for {path[:200]}"))
            methods, params = hit
            req.match_info = dict(params)
        handler = methods.get(req.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return _ready(
                json_error(405, "method_not_allowed", f"{req.method} not allowed here", {"Allow": allow})
            )
        return handler(req)

    def _match(self, path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
        """The pattern route of ``path`` and its parameters, remembered (a bounded cache: paths
        come from clients, so a flood of distinct ones only clears it)."""
        for pattern, ms in self._patterns:
            m = pattern.fullmatch(path)
            if m is not None:
                if len(self._matched) >= _MAX_MATCHED:
                    self._matched.clear()
                hit = self._matched[path] = (ms, m.groupdict())
                return hit
        return None

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


# ---- the server -------------------------------------------------------------------------------


MAX_UNIX_PATH = 107  # sun_path is 108 bytes with its NUL on Linux


def bind_private_unix_socket(path: os.PathLike[str] | str) -> socket.socket:
    """A Unix stream socket bound at ``path``, mode 0600 (owner only) from its first instant,
    replacing a stale socket file (a killed gateway's) atomically.

    bind() creates the file with the process umask (often world-connectable), and changing
    the umask would race the other threads creating files. So: bind inside a fresh 0700
    directory next to ``path``, chmod 0600, then rename onto ``path`` (connecting needs write
    permission on the file, so nobody else can connect at any point). Refuses to replace
    anything but a socket, and a socket a live server still answers on (EADDRINUSE)."""
    path = os.fspath(path)
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise OSError(
            errno.ENAMETOOLONG,
            f"socket path too long ({len(os.fsencode(path))} > {MAX_UNIX_PATH} bytes)",
            path,
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(errno.EEXIST, "exists and is not a socket: not replacing it", path)
        if _answers(path):
            raise OSError(errno.EADDRINUSE, "another server listens on this socket", path)
    private = tempfile.mkdtemp(prefix=".s", dir=os.path.dirname(path) or ".")  # 0700
    tmp = os.path.join(private, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)
    return sock


def _answers(path: str) -> bool:
    """Something accepts connections on the Unix socket ``path`` (a stale file refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)  # a full backlog (EAGAIN) means a live server too
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EPERM)
        return True


class HttpServer:
    """Serve ``app`` on host:port, or on the Unix socket ``unix_path`` (owner only, see
    ``bind_private_unix_socket``). ``start()`` runs the app's setup then listens; ``close()``
    stops accepting, lets in-flight requests finish up to ``shutdown_timeout``, then runs the
    app's cleanup (and removes the socket file, if it is still the one bound)."""

    def __init__(
        self,
        app: App,
        host: str = "",
        port: int = 0,
        *,
        shutdown_timeout: float = 5.0,
        backlog: int = 1024,
        unix_path: os.PathLike[str] | str | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.shutdown_timeout = shutdown_timeout
        self.backlog = backlog
        self.open_connections = 0
        self._server: _Server | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._started = False
        self.unix_path = None if unix_path is None else os.fspath(unix_path)
        # the inode of the socket file bound: close() removes the file only while it is still
        # ours (getsockname() names the temporary path it was bound at, not this one)
        self._unix_ino: int | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if _INLINE_REQUESTS and loop.get_task_factory() is None:
            loop.set_task_factory(_edge_task_factory)  # see _EDGE_HANDLE_CODE
        await self.app.startup()
        self._started = True
        limits = self.app.limits
        self._server = _Server(
            self,
            keepalive_timeout=limits.keepalive_timeout_s,
            max_line_size=limits.max_header_line_bytes,
            max_field_size=limits.max_header_line_bytes,
            max_headers=limits.max_headers,
            lingering_time=limits.lingering_s,
            access_log=None,  # the audit log records calls; an access log line costs per request
        )
        try:
            if self.unix_path is not None:
                sock = bind_private_unix_socket(self.unix_path)
                with contextlib.suppress(OSError):
                    self._unix_ino = os.stat(self.unix_path).st_ino
                try:
                    self._listener = await loop.create_unix_server(
                        self._server, sock=sock, backlog=self.backlog
                    )
                except BaseException:
                    sock.close()
                    raise
            else:
                self._listener = await loop.create_server(
                    self._server, self.host, self.port, backlog=self.backlog, reuse_address=True
                )
        except BaseException:
            self._started = False
            self._remove_unix_file()
            await self.app.cleanup()
            raise
        if self.unix_path is None and self.port == 0:
            self.port = self._listener.sockets[0].getsockname()[1]

    def _remove_unix_file(self) -> None:
        path, ino = self.unix_path, self._unix_ino
        if path is None or ino is None:
            return
        self._unix_ino = None
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == ino:  # not a newer gateway's socket
                os.unlink(path)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._remove_unix_file()
        if self._server is not None:
            server, self._server = self._server, None
            server.pre_shutdown()
            for hook in self.app.on_shutdown:
                try:
                    await hook()
                except Exception:
                    log.exception("a shutdown hook failed")
            with contextlib.suppress(Exception):
                await server.shutdown(self.shutdown_timeout)
        if self._started:
            self._started = False
            await self.app.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}" if self.unix_path is None else "http://localhost"

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
