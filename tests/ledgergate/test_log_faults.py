"""Faults at the event log (issue 17 items 3 and 4), with real processes and real files.

- batched mode, the log's filesystem full, SIGTERM: the queued records of calls that ran go
  to a rescue file and are folded into the log at the next start (item 4);
- SIGKILL and a deleted events.db-wal: the log went backwards; the gateway says so, records
  a log.gap event, strict mode refuses to serve until `--accept-log-gap`, and the limit
  holds because counters are folded from the store too (item 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from eventlog.sqlite import SqliteEventLog
from tests.ledgergate.test_audit_e2e import RECORDER, client
from tests.support.fullfs import fill as fill_fs
from tests.support.fullfs import small_tmpfs
from tests.support.gateway import start_gateway_process, write_config
from tests.support.procs import stop_process

KEYS = {"alice": "key-alice-0123456789"}


def policy(max_calls: int, window: str = "hour") -> dict:
    return {
        "version": "1",
        "default": "deny",
        "tools": {
            "open_session": {
                "limits": [
                    {"counter": "open_session_rate", "window": window, "max": max_calls, "scope": "grant"}
                ]
            }
        },
    }


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "small-fs", "128m") as mnt:
        yield mnt


def fill(directory: Path) -> Path:
    return fill_fs(directory, 1 << 16)


async def log_events(data_dir: Path) -> list[dict]:
    log = SqliteEventLog(data_dir / "events.db")
    await log.open()
    try:
        return [orjson.loads(r.payload) for r in await log.read(0, 1_000_000)]
    finally:
        await log.close()


def allowed_ns(events: list[dict]) -> list[str]:
    return [
        e["arguments"]["n"]
        for e in events
        if e.get("kind") == "call.decided" and e["decision"] == "allow" and e["tool"] == "open_session"
    ]


async def test_batched_sigterm_with_the_log_disk_full_loses_no_record(small_fs: Path, tmp_path: Path) -> None:
    record = tmp_path / "received.txt"
    record.touch()
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": policy(100_000)},
        grants=KEYS,
        gateway={"data_dir": str(small_fs / "data")},
        extra='\n[eventlog]\ndurability = "batched"\nflush_interval_ms = 5\n',
    )
    # the log's filesystem fills up, not the store's: data/clickhouse lives on the real disk
    (small_fs / "data").mkdir()
    (tmp_path / "clickhouse").mkdir()
    (small_fs / "data" / "clickhouse").symlink_to(tmp_path / "clickhouse")
    gw, base = start_gateway_process(path, tmp_path / "gateway-1.log")
    refused = 0
    stack = contextlib.AsyncExitStack()
    try:
        # the clients are closed in `finally`, after the gateway is gone
        # sessions open before the disk fills: what follows are tools/call only
        clients = [await stack.enter_async_context(client(base, "rec", KEYS["alice"])) for _ in range(12)]
        for i, c in enumerate(clients):
            assert not (await c.call_tool("open_session", {"n": f"before-{i}"})).is_error
        filler = fill(small_fs)

        async def hammer(w: int) -> None:
            nonlocal refused
            for i in range(10_000):
                try:
                    await clients[w].call_tool("open_session", {"n": f"w{w}-{i}"})
                except Exception:
                    refused += 1  # 503: the log cannot take the decision, not forwarded
                    return

        await asyncio.wait_for(asyncio.gather(*(hammer(w) for w in range(12))), 120)
        code = stop_process(gw, grace=30)  # SIGTERM while the disk is full
        assert refused >= 1
    finally:
        stop_process(gw)
        with contextlib.suppress(BaseException):
            await stack.aclose()  # their DELETEs find no gateway: nothing to check there
    out = (tmp_path / "gateway-1.log").read_text()
    assert code == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "lost at close" not in out
    assert "are folded into the log at the next start" in out, out[-3000:]
    # item 8: one line per interval, not one per refused call
    assert out.count("could not be recorded") <= 3, out.count("could not be recorded")
    assert (small_fs / "data" / "events.db.rescue").exists()

    filler.unlink()  # space again
    gw, base = start_gateway_process(path, tmp_path / "gateway-2.log")
    stop_process(gw, grace=30)
    out2 = (tmp_path / "gateway-2.log").read_text()
    assert "records rescued at the last close into the log" in out2, out2[-3000:]
    assert not (small_fs / "data" / "events.db.rescue").exists()
    executed = record.read_text().split()
    after_fill = [n for n in executed if n.startswith("w")]
    assert after_fill, "no call ran between the disk filling and the first refusal: nothing was at risk"
    decided = allowed_ns(await log_events(small_fs / "data"))
    # every call the upstream executed has its call.decided on the log, once
    assert set(executed) <= set(decided), sorted(set(executed) - set(decided))
    assert len(decided) == len(set(decided))


ADMIN = "admin-token-0123456789"


async def test_deleted_wal_after_sigkill_is_reported_and_the_limit_holds(tmp_path: Path) -> None:
    import json

    from tests.ledgergate.test_audit_e2e import cli
    from tests.support.procs import start_process

    record = tmp_path / "received.txt"
    record.touch()
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": policy(10, "hour")},  # the seed's 10, over an hour: no window edge mid-test
        grants=KEYS,
        gateway={"admin_token": ADMIN},
    )
    data = tmp_path / "data"
    gw, base = start_gateway_process(path, tmp_path / "gateway-1.log")
    try:
        async with client(base, "rec", KEYS["alice"]) as c:
            seen = [(await c.call_tool("open_session", {"n": f"a{i}"})).is_error for i in range(10)]
        assert seen == [False] * 10
        # the store holds them (the answer waits for the consumers), then the crash
        who = await cli(path, "audit", "who", "--tool", "open_session", "--format", "json")
        assert [(r["allowed"], r["refused"]) for r in who] == [(10, 0)]
        os.kill(gw.proc.pid, 9)
        gw.proc.wait(10)
    finally:
        stop_process(gw)
    for suffix in ("-wal", "-shm"):
        (data / f"events.db{suffix}").unlink(missing_ok=True)

    # strict: refuses to serve, naming the flag
    refused = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(path)],
        log_path=tmp_path / "gateway-2.log",
    )
    try:
        assert refused.proc.wait(120) == 3
    finally:
        stop_process(refused)
    out = (tmp_path / "gateway-2.log").read_text()
    assert "EVENT LOG WENT BACKWARDS" in out and "--accept-log-gap" in out, out[-3000:]
    assert "error: the event log" in out and "records lost" in out

    # with the flag: it serves, reports the gap as an event, and the spent hour stays spent
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    gw = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--accept-log-gap", "--config", str(path)],
        env=env,
        log_path=tmp_path / "gateway-3.log",
    )
    try:
        from tests.support.procs import wait_http

        wait_http(f"{base}/healthz", timeout=60, handle=gw)
        async with client(base, "rec", KEYS["alice"]) as c:
            after = await c.call_tool("open_session", {"n": "after"})
        assert after.is_error and after.structured_content["rule"] == "/tools/open_session/limits/0"
        assert after.structured_content["counter"]["count"] == 10
    finally:
        stop_process(gw, grace=30)
    out = (tmp_path / "gateway-3.log").read_text()
    assert "10 counter charges folded from the store" in out, out[-3000:]
    assert sorted(record.read_text().split()) == sorted(f"a{i}" for i in range(10))  # nothing more ran
    gaps = [e for e in await log_events(data) if e.get("kind") == "log.gap"]
    assert len(gaps) == 1 and gaps[0]["lost"] > 0 and gaps[0]["accepted_by"] == "flag"
    assert gaps[0]["counters_from_store"] == 10
    # accepted once: the next start serves without the flag and reports no gap
    gw, base = start_gateway_process(path, tmp_path / "gateway-4.log")
    stop_process(gw, grace=30)
    assert "WENT BACKWARDS" not in (tmp_path / "gateway-4.log").read_text()
    json.dumps(gaps)  # the event is plain JSON
