"""stdio upstreams: MCP servers the gateway spawns and supervises.

One child process per (server, grant), so a stateful server (whatsapp-mcp-server keeps
one global WhatsApp session per process) never leaks state between grants. Messages
are newline-delimited JSON-RPC over the child's stdin/stdout; its stderr goes to the
gateway's log.

Several gateway sessions of one grant share that grant's child, so the gateway gives
every forwarded request a process-unique id (and progress token) and maps the answer
back to the client's own id. The child is initialized once; later sessions of the
grant get the child's cached initialize result (when they ask for the same protocol
version). A child that dies is restarted with exponential backoff and the initialize
handshake replayed; the calls in flight get a JSON-RPC error naming the upstream.
A hung child is treated the same way, killed and restarted: one that stops reading its
stdin (the bytes waiting to be written to it pass `max_stdin_bytes`), or that lets
`max_consecutive_timeouts` calls in a row time out.

Nothing a client sent is written to a child as the client's bytes: every line is
serialised by the gateway (`jsonrpc.line`) from the message it parsed and decided on,
so a body with raw newlines between its tokens cannot become two messages. A client's
response is forwarded only when it answers a request this child sent to that session.

Queues toward clients (one per streamed call, one per GET stream) are bounded in
messages and bytes; a client that does not read its stream is disconnected (its call
recorded as cancelled), so it never grows the gateway nor stalls the child's reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from gateway.mcp import jsonrpc
from gateway.observability import propagate
from gateway.upstreams.base import Event, Inbound, Refused, Upstream, UpstreamFailed, UpstreamReply

if TYPE_CHECKING:
    from gateway.mcp.sessions import Session

log = logging.getLogger("ledgergate.upstream.stdio")

MAX_LINE = 64 << 20
_FINAL = "final"  # the child's response to a forwarded request
_MESSAGE = "message"  # a notification or request of the child during a call
_FAILED = "failed"  # the child died: the payload is an UpstreamFailed
STREAM_QUEUE_BYTES = 4 << 20  # per client stream: queued bytes before the client is disconnected
STREAM_QUEUE_MESSAGES = 2048  # ... and queued messages
MAX_SERVER_REQUESTS = 1024  # server-to-client requests awaiting a client's answer, per child
MAX_CONSECUTIVE_TIMEOUTS = 3  # calls in a row a child may let time out before it is restarted
MAX_STDIN_BYTES = 8 << 20  # bytes waiting to be written to a child: beyond, it stopped reading

T = TypeVar("T")


class UpstreamDown(Exception):
    pass


class MessageQueue(Generic[T]):
    """A FIFO toward one client stream, bounded in messages and bytes.

    `put` never blocks (the child's stdout reader serves every session of the grant): over
    a bound it drops the message, marks the queue `overflowed` and calls `on_overflow` once,
    which disconnects the client. The first message always fits (one message is bounded by
    MAX_LINE), and `force` admits a call's final answer or the end of a stream.
    """

    __slots__ = ("_items", "_waiter", "max_bytes", "max_items", "nbytes", "on_overflow", "overflowed")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._items: deque[tuple[T, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.overflowed = False
        self.on_overflow: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T, size: int, force: bool = False) -> bool:
        items = self._items
        if not force and items and (len(items) >= self.max_items or self.nbytes + size > self.max_bytes):
            if not self.overflowed:
                self.overflowed = True
                if self.on_overflow is not None:
                    self.on_overflow()
            return False
        items.append((item, size))
        self.nbytes += size
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        return True

    async def get(self) -> T:
        while not self._items:
            w = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await w
            finally:
                if self._waiter is w:
                    self._waiter = None
        item, size = self._items.popleft()
        self.nbytes -= size
        return item


@dataclass(eq=False)
class Pending:
    orig_id: Any
    session: Session | None
    queue: MessageQueue[tuple[str, Any]]  # (_FINAL | _MESSAGE, message) or (_FAILED, UpstreamFailed)
    token: Any = None
    requested_version: Any = None  # for an initialize: the protocolVersion the client asked for


@dataclass(slots=True, eq=False)
class SessionState:
    """What the stdio transport keeps per gateway session."""

    # the agent's request id (JSON text) -> the child's id, for notifications/cancelled
    inflight: dict[str | None, int] = field(default_factory=dict)
    # this session's initialize went to the child: its notifications/initialized goes too
    forward_initialized: bool = False
    get_queue: MessageQueue[dict[str, Any] | None] | None = None  # the open GET stream's queue


class StdioProcess:
    """One supervised child for one (server, grant)."""

    def __init__(self, up: StdioUpstream, grant: str) -> None:
        self.up = up
        self.grant = grant
        self.proc: asyncio.subprocess.Process | None = None
        self.pending: dict[int, Pending] = {}
        self.sessions: set[Session] = set()
        # server-to-client requests (sampling, elicitation, roots, ping) awaiting an answer:
        # the child's id (as JSON text) -> the sessions it was delivered to
        self.server_requests: OrderedDict[str, set[Session]] = OrderedDict()
        self._next_id = 0
        self._init_msg: dict[str, Any] | None = None
        self._init_results: dict[Any, dict[str, Any]] = {}  # requested protocolVersion -> result
        self._initialized_sent = False
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self._started_at = 0.0
        self.spawns = 0  # children started (the first start is not a restart): /metrics
        self.closing = False
        self.timeouts = 0  # calls in a row that timed out (reset by any answer of the child)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def label(self) -> str:
        return f"upstream {self.up.name!r} (stdio, grant {self.grant!r})"

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def ensure(self) -> None:
        if self.alive:
            return
        async with self._lock:
            if self.alive:
                return
            if self.closing:
                raise UpstreamDown(f"{self.label} is shutting down")
            if self._failures:
                delay = min(0.1 * 2 ** (self._failures - 1), 10.0)
                log.warning("%s: restarting in %.1f s (failure %d)", self.label, delay, self._failures)
                await asyncio.sleep(delay)
            await self._spawn()
            if self._init_msg is not None:
                await self._replay_handshake()

    async def _spawn(self) -> None:
        env = {**os.environ, **self.up.env}
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.up.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.up.cwd,
                limit=MAX_LINE,
                start_new_session=True,
            )
        except OSError as exc:
            self._failures += 1
            raise UpstreamDown(f"{self.label} could not start {self.up.argv[0]!r}: {exc.strerror}") from None
        self._started_at = time.monotonic()
        self.spawns += 1
        log.info("%s: started pid %d", self.label, self.proc.pid)
        self._tasks = [
            asyncio.create_task(self._read_stdout(self.proc)),
            asyncio.create_task(self._read_stderr(self.proc)),
        ]

    async def _replay_handshake(self) -> None:
        assert self._init_msg is not None
        uid = self._new_id()
        p = Pending(orig_id=None, session=None, queue=self.up.new_queue())
        self.pending[uid] = p
        self._write({**self._init_msg, "id": uid})
        try:
            kind, msg = await asyncio.wait_for(p.queue.get(), self.up.timeout_s)
        except TimeoutError:
            self.pending.pop(uid, None)
            # left alive it would look initialized to the next call: kill it, the next call retries
            self.replace("it did not answer the replayed initialize")
            raise UpstreamDown(f"{self.label} restarted but did not answer initialize") from None
        if kind == _FAILED:
            raise UpstreamDown(f"{self.label} restarted but died during initialize: {msg.message}")
        if "error" in msg:
            self.replace("it refused the replayed initialize")
            raise UpstreamDown(f"{self.label} restarted but refused initialize: {msg['error']}")
        if self._initialized_sent:
            self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})
        log.info("%s: handshake replayed after restart", self.label)

    def _write(self, msg: dict[str, Any]) -> None:
        """Write one message the gateway built; a dict only, never bytes a client sent."""
        if not self.alive or self.proc is None or self.proc.stdin is None:
            raise UpstreamDown(f"{self.label} is not running")
        stdin = self.proc.stdin
        stdin.write(jsonrpc.line(msg))  # never blocks: what the pipe does not take is buffered
        unwritten = stdin.transport.get_write_buffer_size()
        if unwritten > self.up.max_stdin_bytes:
            # the child stopped reading: the buffer would only grow, and every call would wait
            # out its timeout; the message that overflowed is counted as not delivered
            self.replace(
                f"it stopped reading its stdin ({unwritten} bytes waiting, limit {self.up.max_stdin_bytes})"
            )
            raise UpstreamDown(f"{self.label} stopped reading its stdin; it is being restarted")

    def timed_out(self) -> None:
        """A call of this child got no message within the timeout: N in a row mean it is hung."""
        self.timeouts += 1
        if self.timeouts >= self.up.max_consecutive_timeouts and self.alive:
            self.replace(f"{self.timeouts} calls in a row got no answer within {self.up.timeout_s:g} s")

    def replace(self, why: str) -> None:
        """Kill a hung child now; the next call starts a fresh one and replays the handshake.

        The calls in flight on it fail at once with an error naming the upstream (not after
        their own timeouts), and nothing more is written to it.
        """
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        log.error(
            "%s: pid %d is hung (%s): killing it; the next call starts a new one", self.label, proc.pid, why
        )
        self.proc = None  # its reader's _died() is now a no-op: the calls are failed here
        self.timeouts = 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        failed = UpstreamFailed(
            jsonrpc.UPSTREAM_UNAVAILABLE,
            f"{self.label} was killed and is being restarted: {why}",
            {"upstream": self.up.name, "restarted": True},
        )
        for p in self.pending.values():
            p.queue.put((_FAILED, failed), 0, force=True)
        self.pending.clear()
        self.server_requests.clear()  # the new child never sent them

    async def call(self, msg: dict[str, Any], session: Session) -> tuple[int, Pending]:
        await self.ensure()
        uid = self._new_id()
        p = Pending(orig_id=msg.get("id"), session=session, queue=self.up.new_queue())
        out = {**jsonrpc.members(msg), "id": uid}
        params = msg.get("params")
        if isinstance(params, dict):
            meta = params.get("_meta")
            if isinstance(meta, dict) and "progressToken" in meta:
                p.token = meta["progressToken"]
                out["params"] = {**params, "_meta": {**meta, "progressToken": uid}}
        state = self.up.state(session)
        if msg.get("method") == "initialize":
            if self._init_msg is None:
                self._init_msg = {k: v for k, v in out.items() if k != "id"}
            p.requested_version = (params or {}).get("protocolVersion")
            state.forward_initialized = True
        self.pending[uid] = p
        key = jsonrpc.id_text(p.orig_id)
        state.inflight[key] = uid
        try:
            self._write(out)
        except UpstreamDown:
            self.pending.pop(uid, None)
            state.inflight.pop(key, None)
            raise
        return uid, p

    def cancel(self, uid: int, reason: str) -> None:
        """Tell the child to stop working on request `uid` (best effort: it may be gone)."""
        with contextlib.suppress(UpstreamDown):
            self._write(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": uid, "reason": reason},
                }
            )

    def notify(self, msg: dict[str, Any], session: Session) -> None:
        """A client notification or response: checked, then re-serialised for the child.

        Raises Refused for a response that answers no request this child sent to `session`.
        """
        method = msg.get("method")
        if method is None:
            self._answer_server(msg, session)
            return
        out = jsonrpc.members(msg)
        out.pop("id", None)  # a notification, by construction (the proxy classified it)
        state = self.up.state(session)
        if method == "notifications/initialized":
            if not state.forward_initialized:
                return  # this session got the child's cached initialize result: the child is initialized
            state.forward_initialized = False
            self._initialized_sent = True
        elif method == "notifications/cancelled":
            params = msg.get("params") or {}
            # only this session's own calls in flight can be cancelled, by their gateway-side id
            uid = state.inflight.get(jsonrpc.id_text(params.get("requestId")))
            if uid is None or uid not in self.pending:
                return
            out["params"] = {**params, "requestId": uid}
        self._write(out)

    def _answer_server(self, msg: dict[str, Any], session: Session) -> None:
        if ("result" in msg) == ("error" in msg):
            raise Refused(400, "Bad Request: a response carries exactly one of result and error")
        key = jsonrpc.id_text(msg.get("id"))
        sessions = self.server_requests.get(key) if key is not None else None
        if sessions is None or session not in sessions:
            raise Refused(
                400,
                f"Bad Request: no request with id {key} is awaiting an answer from this session; "
                "the response was not forwarded",
            )
        del self.server_requests[key]  # one answer per request, from one of its sessions
        self._write(jsonrpc.members(msg))

    def _server_request(self, msg: dict[str, Any], session: Session) -> None:
        """Remember that the child's request `msg` was delivered to `session` (it may answer it)."""
        key = jsonrpc.id_text(msg.get("id"))
        if key is None:
            return
        reqs = self.server_requests
        targets = reqs.get(key)
        if targets is None:
            targets = reqs[key] = set()
            while len(reqs) > MAX_SERVER_REQUESTS:
                reqs.popitem(last=False)
        targets.add(session)

    def forget_session(self, session: Session) -> None:
        self.sessions.discard(session)
        for key, targets in list(self.server_requests.items()):
            targets.discard(session)
            if not targets:
                del self.server_requests[key]

    def cached_initialize(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        if not self.alive or not self._initialized_sent:
            return None
        result = self._init_results.get((msg.get("params") or {}).get("protocolVersion"))
        if result is None:
            return None
        return {"jsonrpc": "2.0", "id": msg.get("id"), "result": result}

    def done(self, uid: int, session: Session) -> None:
        self.pending.pop(uid, None)
        inflight = self.up.state(session).inflight
        for k, v in list(inflight.items()):
            if v == uid:
                del inflight[k]

    async def _read_stdout(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        try:
            while True:
                try:
                    line = await proc.stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    log.error("%s: a message over %d bytes; dropping it", self.label, MAX_LINE)
                    continue
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                try:
                    msg = orjson.loads(line)
                except orjson.JSONDecodeError:
                    log.warning("%s: stdout line is not JSON: %.200r", self.label, line)
                    continue
                if isinstance(msg, dict):
                    self._route(msg, len(line))
        finally:
            rc = await proc.wait()
            self._died(proc, rc)

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            try:
                line = await proc.stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue
            if not line:
                return
            log.info("%s stderr: %s", self.label, line.decode(errors="replace").rstrip())

    def _route(self, msg: dict[str, Any], size: int) -> None:
        """Deliver one message of the child. Never awaits: this reader serves every session."""
        method = msg.get("method")
        if method is None:
            p = self.pending.get(msg.get("id"))  # type: ignore[arg-type]
            if p is None:
                log.warning("%s: answer to an unknown request id %r", self.label, msg.get("id"))
                return
            result = msg.get("result")
            if p.requested_version is not None and isinstance(result, dict) and "protocolVersion" in result:
                self._init_results[p.requested_version] = result
            self.pending.pop(msg["id"], None)
            self.timeouts = 0
            p.queue.put((_FINAL, {**msg, "id": p.orig_id}), size, force=True)
            return
        if method == "notifications/progress":
            params = msg.get("params") or {}
            p = self.pending.get(params.get("progressToken"))
            if p is not None:
                p.queue.put((_MESSAGE, {**msg, "params": {**params, "progressToken": p.token}}), size)
                return
        is_request = "id" in msg
        # other server-to-client traffic: the most recent call's stream, else the GET streams
        for p in reversed(self.pending.values()):
            if p.session is not None:
                if p.queue.put((_MESSAGE, msg), size):
                    if is_request:
                        self._server_request(msg, p.session)
                    return
                break  # that client is being disconnected: a request goes back unanswered below
        delivered = False
        for s in list(self.sessions):
            q = self.up.state(s).get_queue
            if q is not None and q.put(msg, size):
                delivered = True
                if is_request:
                    self._server_request(msg, s)
        if not delivered and is_request:
            with contextlib.suppress(UpstreamDown):
                self._write(
                    jsonrpc.error(
                        msg["id"], jsonrpc.INTERNAL_ERROR, "no client stream is open to carry this request"
                    )
                )

    def _died(self, proc: asyncio.subprocess.Process, rc: int) -> None:
        if proc is not self.proc:
            return
        lived = time.monotonic() - self._started_at
        self._failures = 1 if lived > 30 else self._failures + 1
        if not self.closing:
            log.error("%s: exited with code %s after %.1f s", self.label, rc, lived)
        text = f"{self.label} exited with code {rc} while handling this request"
        failed = UpstreamFailed(
            jsonrpc.UPSTREAM_UNAVAILABLE, text, {"upstream": self.up.name, "exit_code": rc}
        )
        for p in self.pending.values():
            p.queue.put((_FAILED, failed), 0, force=True)
        self.pending.clear()
        self.server_requests.clear()  # the new child never sent them

    async def stop(self) -> None:
        self.closing = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            if proc.stdin is not None:
                proc.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                await asyncio.wait_for(proc.wait(), 2.0)
                break
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
        with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 2.0)
        for t in self._tasks:
            t.cancel()


class StdioUpstream(Upstream):
    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        cwd: str | None,
        timeout_s: float,
        queue_bytes: int = STREAM_QUEUE_BYTES,
        queue_messages: int = STREAM_QUEUE_MESSAGES,
        max_consecutive_timeouts: int = MAX_CONSECUTIVE_TIMEOUTS,
        max_stdin_bytes: int = MAX_STDIN_BYTES,
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.timeout_s = timeout_s
        self.queue_bytes = queue_bytes
        self.queue_messages = queue_messages
        self.max_consecutive_timeouts = max_consecutive_timeouts
        self.max_stdin_bytes = max_stdin_bytes
        self.processes: dict[str, StdioProcess] = {}
        # per gateway session; weak: a session whose initialize failed is never closed
        self._states: weakref.WeakKeyDictionary[Session, SessionState] = weakref.WeakKeyDictionary()

    def new_queue(self) -> MessageQueue[Any]:
        return MessageQueue(self.queue_messages, self.queue_bytes)

    def process(self, grant: str) -> StdioProcess:
        p = self.processes.get(grant)
        if p is None:
            p = self.processes[grant] = StdioProcess(self, grant)
        return p

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in self.processes.values()), return_exceptions=True)

    def state(self, session: Session) -> SessionState:
        st = self._states.get(session)
        if st is None:
            st = self._states[session] = SessionState()
        return st

    async def request(self, inbound: Inbound, session: Session, initialize: bool) -> UpstreamReply:
        proc = self.process(session.grant.name)
        msg = inbound.message
        assert msg is not None
        if inbound.traceparent is not None:  # stdio has no headers: params._meta (the MCP spec allows it)
            msg = propagate.in_meta(msg, inbound.traceparent)
        if initialize:
            cached = proc.cached_initialize(msg)
            if cached is not None:  # the child is initialized: nothing is sent (sent=False)
                proc.sessions.add(session)
                return UpstreamReply(200, {}, message=cached, sent=False)
        try:
            uid, p = await proc.call(msg, session)
        except UpstreamDown as exc:
            raise UpstreamFailed(
                jsonrpc.UPSTREAM_UNAVAILABLE, str(exc), {"upstream": self.name}, sent=False
            ) from None
        streaming = False
        try:
            kind, first = await self._next(proc, p, uid)
            if kind != _FINAL and not inbound.accepts_sse:
                while kind != _FINAL:  # a JSON-only client: intermediate messages cannot be delivered
                    kind, first = await self._next(proc, p, uid)
            if kind == _FINAL:
                if initialize and "result" in first:
                    proc.sessions.add(session)
                return UpstreamReply(200, {}, message=first)
            if initialize:
                proc.sessions.add(session)
            reply = UpstreamReply(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            reply.events = self._stream(proc, p, uid, first)
            reply.release = lambda: proc.done(uid, session)
            p.queue.on_overflow = lambda: self._overflow(proc, p, uid, inbound, reply)
            streaming = True
            return reply
        finally:
            if not streaming:
                proc.done(uid, session)

    async def _next(self, proc: StdioProcess, p: Pending, uid: int) -> tuple[str, dict[str, Any]]:
        """The next message of call `uid`; raises UpstreamFailed when the child dies or is late."""
        try:
            kind, msg = await asyncio.wait_for(p.queue.get(), self.timeout_s)
        except TimeoutError:
            proc.cancel(uid, "gateway timeout")
            proc.timed_out()
            text = f"{proc.label} did not answer within {self.timeout_s:g} s"
            raise UpstreamFailed(jsonrpc.UPSTREAM_TIMEOUT, text, {"upstream": self.name}) from None
        if kind == _FAILED:  # one instance for every call of the dead child: raise a copy
            raise UpstreamFailed(msg.code, msg.message, msg.data)
        return kind, msg

    async def _stream(
        self, proc: StdioProcess, p: Pending, uid: int, first: dict[str, Any]
    ) -> AsyncGenerator[Event, None]:
        kind, msg = _MESSAGE, first
        while True:
            if p.queue.overflowed:
                raise ConnectionResetError("disconnected: the client did not read its stream")
            yield Event(msg, final=kind == _FINAL)
            if kind == _FINAL:
                return
            kind, msg = await self._next(proc, p, uid)

    def _overflow(
        self, proc: StdioProcess, p: Pending, uid: int, inbound: Inbound, reply: UpstreamReply
    ) -> None:
        # called by the child's reader: never wait for this client, disconnect it
        q = p.queue
        log.warning(
            "%s: the client of request %s does not read its stream (%d messages, %d bytes queued, "
            "limit %d/%d): disconnecting it and cancelling the call",
            proc.label,
            uid,
            len(q),
            q.nbytes,
            q.max_items,
            q.max_bytes,
        )
        reply.dropped = (
            f"the client did not read its stream: over {q.max_bytes} bytes or "
            f"{q.max_items} messages queued, disconnected"
        )
        proc.cancel(uid, "the client does not read its stream")
        inbound.abort()

    async def send(self, inbound: Inbound, session: Session) -> UpstreamReply:
        proc = self.process(session.grant.name)
        assert inbound.message is not None
        try:
            await proc.ensure()
            proc.notify(inbound.message, session)
        except UpstreamDown as exc:
            raise UpstreamFailed(jsonrpc.UPSTREAM_UNAVAILABLE, str(exc), {"upstream": self.name}) from None
        return UpstreamReply(202, {})

    async def open_stream(self, inbound: Inbound, session: Session) -> UpstreamReply:
        state = self.state(session)
        if state.get_queue is not None:
            raise Refused(409, "Conflict: only one GET stream is allowed per session")
        q: MessageQueue[dict[str, Any] | None] = self.new_queue()
        proc = self.process(session.grant.name)
        reply = UpstreamReply(200, {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

        def overflow() -> None:
            log.warning(
                "%s: session %s does not read its GET stream (%d messages, %d bytes queued, "
                "limit %d/%d): disconnecting it",
                proc.label,
                session.id[:8],
                len(q),
                q.nbytes,
                q.max_items,
                q.max_bytes,
            )
            reply.dropped = "the client did not read its GET stream"
            stop()  # no more deliveries to this stream
            inbound.abort()

        def stop() -> None:
            if state.get_queue is q:
                state.get_queue = None

        async def events() -> AsyncGenerator[Event, None]:
            while (msg := await q.get()) is not None:
                if q.overflowed:
                    raise ConnectionResetError("disconnected: the client did not read its GET stream")
                yield Event(msg)

        q.on_overflow = overflow
        state.get_queue = q
        proc.sessions.add(session)
        reply.events = events()
        reply.release = stop
        return reply

    async def delete(self, inbound: Inbound, session: Session) -> UpstreamReply:
        return UpstreamReply(200, {})

    def close_session(self, session: Session, reason: str) -> None:
        state = self._states.pop(session, None)
        if state is not None and state.get_queue is not None:
            state.get_queue.put(None, 0, force=True)
        proc = self.processes.get(session.grant.name)
        if proc is not None:
            proc.forget_session(session)
