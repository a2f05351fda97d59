"""bench/budget.py's stage split: py-spy raw stacks -> stages per thread -> us/call."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from budget import LOOP_C, OTHER, budget_rows, parse_raw, stage_of

MAIN = "thread (100): MainThread"
RUN = "Runner.run (asyncio/runners.py:118);run (uvloop/__init__.py:82)"


def test_the_innermost_matching_frame_decides_the_stage() -> None:
    # the proxy calls the audit addon, which appends to the log: the append is the stage
    stack = [
        "_handle_request (aiohttp/web_protocol.py:452)",
        "Proxy._call (gateway/proxy.py:458)",
        "AuditAddon.decided (gateway/audit/writer.py:170)",
        "SqliteEventLog.append (eventlog/sqlite.py:558)",
    ]
    assert stage_of(stack) == "log append (loop side)"
    assert stage_of(stack[:3]) == "event build + audit hooks"
    assert stage_of(stack[:2]) == "proxy bookkeeping"
    assert stage_of(stack[:1]) == "edge: aiohttp server (request, dispatch)"


def test_the_loop_in_c_and_unknown_code() -> None:
    assert stage_of(RUN.split(";")) == LOOP_C
    assert stage_of(["<module> (somewhere/else.py:1)"]) == OTHER


def test_raw_output_is_split_per_thread_and_turned_into_us_per_call() -> None:
    lines = [
        f"{MAIN};{RUN};Proxy._call (gateway/proxy.py:1);decide (gateway/policy/engine.py:9) 30",
        f"{MAIN};{RUN} 10",
        f"{MAIN};{RUN};UpstreamPool.request (gateway/http/client.py:615) 60",
        "thread (101): eventlog-writer:events.db;_w_write (eventlog/sqlite.py:1) 7",
        "not a stack line",
    ]
    threads = parse_raw(lines)
    assert set(threads) == {100, 101}
    main = threads[100]
    assert main.name == "MainThread" and main.total == 100
    rows = budget_rows(main, cpu_us=200_000.0, calls=1_000)  # 200 us of loop CPU per call
    assert rows == [
        ("forward: upstream client", 0.6, 120.0),
        ("decide", 0.3, 60.0),
        (LOOP_C, 0.1, 20.0),
    ]
    assert threads[101].stages == {"log append (loop side)": 7}
