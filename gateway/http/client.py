"""A lean HTTP/1.1 keep-alive client for one upstream origin.

Built for the gateway's only outbound HTTP job: relay MCP JSON-RPC POSTs (and the
session's GET stream and DELETE) to one Streamable HTTP upstream, at a small fraction
of aiohttp.ClientSession's CPU cost per request. It is an ``asyncio.Protocol`` fed by
the ``httptools`` (llhttp) C parser; there is no Task per request, one ``Future`` per
wait, no timer per wait (one timer per pool checks every wait's deadline, see Timeouts),
and one ``transport.write`` per request.

    pool = UpstreamPool("http://127.0.0.1:3000/mcp")
    resp = await pool.request("POST", [("Content-Type", "application/json")], body)
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        async with resp:                       # releases (closes if abandoned mid-body)
            async for chunk in resp:           # each chunk as soon as it arrives
                ...
    else:
        data = await resp.read()               # whole body; returns the connection to the pool
    await pool.close()

Request: the request line, the caller's headers, ``Host`` (from the URL) and
``Content-Length`` (when there is a body, or ``0`` for a body-less POST/PUT/PATCH) are
sent in one write; nothing else is added (no User-Agent, no Accept-Encoding). The caller
must not pass Host, Content-Length or Transfer-Encoding (``ValueError``), nor CR/LF in a
header (``ValueError``). Headers sent with many requests can be checked and serialised
once: ``pool.prepare(headers)`` returns ``Headers`` (bytes) that ``request`` sends as is.

Response: ``status`` (int) and ``headers``, a plain ``dict`` whose keys are lower-cased
header names (repeated headers are joined with ``", "``), so
``resp.headers.get("content-type")``. Bodies framed by Content-Length, by chunked
transfer-encoding (de-chunked here), or by the end of the connection; 1xx interim
answers are skipped; 204/304 and HEAD have no body.

Connections: HTTP/1.1 without pipelining, so concurrent requests each use their own
connection; up to ``max_idle`` idle ones are kept (most recently used first) and reused
unless the response said ``Connection: close`` (or was HTTP/1.0 without keep-alive, or
was delimited by the end of the connection). A connection whose response body was not
read to its end (``release()`` or leaving ``async with`` early, a timeout, a
cancellation) is closed, never reused.

Stale keep-alive connections: the server may close an idle connection just as we send
a new request on it. A request on a REUSED idle connection that fails before ANY byte of
the response arrived is retried once on a fresh connection - including POSTs. That is
the standard keep-alive race: a server that closes an idle connection has not started
processing a request on it. A request on a fresh connection, or one that received any
response byte, is never retried.

Streaming and backpressure: body chunks are buffered in the connection until the
consumer takes them; above 256 KiB buffered while the consumer is not waiting, the
transport stops reading (``pause_reading``) until the consumer has drained the buffer
and asks for more. ``read()`` never pauses.

Timeouts: ``read_timeout`` is the longest idle time while waiting for the next bytes of
the response (headers or body), restarted by every received byte; ``None`` waits
forever (long-lived GET streams). ``head_timeout`` (default: ``read_timeout``) is a
deadline for the whole head, from the request: a head trickled a byte at a time does not
restart it. It raises ``UpstreamTimeout``, a subclass of both
``UpstreamError`` and the built-in ``TimeoutError`` (== ``asyncio.TimeoutError``).
``connect_timeout`` bounds the TCP (and TLS) connect and raises ``UpstreamTimeout`` too.
The pool keeps ONE timer, armed at the earliest moment any wait could expire; when it
fires it checks every waiting connection (failing the expired, re-arming for the next).
A wait that ends never cancels it: with one timeout for every call the next wait's due
time is later, so under load the timer fires about once per timeout instead of a timer
being created and cancelled per request (~2.7 us each on uvloop).

Limits (a hostile or broken upstream must not grow the gateway): the head (status line
and headers) is at most ``max_head_bytes`` and ``max_headers`` lines; ``read()`` refuses a
body over ``max_body_bytes`` (or its ``limit``) as soon as that much arrived, without
buffering the rest; a streamed body is buffered at most ~``HIGH_WATER`` ahead of its
consumer (see above). All raise ``UpstreamError`` and close the connection.

Errors: connection refused/reset, the connection closing before the response is
complete, and malformed responses raise ``UpstreamError`` (the ``OSError`` or parser
error chained as ``__cause__``).

Parser: httptools (llhttp) rather than aiohttp's C parser, which is private
(``aiohttp._http_parser``, constructor tied to aiohttp internals) and builds a
CIMultiDict and a StreamReader per response: parsing one small JSON answer costs
~3.5 us with httptools and the callbacks below vs ~7.5 us with aiohttp's.

Limitations: one origin per pool; request bodies are written whole without write flow
control (fine for JSON-RPC messages; a 5 MB body is simply buffered by the transport);
a connection whose request body was still being sent when the answer came is not
reused; no proxies, redirects, cookies, compression,
``Expect: 100-continue``, request trailers, streamed (chunked) request bodies or
protocol upgrades; response trailers are ignored; the host name is resolved on each
new connection (by the event loop). https works when the URL is ``https://`` (default
``ssl.create_default_context()``, or pass ``ssl=``).
"""

from __future__ import annotations

import asyncio
import math
import ssl as _ssl
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httptools

__all__ = [
    "ConnectTimeout",
    "Headers",
    "Response",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
    "UpstreamUnreachable",
]

HIGH_WATER = 256 * 1024  # buffered body bytes above which the transport stops reading
_BIG_BODY = 64 * 1024  # above this, the body is handed to writelines() rather than copied
_NO_BODY_STATUS = (204, 304)
_EMPTY_BODY_METHODS = frozenset(("POST", "PUT", "PATCH"))
_RESERVED = ("\nhost:", "\ncontent-length:", "\ntransfer-encoding:")
_MAX_NAMES = 256
# header name as received -> lower-cased str: filled as names arrive (bounded by _MAX_NAMES);
# the usual ones up front, in the spellings servers use
_NAMES: dict[bytes, str] = {
    n: n.decode().lower()
    for name in (
        b"Content-Type",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Keep-Alive",
        b"Date",
        b"Server",
        b"Mcp-Session-Id",
        b"Cache-Control",
        b"X-Accel-Buffering",
        b"Allow",
    )
    for n in (name, name.lower(), name.replace(b"Id", b"ID"))
}
_TOKEN = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class Headers(bytes):
    """Request header lines serialised and checked once by ``UpstreamPool.prepare``: pass
    them as ``headers`` to any number of requests (nothing is checked or encoded again)."""

    __slots__ = ()


class UpstreamError(Exception):
    """The upstream could not be reached, closed early, or answered malformed HTTP."""


class UpstreamTimeout(UpstreamError, TimeoutError):
    """Connect timeout, or no byte of the response within ``read_timeout``."""


class UpstreamUnreachable(UpstreamError):
    """No connection could be made (refused, connect timeout, pool closed): nothing was sent."""


class ConnectTimeout(UpstreamTimeout, UpstreamUnreachable):
    """The TCP (and TLS) connect did not complete within ``connect_timeout``."""


class _Stale(UpstreamError):
    """A reused idle connection failed before any response byte: retry once."""


class _Unexpected(Exception):
    """Bytes from the upstream when no response is expected."""


class _TooLarge(Exception):
    """A response head or body over the pool's limits."""


class _Conn(asyncio.Protocol):
    __slots__ = (
        "_armed",
        "_deadline",
        "_head",
        "_head_room",
        "_headers",
        "_info",
        "_lines_room",
        "_loop",
        "_mark",
        "_parser",
        "_paused",
        "_pool",
        "_rx",
        "_timeout",
        "_until_eof",
        "_waiter",
        "closed",
        "idle_at",
        "resp",
        "reusable",
        "reused",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.resp: Response | None = None
        self._headers: dict[str, str] = {}
        self._waiter: asyncio.Future[None] | None = None
        self._armed = False  # the waiter has a deadline: the pool's timer checks it
        self._timeout = 0.0
        self._deadline = math.inf  # the head's deadline while it is awaited
        self._head_room = 0  # bytes the head may still take (pool.max_head_bytes)
        self._lines_room = 0  # header lines it may still take (pool.max_headers)
        self._mark = 0.0
        self._paused = False
        self._rx = False
        self._until_eof = False
        self._head = False
        self._info = False
        self.closed = False
        self.reusable = True
        self.reused = False
        self.idle_at = 0.0

    # -- request side -------------------------------------------------------------

    def start(self, resp: Response, data: bytes, rest: bytes | None, is_head: bool) -> None:
        """Send ``data`` (the head, with the body when small) and ``rest`` (a big body)."""
        self.resp = resp
        self._headers = resp.headers
        self._rx = False
        self._until_eof = False
        self._head = is_head
        if rest is None:
            self.transport.write(data)  # type: ignore[union-attr]
        else:
            self.transport.writelines((data, rest))  # type: ignore[union-attr]

    def abort(self) -> None:
        self.reusable = False
        if not self.closed and self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def check_due(self, now: float) -> float:
        """Fail the wait if its time is up; else return when it is due (inf: no deadline)."""
        w = self._waiter
        if not self._armed or w is None or w.done():
            return math.inf
        idle_end = self._mark + self._timeout
        due = min(idle_end, self._deadline)
        if due - now > 0.001:  # not yet (bytes arrived meanwhile)
            return due
        self._waiter = None
        self._armed = False
        if self._deadline < idle_end:
            w.set_exception(UpstreamTimeout("the upstream did not send its answer's head in time"))
        else:
            w.set_exception(UpstreamTimeout(f"no data from upstream for {self._timeout:g} s"))
        return math.inf

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._rx = True
        if self._armed:
            self._mark = self._loop.time()
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        self._pool._forget(self)
        resp = self.resp
        if resp is not None and not resp._done:
            if exc is None and self._until_eof and resp.status:
                resp._done = True  # body delimited by the end of the connection
            elif resp._exc is None:
                if self.reused and not self._rx:
                    err: UpstreamError = _Stale("reused connection closed before any response byte")
                else:
                    err = UpstreamError("upstream closed the connection before the response was complete")
                err.__cause__ = exc
                resp._exc = err
        self._wake()

    def _fail(self, exc: Exception) -> None:
        resp = self.resp
        if resp is not None and not resp._done and resp._exc is None:
            cause = exc.__cause__ or exc.__context__  # httptools wraps a callback's exception
            if isinstance(cause, _TooLarge):
                err = UpstreamError(str(cause))
            else:
                err = UpstreamError(f"malformed response from upstream: {exc!r}")
            err.__cause__ = exc
            resp._exc = err
        self.abort()
        self._wake()

    # -- httptools callbacks ------------------------------------------------------

    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp._done:
            raise _Unexpected("data from upstream with no request outstanding")
        self._head_room = self._pool.max_head_bytes
        self._lines_room = self._pool.max_headers

    def on_status(self, status: bytes) -> None:
        self._head_room -= len(status)
        if self._head_room < 0:
            raise _TooLarge(f"upstream status line over {self._pool.max_head_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp buffers nothing itself: without these checks, headers grow the dict unbounded
        self._lines_room -= 1
        self._head_room -= len(name) + len(value) + 4
        if self._head_room < 0:
            raise _TooLarge(f"upstream head over {self._pool.max_head_bytes} bytes")
        if self._lines_room < 0:
            raise _TooLarge(f"upstream head over {self._pool.max_headers} header lines")
        k = _NAMES.get(name)
        if k is None:
            k = name.decode("latin-1").lower()
            if len(_NAMES) < _MAX_NAMES:  # bounded: a hostile upstream's made-up names are not kept
                _NAMES[name] = k
        v = value.decode("utf-8", "surrogateescape")
        h = self._headers
        old = h.get(k)
        h[k] = v if old is None else f"{old}, {v}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # 1xx interim answer: forget it, wait for the real one
            self._info = True
            self._headers.clear()
            return
        resp = self.resp
        resp.status = status  # type: ignore[union-attr]
        if self._head:  # the parser cannot know there is no body: finish here, never reuse
            resp._done = True  # type: ignore[union-attr]
            self.reusable = False
        elif status not in _NO_BODY_STATUS:
            h = self._headers
            if "content-length" not in h and "chunked" not in h.get("transfer-encoding", "").lower():
                self._until_eof = True
                self.reusable = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if resp._done:  # type: ignore[union-attr]
            return  # HEAD answered with a body length: ignored, the connection is dropped
        resp._chunks.append(body)  # type: ignore[union-attr]
        resp._size += len(body)  # type: ignore[union-attr]
        if resp._all and resp._size > resp._limit:  # type: ignore[union-attr]
            # read() of a body over its limit: stop here, never buffer the rest
            raise _TooLarge(f"upstream body larger than {resp._limit} bytes")  # type: ignore[union-attr]
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        elif resp._size > HIGH_WATER and not self._paused and not resp._all:  # type: ignore[union-attr]
            self._paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._info:
            self._info = False
            return
        resp = self.resp
        if resp._done:  # type: ignore[union-attr]
            return
        resp._done = True  # type: ignore[union-attr]
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._wake()


class Response:
    """One upstream answer; see the module docstring. Release it (or read it whole)."""

    __slots__ = (
        "_all",
        "_chunks",
        "_conn",
        "_deadline",
        "_done",
        "_exc",
        "_limit",
        "_size",
        "_timeout",
        "headers",
        "status",
    )

    def __init__(self, conn: _Conn, read_timeout: float | None, deadline: float = math.inf) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Conn | None = conn
        self._chunks: list[bytes] = []
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._timeout = read_timeout
        self._deadline = deadline  # of the head; inf once it is in
        self._limit = conn._pool.max_body_bytes
        self._all = False

    def __repr__(self) -> str:
        return f"<Response {self.status} done={self._done}>"

    async def _wait(self) -> None:
        conn = self._conn
        if conn is None:
            raise UpstreamError("response already released")
        loop = conn._loop
        fut = loop.create_future()
        conn._waiter = fut
        if conn._paused:
            conn._paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        timeout = self._timeout
        deadline = self._deadline if not self.status else math.inf
        if timeout is not None or deadline != math.inf:
            conn._timeout = math.inf if timeout is None else timeout
            conn._deadline = deadline
            conn._mark = now = loop.time()
            conn._armed = True
            due = min(now + conn._timeout, deadline)
            pool = conn._pool
            if due < pool._sweep_at or pool._sweep_loop is not loop:
                pool._arm(due, loop)
        try:
            await fut
        except BaseException as exc:
            conn._waiter = None
            if self._exc is None:
                self._exc = exc if isinstance(exc, UpstreamError) else UpstreamError("request abandoned")
            conn.abort()
            raise
        finally:
            conn._armed = False

    async def _wait_headers(self) -> None:
        while not self.status:
            if self._exc is not None:
                raise self._exc
            await self._wait()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole (rest of the) body; then the connection goes back to the pool.

        A body longer than ``limit`` (default: the pool's ``max_body_bytes``) raises
        ``UpstreamError`` as soon as that much arrived (and the connection is closed)."""
        if limit is None:
            limit = self._limit
        else:
            self._limit = limit
        if not self._done:  # (usually the whole body came with the head: no wait at all)
            self._all = True
            try:
                while not self._done:
                    if self._exc is not None:
                        raise self._exc
                    if limit is not None and self._size > limit:
                        raise UpstreamError(f"upstream body larger than {limit} bytes")
                    await self._wait()
            except BaseException:
                self.release()
                raise
        chunks = self._chunks
        size = self._size  # == the length of chunks: on_body counts what it appends
        self._chunks = []
        self._size = 0
        self.release()
        if limit is not None and size > limit:
            raise UpstreamError(f"upstream body larger than {limit} bytes")
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def iter_chunks(self) -> Response:
        """``async for chunk in resp.iter_chunks()`` - same as ``async for chunk in resp``."""
        return self

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """Everything received since the last call (never empty), as soon as it arrives."""
        while not self._chunks:
            if self._done:
                self.release()
                raise StopAsyncIteration
            if self._exc is not None:
                raise self._exc
            await self._wait()
        chunks = self._chunks
        self._chunks = []
        self._size = 0
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)

    def release(self) -> None:
        """Done with this response: pool the connection if the body was received whole
        and keep-alive is allowed, else close it. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        if (
            self._done
            and conn.reusable
            and not conn.closed
            and conn.resp is self
            and not conn.transport.get_write_buffer_size()  # type: ignore[union-attr]
        ):  # (unsent request bytes left: the server answered early - do not reuse)
            conn.resp = None
            conn._pool._put(conn)
        else:
            conn.abort()

    @property
    def released(self) -> bool:
        return self._conn is None

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class UpstreamPool:
    """Keep-alive connections to the one origin of ``url`` (``http://`` or ``https://``)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = 10.0,
        max_head_bytes: int = 64 * 1024,
        max_headers: int = 100,
        max_body_bytes: int = 16 << 20,
        max_idle: int = 64,
        idle_timeout: float | None = 30.0,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url
        self._host = u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._ssl: _ssl.SSLContext | None = None
        if u.scheme == "https":
            self._ssl = ssl or _ssl.create_default_context()
        authority = u.netloc.rpartition("@")[2]
        self._host_line = f"Host: {authority}\r\n"
        self._path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self._connect_timeout = connect_timeout
        self.max_head_bytes = max_head_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._prefixes: dict[str, bytes] = {}
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._closed = False
        self._sweep: asyncio.TimerHandle | None = None  # the one deadline timer (see Timeouts)
        self._sweep_at = math.inf
        self._sweep_loop: asyncio.AbstractEventLoop | None = None  # (a pool may outlive a loop)

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.url} idle={len(self._idle)} open={len(self._conns)}>"

    # -- request ------------------------------------------------------------------

    def _prefix(self, method: str, path: str) -> bytes:
        if not method or not _TOKEN.issuperset(method):
            raise ValueError(f"bad HTTP method {method!r}")
        if not path or any(c in path for c in " \r\n\t\x00"):
            raise ValueError(f"bad request path {path!r}")
        return f"{method} {path} HTTP/1.1\r\n{self._host_line}".encode()

    def prepare(self, headers: list[tuple[str, str]] | dict[str, str] | Any) -> Headers:
        """Header lines serialised and checked once, for many requests (see ``Headers``).
        Raises ``ValueError`` as ``request()`` would (CR/LF, Host, Content-Length...)."""
        return Headers(self._blob(headers))

    @staticmethod
    def _blob(headers: list[tuple[str, str]] | dict[str, str] | Any) -> bytes:
        if not isinstance(headers, (list, tuple)):
            headers = headers.items()
        if not headers:
            return b""
        blob = "".join([f"{k}: {v}\r\n" for k, v in headers])
        n = len(headers)
        if blob.count("\n") != n or blob.count("\r") != n:
            raise ValueError("CR or LF in a request header")
        low = "\n" + blob.lower()
        if _RESERVED[0] in low or _RESERVED[1] in low or _RESERVED[2] in low:
            raise ValueError("Host, Content-Length and Transfer-Encoding are set by UpstreamPool")
        return blob.encode()

    def _serialize(
        self,
        method: str,
        headers: Headers | list[tuple[str, str]] | dict[str, str] | Any,
        body: bytes | None,
        path: str | None,
    ) -> tuple[bytes, bytes | None]:
        """The bytes to send: (head with the body when it is small, the big body or None)."""
        if path is None:
            prefix = self._prefixes.get(method)
            if prefix is None:
                prefix = self._prefixes[method] = self._prefix(method, self._path)
        else:
            prefix = self._prefix(method, path)
        blob = headers if type(headers) is Headers else self._blob(headers)
        if body is not None:
            n = len(body)
            if n > _BIG_BODY:
                return b"%s%sContent-Length: %d\r\n\r\n" % (prefix, blob, n), body
            return b"%s%sContent-Length: %d\r\n\r\n%s" % (prefix, blob, n, body), None
        if method in _EMPTY_BODY_METHODS:
            return b"%s%sContent-Length: 0\r\n\r\n" % (prefix, blob), None
        return b"%s%s\r\n" % (prefix, blob), None

    async def request(
        self,
        method: str,
        headers: Headers | list[tuple[str, str]] | dict[str, str],
        body: bytes | None = None,
        *,
        read_timeout: float | None = 60.0,
        head_timeout: float | None = None,
        path: str | None = None,
    ) -> Response:
        """Send one request; return once the status line and headers are in.

        ``path`` (with any query) overrides the URL's. ``head_timeout`` (default:
        ``read_timeout``) is the deadline for the whole head. Raises ``UpstreamError`` /
        ``UpstreamTimeout``; see the module docstring for the one retry."""
        data, rest = self._serialize(method, headers, body, path)
        is_head = method == "HEAD"
        conn = self._pop_idle()
        if conn is None:
            conn = await self._connect()
        if head_timeout is None:
            head_timeout = read_timeout
        deadline = math.inf if head_timeout is None else conn._loop.time() + head_timeout
        resp = Response(conn, read_timeout, deadline)
        conn.start(resp, data, rest, is_head)
        try:
            while not resp.status:
                if resp._exc is not None:
                    raise resp._exc
                await resp._wait()
        except _Stale:
            resp.release()
            conn = await self._connect()
            resp = Response(conn, read_timeout, deadline)
            conn.start(resp, data, rest, is_head)
            try:
                await resp._wait_headers()
            except BaseException:
                resp.release()
                raise
        except BaseException:
            resp.release()
            raise
        return resp

    # -- deadlines ----------------------------------------------------------------

    def _arm(self, due: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweep is not None and self._sweep_loop is loop:
            self._sweep.cancel()
        self._sweep_at = due
        self._sweep_loop = loop
        self._sweep = loop.call_at(due, self._on_sweep, loop)

    def _on_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweep = None
        self._sweep_at = math.inf
        now = loop.time()
        nxt = math.inf
        for conn in list(self._conns):
            due = conn.check_due(now)
            if due < nxt:
                nxt = due
        if nxt != math.inf:
            self._arm(nxt, loop)

    # -- connections --------------------------------------------------------------

    def _pop_idle(self) -> _Conn | None:
        idle = self._idle
        if not idle:
            return None
        limit = self._idle_timeout
        now = idle[-1]._loop.time() if limit is not None else 0.0
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport.is_closing():  # type: ignore[union-attr]
                continue
            if limit is not None and now - conn.idle_at > limit:
                conn.abort()
                continue
            conn.reused = True
            return conn
        return None

    def _put(self, conn: _Conn) -> None:
        if self._closed or len(self._idle) >= self._max_idle:
            conn.abort()
            return
        if conn._paused:  # body completed while paused: read again so a close is noticed
            conn._paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        if self._idle_timeout is not None:
            conn.idle_at = conn._loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    async def _connect(self) -> _Conn:
        if self._closed:
            raise UpstreamUnreachable("UpstreamPool is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                )
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"connect to {self._host}:{self._port} timed out after {self._connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {self._host}:{self._port}: {exc}") from exc
        if self._closed or conn.closed:
            conn.abort()
            raise UpstreamUnreachable(
                "UpstreamPool is closed" if self._closed else "connection closed at once"
            )
        self._conns.add(conn)
        return conn

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        """Close every connection, idle or busy (busy requests fail with UpstreamError)."""
        self._closed = True
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
            self._sweep_at = math.inf
        for conn in list(self._conns):
            conn.abort()
        await asyncio.sleep(0)
