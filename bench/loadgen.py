"""MCP load generator: N connections, one MCP session each, tools/call in a loop.

    python bench/loadgen.py --url http://127.0.0.1:8080/mcp/bench --auth KEY -c 8 -d 5
    python bench/loadgen.py ... --wrk          # the same load driven by wrk (C + Lua)
    python bench/loadgen.py ... --watch PID    # CPU of PID's process tree over the window

Each connection does the handshake once (initialize, then notifications/initialized,
keeping the Mcp-Session-Id; MCP-Protocol-Version 2025-11-25; Authorization bearer
when given), then sends tools/call back to back for --warmup + --duration seconds;
calls started during the warm-up are not counted. Answers may be JSON or SSE (the
JSON-RPC response is looked up by id in the stream); a non-2xx status, a missing
response or a JSON-RPC error counts as an error, a result with isError true as a
tool error.

The client is a raw asyncio Protocol speaking HTTP/1.1 with keep-alive (uvloop when
installed): about half the CPU per call of an aiohttp ClientSession here. It still
costs tens of microseconds of CPU per call, which on 2 cores bounds what a fast
server can show; `--wrk` drives Debian's `wrk` instead (one thread, one connection per
session, sessions pre-initialised here and taken round robin by a Lua script).

Prints one JSON object (calls/s, p50/p99 ms, errors, client CPU per call, and for each
--watch PID the CPU of its process tree over the window and until it settles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procstat import TreeCpu

PROTOCOL_VERSION = "2025-11-25"


class HttpError(Exception):
    pass


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self._head: tuple[int, dict[bytes, bytes], int] | None = None  # status, headers, body start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self._head is not None and not self._has_length():
                status, headers, start = self._head
                w.set_result(Response(status, headers, self.buf[start:]))  # body delimited by close
            else:
                w.set_exception(HttpError(f"connection closed: {exc}"))

    def _has_length(self) -> bool:
        assert self._head is not None
        h = self._head[1]
        return b"content-length" in h or h.get(b"transfer-encoding", b"").lower() == b"chunked"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        buf = self.buf
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = buf[:end].split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            self._head = (status, headers, end + 4)
        status, headers, start = self._head
        cl = headers.get(b"content-length")
        if cl is not None:
            n = int(cl)
            if len(buf) - start < n:
                return
            body, rest = buf[start : start + n], buf[start + n :]
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body, used = dechunk(buf, start)
            if body is None:
                return
            rest = buf[used:]
        elif status in (204, 304) or status < 200:
            body, rest = b"", buf[start:]
        else:
            return  # delimited by close
        self.buf = rest
        self._head = None
        self.waiter.set_result(Response(status, headers, body))

    async def request(self, data: bytes) -> Response:
        assert self.transport is not None
        if self.closed:
            raise HttpError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await self.waiter
        finally:
            self.waiter = None


def dechunk(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    parts = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size = int(buf[pos:eol].split(b";")[0], 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailers, then an empty line
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    return None, 0
                if end == pos:
                    return b"".join(parts), end + 2
                pos = end + 2
        if len(buf) < pos + size + 2:
            return None, 0
        parts.append(buf[pos : pos + size])
        pos += size + 2


def find_response(resp: Response, rid: int) -> dict | None:
    """The JSON-RPC response with id `rid` in a JSON or SSE answer."""
    ctype = resp.headers.get(b"content-type", b"")
    if ctype.startswith(b"text/event-stream"):
        for line in resp.body.split(b"\n"):
            if line.startswith(b"data:"):
                try:
                    msg = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                if isinstance(msg, dict) and msg.get("id") == rid and ("result" in msg or "error" in msg):
                    return msg
        return None
    try:
        msg = orjson.loads(resp.body)
    except orjson.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) else None


class Client:
    """An MCP session over one connection."""

    def __init__(self, url: str, auth: str | None, tool: str, arguments: dict) -> None:
        u = urlsplit(url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        self.path = (u.path or "/").encode()
        self.base_headers = b"Host: %s:%d\r\n" % (self.host.encode(), self.port)
        self.base_headers += (
            b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
        )
        if auth:
            self.base_headers += b"Authorization: Bearer " + auth.encode() + b"\r\n"
        self.session_headers = b""
        self.tool = tool
        self.arguments = orjson.dumps(arguments)
        self.conn: Conn | None = None
        self.next_id = 0
        self.session_id: str | None = None

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.conn = await loop.create_connection(Conn, self.host, self.port)

    def close(self) -> None:
        if self.conn is not None and self.conn.transport is not None:
            self.conn.transport.close()

    def _post(self, body: bytes) -> bytes:
        return (
            b"POST "
            + self.path
            + b" HTTP/1.1\r\n"
            + self.base_headers
            + self.session_headers
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )

    async def handshake(self) -> None:
        await self.connect()
        assert self.conn is not None
        self.next_id += 1
        init = {
            "jsonrpc": "2.0",
            "id": self.next_id,
            "method": "initialize",
            "params": {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "ledgergate-bench", "version": "1.0"},
            },
        }
        r = await self.conn.request(self._post(orjson.dumps(init)))
        msg = find_response(r, self.next_id)
        if r.status != 200 or msg is None or "result" not in msg:
            raise HttpError(f"initialize failed: HTTP {r.status}: {r.body[:300]!r}")
        sid = r.headers.get(b"mcp-session-id")
        self.session_id = sid.decode() if sid else None
        self.session_headers = b"MCP-Protocol-Version: " + PROTOCOL_VERSION.encode() + b"\r\n"
        if sid:
            self.session_headers += b"Mcp-Session-Id: " + sid + b"\r\n"
        note = b'{"jsonrpc":"2.0","method":"notifications/initialized"}'
        r = await self.conn.request(self._post(note))
        if r.status not in (200, 202, 204):
            raise HttpError(f"notifications/initialized failed: HTTP {r.status}: {r.body[:300]!r}")

    def call_bytes(self) -> tuple[int, bytes]:
        self.next_id += 1
        body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"%s","arguments":%s}}' % (
            self.next_id,
            self.tool.encode(),
            self.arguments,
        )
        return self.next_id, self._post(body)

    async def call(self) -> int:
        """One tools/call: 0 ok, 1 tool error (isError), 2 error."""
        assert self.conn is not None
        rid, data = self.call_bytes()
        r = await self.conn.request(data)
        if r.status != 200:
            return 2
        msg = find_response(r, rid)
        if msg is None or "result" not in msg:
            return 2
        res = msg["result"]
        return 1 if isinstance(res, dict) and res.get("isError") else 0


def cpu_self_us() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (ru.ru_utime + ru.ru_stime) * 1e6


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[i]


def watched_delta(
    trackers: list[TreeCpu], before: list[dict], after: list[dict], settled: list[dict], calls: int
) -> dict:
    out = {}
    for t, b, a, s in zip(trackers, before, after, settled, strict=True):
        win = TreeCpu.delta(b, a)
        st = TreeCpu.delta(b, s)
        out[str(t.root)] = {
            "tree_us": win["tree_us"],
            "main_thread_us": win["main_thread_us"],
            "settled_tree_us": st["tree_us"],
            "tree_us_per_call": win["tree_us"] / calls if calls else None,
            "main_thread_us_per_call": win["main_thread_us"] / calls if calls else None,
            "settled_us_per_call": st["tree_us"] / calls if calls else None,
        }
    return out


async def run_python(a: argparse.Namespace) -> dict:
    clients = [Client(a.url, a.auth, a.tool, a.arguments) for _ in range(a.concurrency)]
    await asyncio.gather(*(c.handshake() for c in clients))
    trackers = [TreeCpu(p) for p in a.watch]
    loop = asyncio.get_running_loop()
    t_start = loop.time() + a.warmup
    t_end = t_start + a.duration
    lat: list[float] = []
    counts = [0, 0, 0]
    perf = time.perf_counter

    async def worker(c: Client) -> None:
        call = c.call
        ltime = loop.time
        while True:
            now = ltime()
            if now >= t_end:
                return
            t0 = perf()
            try:
                rc = await asyncio.wait_for(call(), a.timeout) if a.timeout_each else await call()
            except (TimeoutError, HttpError, OSError):
                rc = 2
                c.close()
                try:
                    await c.handshake()
                except (HttpError, OSError):
                    await asyncio.sleep(0.1)
            if now >= t_start:
                lat.append(perf() - t0)
                counts[rc] += 1

    tasks = [asyncio.ensure_future(worker(c)) for c in clients]
    await asyncio.sleep(max(0.0, t_start - loop.time()))
    before = [t.sample() for t in trackers]
    cpu0, w0 = cpu_self_us(), perf()
    await asyncio.sleep(max(0.0, t_end - loop.time()))
    after = [t.sample() for t in trackers]
    cpu1, w1 = cpu_self_us(), perf()
    _, stuck = await asyncio.wait(tasks, timeout=a.timeout)
    for t in stuck:  # a call that never answered: counted as an error
        t.cancel()
        counts[2] += 1
    for c in clients:
        c.close()
    settled = [t.settle() for t in trackers] if a.settle else after
    n = len(lat)
    lat.sort()
    elapsed = w1 - w0
    return {
        "driver": "python",
        "url": a.url,
        "concurrency": a.concurrency,
        "duration_s": elapsed,
        "calls": n,
        "calls_per_s": n / elapsed if elapsed else 0.0,
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "mean_ms": (sum(lat) / n * 1e3) if n else float("nan"),
        "ok": counts[0],
        "tool_errors": counts[1],
        "errors": counts[2],
        "client_cpu_us_per_call": (cpu1 - cpu0) / n if n else None,
        "watched": watched_delta(trackers, before, after, settled, n),
    }


WRK_LUA = """
local sessions = {%(sessions)s}
local n = #sessions
local i = 0
local rid = 1000000
local path = "%(path)s"
local base = {["Content-Type"] = "application/json", ["Accept"] = "application/json, text/event-stream",
              ["MCP-Protocol-Version"] = "%(version)s"%(auth)s}
local tmpl = '{"jsonrpc":"2.0","id":%%d,"method":"tools/call",' ..
             '"params":{"name":"%(tool)s","arguments":%(args)s}}'

request = function()
  i = i %% n + 1
  rid = rid + 1
  local h = {}
  for k, v in pairs(base) do h[k] = v end
  if sessions[i] ~= "" then h["Mcp-Session-Id"] = sessions[i] end
  return wrk.format("POST", path, h, string.format(tmpl, rid))
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"p50_us":%%d,"p99_us":%%d,"mean_us":%%f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


async def run_wrk(a: argparse.Namespace) -> dict:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk not found (apt-get install -y wrk)")
    clients = [Client(a.url, a.auth, a.tool, a.arguments) for _ in range(a.concurrency)]
    await asyncio.gather(*(c.handshake() for c in clients))
    # a short warm-up on the same sessions (upstream connections opened, caches filled)
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + a.warmup

    async def warm(c: Client) -> None:
        while loop.time() < warm_end:
            await c.call()

    await asyncio.gather(*(warm(c) for c in clients))
    for c in clients:
        c.close()
    u = urlsplit(a.url)
    auth = f', ["Authorization"] = "Bearer {a.auth}"' if a.auth else ""
    script = WRK_LUA % {
        "sessions": ", ".join(json.dumps(c.session_id or "") for c in clients),
        "path": u.path or "/",
        "version": PROTOCOL_VERSION,
        "auth": auth,
        "tool": a.tool,
        "args": orjson.dumps(a.arguments).decode().replace("%", "%%"),
    }
    trackers = [TreeCpu(p) for p in a.watch]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
        lua = f.name
    try:
        seconds = max(1, round(a.duration))
        cmd = [
            wrk,
            "-t1",
            f"-c{a.concurrency}",
            f"-d{seconds}s",
            "--timeout",
            f"{int(a.timeout)}s",
            "-s",
            lua,
        ]
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        before = [t.sample() for t in trackers]
        proc = await asyncio.create_subprocess_exec(
            *cmd, f"{u.scheme}://{u.netloc}", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, err = await proc.communicate()
        after = [t.sample() for t in trackers]
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        os.unlink(lua)
    line = next((x for x in out.decode().splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk gave no result: {out.decode()[-500:]} {err.decode()[-500:]}")
    w = json.loads(line[len("WRKJSON ") :])
    settled = [t.settle() for t in trackers] if a.settle else after
    n = w["requests"]
    elapsed = w["duration_us"] / 1e6
    errors = w["connect"] + w["read"] + w["write"] + w["status"] + w["timeout"]
    # wrk checks statuses, not bodies: check one call on a fresh session afterwards
    probe = Client(a.url, a.auth, a.tool, a.arguments)
    await probe.handshake()
    probe_rc = await probe.call()
    probe.close()
    wrk_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e6
    return {
        "driver": "wrk",
        "url": a.url,
        "concurrency": a.concurrency,
        "duration_s": elapsed,
        "calls": n,
        "calls_per_s": n / elapsed if elapsed else 0.0,
        "p50_ms": w["p50_us"] / 1e3,
        "p99_ms": w["p99_us"] / 1e3,
        "mean_ms": w["mean_us"] / 1e3,
        "ok": n - errors,
        "tool_errors": None,
        "errors": errors,
        "probe_ok": probe_rc == 0,
        "client_cpu_us_per_call": wrk_cpu / n if n else None,
        "watched": watched_delta(trackers, before, after, settled, n),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the MCP endpoint, e.g. http://127.0.0.1:8080/mcp/bench")
    ap.add_argument("--auth", default=None, help="bearer key")
    ap.add_argument("-c", "--concurrency", type=int, default=8, help="connections (= sessions)")
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of calls before measuring")
    ap.add_argument("--tool", default="open_session")
    ap.add_argument("--arguments", type=json.loads, default={}, help="tool arguments as JSON")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per call before it is an error")
    ap.add_argument("--watch", type=int, action="append", default=[], help="PID whose tree CPU to measure")
    ap.add_argument("--no-settle", dest="settle", action="store_false", help="don't wait for idle after")
    ap.add_argument("--wrk", action="store_true", help="drive wrk instead of the Python client")
    a = ap.parse_args(argv)
    a.timeout_each = False  # wait_for per call costs CPU; a stuck call ends at process exit
    return a


def main() -> None:
    a = parse_args()
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    result = run(run_wrk(a) if a.wrk else run_python(a))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
