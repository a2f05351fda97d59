"""Clock steps cannot buy quota (issue 17 item 6).

Windows are aligned to UTC wall time, but the limiter's now never goes backwards: a step back
must not reopen a charged window, a step forward is taken and logged. Through the real
composition (`serve()`: proxy, audit log, store) with an injected clock and a real stdio
upstream that records each call it executes.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from eventlog.sqlite import SqliteEventLog
from gateway.config import load_config
from gateway.policy.clock import MonotonicWallClock
from tests.ledgergate.test_audit_e2e import RECORDER, client, serving
from tests.support.gateway import SEED_POLICY, FakeClock, write_config

KEYS = {"alice": "key-alice-0123456789"}


def test_monotonic_wall_clock_holds_the_later_time() -> None:
    wall = FakeClock(1_000_000.0)
    clock = MonotonicWallClock(wall)
    assert clock() == 1_000_000.0
    wall.advance(-60)
    assert clock() == 1_000_000.0  # frozen, not 999_940
    wall.advance(30)
    assert clock() == 1_000_000.0
    wall.advance(31)
    assert clock() == 1_000_001.0  # caught up: follows the wall clock again
    assert clock.steps_back == 2 and clock.backward_s == 60


async def test_clock_steps_through_the_gateway_buy_no_quota(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record = tmp_path / "received.txt"
    record.touch()
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": SEED_POLICY},  # 10 open_session per minute and grant
        grants=KEYS,
    )
    cfg = load_config(path)
    clock = FakeClock()  # 1 s into a UTC minute
    seen: list[bool] = []
    caplog.set_level(logging.WARNING, logger="ledgergate")
    async with serving(cfg, clock) as base, client(base, "rec", KEYS["alice"]) as c:
        for i in range(10):
            seen.append((await c.call_tool("open_session", {"n": f"a{i}"})).is_error)
        assert (await c.call_tool("open_session", {"n": "a10"})).is_error
        clock.advance(-60)  # the wall clock steps back into the previous minute
        back = [(await c.call_tool("open_session", {"n": f"b{i}"})).is_error for i in range(3)]
        clock.advance(58)  # still before the original now: the spent window stays spent
        back.append((await c.call_tool("open_session", {"n": "b3"})).is_error)
        assert any("stepped back 60.000 s" in r.getMessage() for r in caplog.records)
        clock.advance(2 + 120)  # a step forward of two minutes: a new window, logged
        fwd = [(await c.call_tool("open_session", {"n": f"c{i}"})).is_error for i in range(11)]
        assert any("stepped forward" in r.getMessage() for r in caplog.records)
    assert seen == [False] * 10
    assert back == [True] * 4  # the step back re-opened nothing
    assert fwd == [False] * 10 + [True]  # the new window has its own 10, no more
    executed = record.read_text().split()
    assert sorted(executed) == sorted([f"a{i}" for i in range(10)] + [f"c{i}" for i in range(10)])
    # the audit trail: one allowed call.decided per executed call, and no other allow
    log = SqliteEventLog(cfg.data_dir / "events.db")
    await log.open()
    try:
        records = await log.read(0, 100_000)
    finally:
        await log.close()
    import orjson

    allowed = [
        orjson.loads(r.payload)["arguments"]["n"]
        for r in records
        if b'"kind":"call.decided"' in r.payload
        and orjson.loads(r.payload)["decision"] == "allow"
        and orjson.loads(r.payload)["tool"] == "open_session"
    ]
    assert sorted(allowed) == sorted(executed)
