"""`ledgergate run` with `[eventlog] backend = "kafka"` end to end, on a real tansu broker.

The gateway writes its decisions to the Kafka topic only (no events.db), the embedded
consumers read them back from the topic into chDB, and after a kill -9 the restarted
gateway rebuilds the minute's counters from the topic (read_since: offsets_for_times),
so the seed policy's 10/min limit holds across the restart.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from gateway.config import load_config
from tests.ledgergate.test_audit_e2e import ADMIN, RECORDER, cli, client, start_early_in_a_minute
from tests.support.gateway import SEED_POLICY, start_gateway_process, write_config
from tests.support.kafka import Tansu, kafka_broker, unique_topic
from tests.support.procs import stop_process

__all__ = ["kafka_broker"]  # the session fixture, used by name


async def test_kafka_gateway_kill_9_restart_keeps_the_minute_limit(
    tmp_path: Path, kafka_broker: Tansu
) -> None:
    keys = {"alice": "key-alice-0123456789"}
    record = tmp_path / "received.txt"
    record.touch()
    topic = unique_topic("gw")
    path = write_config(
        tmp_path,
        servers={"rec": {"command": [sys.executable, str(RECORDER)], "env": {"RECORD_FILE": str(record)}}},
        policies={"rec": SEED_POLICY},
        grants=keys,
        gateway={"admin_token": ADMIN},
        extra=(
            f'\n[eventlog]\nbackend = "kafka"\nbootstrap = "{kafka_broker.bootstrap}"\n'
            f'topic = "{topic}"\npartitions = 3\nrun_consumers = true\n'
        ),
    )
    data_dir = load_config(path).data_dir
    window = await start_early_in_a_minute(margin_s=30.0)

    gw, base = start_gateway_process(path, tmp_path / "gateway-1.log")
    try:
        async with client(base, "rec", keys["alice"]) as c:
            first = [await c.call_tool("open_session", {"n": f"a{i}"}) for i in range(12)]
        assert [r.is_error for r in first] == [False] * 10 + [True] * 2
        os.kill(gw.pid, signal.SIGKILL)
        gw.proc.wait(10)
    finally:
        stop_process(gw)
    assert sorted(record.read_text().split()) == sorted(f"a{i}" for i in range(10))
    # the decisions went to Kafka, not to an embedded log, and none waits in the spool
    assert not (data_dir / "events.db").exists()

    gw, base = start_gateway_process(path, tmp_path / "gateway-2.log")
    try:
        async with client(base, "rec", keys["alice"]) as c:
            again = await c.call_tool("open_session", {"n": "after-restart"})
        # the counters came back from the topic: the minute's 10 are used up
        assert again.is_error
        assert again.structured_content["rule"] == "/tools/open_session/limits/0"
        assert "after-restart" not in record.read_text().split()
        # the embedded consumers read the topic: the audit trail has every decision
        calls = await cli(
            path, "audit", "calls", "--tool", "open_session", "--limit", "100", "--format", "json"
        )
        decisions = sorted(c["decision"] for c in calls)
        assert decisions.count("allow") == 10
        assert len(decisions) == 13 and set(decisions) - {"allow"} == {"rate_limited"}
        assert int(time.time() // 60) == window, "the test outran its minute window: give it more margin"
    finally:
        stop_process(gw)

    # nothing was left behind in the spool (the broker was up throughout)
    from eventlog.sqlite import SqliteEventLog

    async with SqliteEventLog(data_dir / "spool.db") as spool:
        assert await spool.committed("kafka-drain") == await spool.end_offset()
