"""The gateway's own log under a fault: one line per kind of failure and interval (issue 17 item 8)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from eventlog.ratelog import AggregatingLog
from tests.support.gateway import FakeClock


def test_a_flood_becomes_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(0.0)
    agg = AggregatingLog(logging.getLogger("ledgergate.test"), 10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="ledgergate.test")
    for i in range(1409):  # 1,409 refusals in 7 s, as measured on a full disk
        agg.error("not forwarded", "call %d could not be recorded", i)
        clock.advance(7 / 1409)
    assert [r.getMessage() for r in caplog.records] == ["call 0 could not be recorded"]
    clock.advance(3.1)  # the interval ends; no event loop here, so the next line summarises
    agg.error("not forwarded", "call %d could not be recorded", 1409)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].startswith("not forwarded: 1409 more like it in the last 10 s")
    assert lines[1].endswith("(last: call 1409 could not be recorded)")
    assert all(r.levelno == logging.ERROR for r in caplog.records)
    # another kind of failure is not held back by the first
    agg.error("other", "something else")
    assert caplog.records[-1].getMessage() == "something else"


async def test_the_summary_comes_when_the_fault_stops(caplog: pytest.LogCaptureFixture) -> None:
    agg = AggregatingLog(logging.getLogger("ledgergate.test"), 0.2)
    caplog.set_level(logging.INFO, logger="ledgergate.test")
    for i in range(50):
        agg.error("k", "fail %d", i)
    assert len(caplog.records) == 1
    for _ in range(100):  # poll: the timer writes the summary at the interval's end
        if len(caplog.records) == 2:
            break
        await asyncio.sleep(0.05)
    assert caplog.records[1].getMessage().startswith("k: 49 more like it")
    assert agg.suppressed == 49
