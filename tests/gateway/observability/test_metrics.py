"""GET /metrics: real gateway, real whatsapp-mcp-server, the official SDK as the client.

In process (build_app + the metrics addon) for the call counters, refusals, latencies,
sessions and stdio restarts; as `ledgergate run` (a subprocess: the embedded event log, chDB
and consumers) for the event log's group commit, the consumers' lag and the unauthenticated
``[gateway] metrics_listen`` listener.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventlog.sqlite import SqliteEventLog
from gateway.app import build_app
from gateway.observability.metrics import Metrics
from tests.support.gateway import SEED_POLICY, FakeClock, RunningGateway, running_gateway, write_config
from tests.support.procs import free_port, start_process, stop_process, wait_http
from tests.support.upstreams import StdioCommand

KEYS = {"alice": "key-alice-0123456789"}
TOKEN = "metrics-admin-token"


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)]"""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float | None:
    for lab, v in samples.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    return None


async def scrape(base: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics", headers=headers) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


@pytest.fixture
async def gw(tmp_path: Path, whatsapp_command: StdioCommand):
    cfg = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=KEYS,
        agents={"alice": "agent-a"},
        gateway={"admin_token": TOKEN},
    )
    metrics = Metrics()

    def build(c: Any, clock: Any) -> Any:
        return build_app(c, clock=clock, metrics=metrics)

    async with running_gateway(cfg, KEYS, FakeClock(), build=build) as g:
        metrics.servers["gateway"] = g.runner
        g.extra["metrics"] = metrics
        yield g


async def test_calls_refusals_latencies_sessions(gw: RunningGateway) -> None:
    async with gw.client("whatsapp", "alice") as c:
        for _ in range(12):
            await c.call_tool("open_session", {})
        await c.call_tool("send_message", {"phone_number": "+100", "content": "secret text"})
        await c.call_tool("made_up_tool_4711", {"x": "y"})
        status, ctype, text = await scrape(gw.base)
    assert status == 200
    assert ctype.startswith("text/plain; version=")  # the Prometheus text exposition
    m = parse(text)
    calls = "ledgergate_calls_total"
    common = {"server": "whatsapp", "method": "tools/call"}
    assert value(m, calls, **common, tool="open_session", decision="allow", outcome="ok") == 10
    assert value(m, calls, **common, tool="open_session", decision="rate_limited", outcome="refused") == 2
    # tools the policy does not name share one label value: the label set stays bounded
    assert value(m, calls, **common, tool="other", decision="deny", outcome="refused") == 2
    assert not any(lab.get("tool") in ("send_message", "made_up_tool_4711") for lab, _ in m[calls])
    assert value(m, calls, server="whatsapp", method="initialize", decision="allow", outcome="ok") == 1
    # no per-session or per-argument label anywhere
    every = {k for samples in m.values() for lab, _ in samples for k in lab}
    assert not every & {"session", "arguments", "call_id", "grant", "agent"}
    assert "secret text" not in text
    refusals = "ledgergate_refusals_total"
    assert value(m, refusals, rule="/tools/open_session/limits/0", decision="rate_limited") == 2
    assert value(m, refusals, rule="/default", decision="deny") == 2
    # every forwarded call has an upstream latency; every call an added latency
    forwarded = 10 + 1 + 1  # open_session x10, initialize, tools/list? (SDK: only when asked)
    up_count = value(m, "ledgergate_upstream_latency_seconds_count", server="whatsapp")
    assert up_count is not None and up_count >= forwarded - 1
    assert value(m, "ledgergate_upstream_latency_seconds_bucket", server="whatsapp", le="+Inf") == up_count
    added_count = value(m, "ledgergate_added_latency_seconds_count", server="whatsapp")
    assert added_count == sum(v for lab, v in m[calls])
    assert value(m, "ledgergate_sessions", server="whatsapp") == 1  # the client is still connected
    assert value(m, "ledgergate_stdio_children", server="whatsapp") == 1
    assert value(m, "ledgergate_stdio_child_restarts_total", server="whatsapp") == 0
    assert value(m, "ledgergate_policy_loads_total", server="whatsapp", result="ok") == 1
    assert value(m, "ledgergate_connections", listener="gateway") is not None
    assert value(m, "ledgergate_sessions_opened_total", server="whatsapp") == 1
    # no event log, no consumers, no alerts in this process: those families are absent
    assert "ledgergate_eventlog_append_seconds_count" not in m
    assert "ledgergate_consumer_lag_events" not in m
    assert "ledgergate_alerts_fired_total" not in m


async def test_needs_the_admin_token(gw: RunningGateway) -> None:
    status, _, _ = await scrape(gw.base, None)
    assert status == 401
    status, _, _ = await scrape(gw.base, "wrong")
    assert status == 401
    async with aiohttp.ClientSession() as s, s.get(f"{gw.base}/metrics") as r:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_stdio_child_restart_and_policy_reload_failure(gw: RunningGateway, tmp_path: Path) -> None:
    async with gw.client("whatsapp", "alice") as c:
        await c.call_tool("open_session", {})
        proc = gw.proxy.upstreams["whatsapp"].processes["alice"]
        proc.proc.kill()
        await proc.proc.wait()
        # the next call finds the child dead and the gateway starts a new one (poll: no sleeps)
        for _ in range(100):
            r = await c.call_tool("open_session", {})
            if not r.is_error:
                break
            await asyncio.sleep(0.05)
    (tmp_path / "whatsapp.policy.json").write_text("{not json")
    gw.app["policies"].reload()
    _, _, text = await scrape(gw.base)
    m = parse(text)
    assert value(m, "ledgergate_stdio_child_restarts_total", server="whatsapp") == 1
    assert value(m, "ledgergate_policy_loads_total", server="whatsapp", result="failed") == 1
    assert value(m, "ledgergate_calls_total", tool="open_session", outcome="upstream_error") in (None, 1.0)


async def test_append_stats_count_batches_not_records(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db", "strict")
    await log.open()
    try:
        # 20 appends started in one loop iteration share the group commit
        await asyncio.gather(*(log.append([b'{"n":%d}' % i]) for i in range(20)))
        await log.append([b"{}", b"{}"])
    finally:
        await log.close()
    s = log.stats
    assert s.records == 22
    assert 2 <= s.batches < 22
    assert sum(s.batch_buckets) == sum(s.wait_buckets) == sum(s.commit_buckets) == s.batches
    assert s.wait_s >= s.commit_s > 0
    assert s.failures == 0


def test_ledgergate_run_metrics_listen(tmp_path: Path, whatsapp_command: StdioCommand) -> None:
    """The embedded runtime: event log commits and consumer lag; metrics_listen needs no token."""
    mport = free_port()
    cfg = write_config(
        tmp_path,
        servers={"whatsapp": {"command": whatsapp_command.argv, "env": whatsapp_command.env}},
        policies={"whatsapp": SEED_POLICY},
        grants=KEYS,
        gateway={"admin_token": TOKEN, "metrics_listen": f"127.0.0.1:{mport}"},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGERGATE_")}
    handle = start_process(
        [sys.executable, "-m", "ledgergate", "run", "--config", str(cfg)],
        env=env,
        log_path=tmp_path / "gw.log",
    )
    try:
        import tomllib

        listen = tomllib.loads(cfg.read_text())["gateway"]["listen"]
        base = f"http://{listen}"
        wait_http(f"{base}/healthz", timeout=60, handle=handle)
        wait_http(f"http://127.0.0.1:{mport}/metrics", timeout=10, handle=handle)

        async def run() -> tuple[dict[str, Any], int]:
            import httpx2
            from mcp import Client
            from mcp.client.streamable_http import streamable_http_client

            http = httpx2.AsyncClient(
                headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=httpx2.Timeout(30.0, read=60.0)
            )
            async with Client(
                streamable_http_client(f"{base}/mcp/whatsapp", http_client=http), mode="legacy"
            ) as c:
                for _ in range(3):
                    await c.call_tool("open_session", {})
            status, _, text = await scrape(f"http://127.0.0.1:{mport}", None)
            return parse(text), status

        m, status = asyncio.run(run())
        assert status == 200
        assert value(m, "ledgergate_calls_total", tool="open_session", decision="allow") == 3
        batches = value(m, "ledgergate_eventlog_batch_records_count")
        records = value(m, "ledgergate_eventlog_batch_records_sum")
        assert batches is not None and batches >= 1
        # at least decided + completed of each call, plus session and policy events
        assert records is not None and records >= 6
        assert value(m, "ledgergate_eventlog_append_seconds_count") == batches
        for consumer in ("audit", "counters"):
            names = {lab["consumer"] for lab, _ in m["ledgergate_consumer_lag_events"]}
            assert any(consumer in n for n in names), names
        assert all(v >= 0 for _, v in m["ledgergate_consumer_lag_seconds"])
        assert value(m, "ledgergate_connections", listener="gateway") is not None
    finally:
        stop_process(handle)
