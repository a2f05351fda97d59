"""A refund survives a restart: a call charged but never sent costs no quota after `serve()` again.

The real composition (`serve()`: SQLite event log, chDB store, counter rebuild) twice on one
data dir, a real HTTP upstream that records what it got, exact bytes over a raw socket. Calls
refused by a bad header after their charge are refunded in memory; their call.completed says
`refunded: true`, and the counter rebuild at the next start gives those charges back while it
still folds the charges of the calls that did run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

from eventlog import SqliteEventLog
from gateway.config import Config, load_config
from ledgergate.embedded import serve
from tests.support.gateway import FakeClock, RunningGateway, write_config
from tests.support.hostile import RecordingHttp, call, open_session, raw_post
from tests.support.procs import free_port

KEY = "key-refund-0123456789"
KEYS = {"qa": KEY}
LIMIT = 10
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {"counter": {"limits": [{"counter": "c", "window": "minute", "max": LIMIT, "scope": "grant"}]}},
}
BODY = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"counter","arguments":{"n":1}}}'


@contextlib.asynccontextmanager
async def serving(cfg: Config, clock: FakeClock) -> AsyncIterator[RunningGateway]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(cfg, clock=clock, ready=ready.set_result, stop=stop))
    done, _ = await asyncio.wait({task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "gateway not ready in 60 s"
    try:
        yield RunningGateway(ready.result(), cfg, None, KEYS, clock, None)  # type: ignore[arg-type]
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


def allowed(answer: dict[str, Any]) -> bool:
    return answer["result"].get("isError") is not True


async def test_refunded_charges_stay_refunded_after_a_restart(tmp_path: Path) -> None:
    http = RecordingHttp()
    await http.start(free_port())
    try:
        path = write_config(tmp_path, servers={"rh": {"url": http.url}}, policies={"rh": POLICY}, grants=KEYS)
        cfg = load_config(path)
        clock = FakeClock()
        ran = 3
        async with serving(cfg, clock) as gw:
            sid = await open_session(gw, "rh", KEY)
            for i in range(ran):  # charged and sent: these count after the restart
                assert allowed(await call(gw, "rh", KEY, sid, "counter", {"n": i}, rid=100 + i))
            before = len(http.seen)
            for _ in range(LIMIT + 5):  # charged, then refused before the write: refunded
                a = await raw_post(gw, "rh", KEY, BODY, sid, extra=b"\r\nUser-Agent: agent\xff\xfe")
                assert a.status == 400 and "not forwarded" in a.json()["error"]["message"], a
            assert len(http.seen) == before  # the upstream got none of them

        # the log says which calls were refunded
        log = SqliteEventLog(cfg.data_dir / "events.db")
        await log.open()
        try:
            completed = [
                ev
                for rec in await log.read(0, 100_000)
                if (ev := orjson.loads(rec.payload))["kind"] == "call.completed" and ev["tool"] == "counter"
            ]
        finally:
            await log.close()
        assert sorted(ev["refunded"] for ev in completed) == [False] * ran + [True] * (LIMIT + 5)

        async with serving(cfg, clock) as gw:  # same data dir, same window
            sid = await open_session(gw, "rh", KEY)
            more = [await call(gw, "rh", KEY, sid, "counter", {"n": i}, rid=200 + i) for i in range(LIMIT)]
        # exactly what is left of the window after the 3 that ran: the refunds cost nothing
        assert [allowed(r) for r in more] == [True] * (LIMIT - ran) + [False] * ran
        assert more[-1]["result"]["structuredContent"]["decision"] == "rate_limited"
    finally:
        await http.stop()
