"""Client CPU per request: aiohttp.ClientSession vs gateway.http.client.UpstreamPool.

    .venv/bin/python bench/bench_httpclient.py [--n 4000] [--rounds 3]

A minimal raw asyncio HTTP/1.1 server (uvloop, keep-alive, fixed small JSON answer) runs
in a child process, so only the client's work lands in this process's CPU time. Each
cell is the best of --rounds runs of time.process_time() over --n requests (after a
warm-up), divided by the request count: CPU microseconds per request in the client
process, on uvloop. The aiohttp session is configured like gateway/upstreams/http.py.
A third row, HttpUpstream.request, is the whole transport as the proxy calls it per
forwarded call: the agent's headers picked and checked, the JSON-RPC message re-serialised,
the pool's request and read, and the UpstreamReply built.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import aiohttp
import orjson
import uvloop
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.http.client import UpstreamPool
from gateway.upstreams.base import Inbound
from gateway.upstreams.http import HttpUpstream

BODY = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}'
ANSWER = b'{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}],"isError":false}}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: 0123456789abcdef\r\n"
    b"Date: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
)
HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "Mcp-Protocol-Version": "2025-06-18",
    "Mcp-Session-Id": "0123456789abcdef",
}


class _Server(asyncio.Protocol):
    """Answers every complete request (headers + Content-Length body) with RESPONSE."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end].lower() + b"\r\n"
            i = head.find(b"content-length:")
            n = int(head[i + 15 : head.find(b"\r\n", i)]) if i >= 0 else 0
            if len(buf) < end + 4 + n:
                break
            buf = buf[end + 4 + n :]
            out.append(RESPONSE)
        self.buf = buf
        if out:
            self.t.write(b"".join(out))  # type: ignore[attr-defined]


def _serve(port_q: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_Server, "127.0.0.1", 0, backlog=1024)
        port_q.put(srv.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    uvloop.run(main())


async def _drive(call, n: int, conc: int) -> float:  # type: ignore[no-untyped-def]
    per = n // conc

    async def worker() -> None:
        for _ in range(per):
            await call()

    await asyncio.gather(*(worker() for _ in range(conc)))  # warm-up: open conc connections
    t0 = time.process_time()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return (time.process_time() - t0) / (per * conc) * 1e6


async def bench(url: str, n: int, rounds: int) -> dict[tuple[str, int], float]:
    res: dict[tuple[str, int], float] = {}
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
    )
    pool = UpstreamPool(url)

    async def via_aiohttp() -> None:
        async with session.post(url, data=BODY, headers=HEADERS) as r:
            data = await r.read()
            assert r.status == 200 and data == ANSWER and r.headers.get("content-type")

    async def via_pool() -> None:
        r = await pool.request("POST", HEADERS, BODY, read_timeout=60)
        data = await r.read()
        assert r.status == 200 and data == ANSWER and r.headers.get("content-type")

    upstream = HttpUpstream("bench", url, 60.0)
    inbound = Inbound(orjson.loads(BODY), CIMultiDictProxy(CIMultiDict(HEADERS)))

    class _Session:
        upstream_session = "0123456789abcdef"

    mcp_session = _Session()

    async def via_upstream() -> None:
        reply = await upstream.request(inbound, mcp_session, False)  # type: ignore[arg-type]
        assert reply.status == 200 and reply.body == ANSWER and reply.headers.get("content-type")

    calls = (
        ("aiohttp.ClientSession", via_aiohttp),
        ("UpstreamPool", via_pool),
        ("HttpUpstream.request", via_upstream),
    )
    try:
        for conc in (1, 8):
            for name, call in calls:
                res[name, conc] = min([await _drive(call, n, conc) for _ in range(rounds)])
    finally:
        await session.close()
        await pool.close()
        await upstream.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000, help="requests per measured run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per cell; the best is kept")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    proc = ctx.Process(target=_serve, args=(q,), daemon=True)
    proc.start()
    try:
        url = f"http://127.0.0.1:{q.get(timeout=30)}/mcp"
        res = uvloop.run(bench(url, args.n, args.rounds))
    finally:
        proc.terminate()
        proc.join(5)
    print(f"client CPU us/request (process_time, uvloop, best of {args.rounds} x {args.n} requests)")
    print(f"{'client':<24}{'conc=1':>10}{'conc=8':>10}")
    for name in ("aiohttp.ClientSession", "UpstreamPool", "HttpUpstream.request"):
        print(f"{name:<24}{res[name, 1]:>10.1f}{res[name, 8]:>10.1f}")
    for conc in (1, 8):
        ratio = res["aiohttp.ClientSession", conc] / res["UpstreamPool", conc]
        print(f"speed-up at conc={conc}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
