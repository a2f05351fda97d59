"""OpenTelemetry spans of real calls, caught by the SDK's in-memory exporter.

A real gateway (build_app) with the real audit addon on a real SQLite event log, wrapped by
the tracing addon; the official SDK client; a real stdio upstream (tests/support/
recording_stdio.py, which records every line it reads) and a real HTTP one (RecordingHttp,
which records every request's headers).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from eventlog.sqlite import SqliteEventLog
from gateway.app import POLICIES_KEY, build_app
from gateway.audit.writer import AuditAddon
from gateway.config import TelemetrySection
from gateway.observability import propagate
from gateway.observability.tracing import TracingAddon, provider_for
from tests.support.gateway import FakeClock, RunningGateway, running_gateway, write_config
from tests.support.hostile import RecordingHttp, recorded_calls, recording_stdio_server
from tests.support.procs import free_port

ROOT = Path(__file__).resolve().parents[3]
KEY = "key-tracing-0123456789"
KEYS = {"qa": KEY}
POLICY = {
    "version": "1",
    "default": "deny",
    "tools": {
        "echo": {},
        "counter": {"limits": [{"counter": "c", "window": "minute", "max": 2, "scope": "grant"}]},
    },
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class ToolsHttp(RecordingHttp):
    """RecordingHttp that also lists its tool (the SDK client validates results against it)."""

    async def handler(self, req: Any) -> Any:
        if req.method == "POST":
            body = await req.read()
            msg = orjson.loads(body)
            if msg.get("method") == "tools/list":
                self.seen.append((req.method, dict(req.headers), body))
                tools = [{"name": "echo", "inputSchema": {"type": "object"}}]
                return web.json_response(
                    {"jsonrpc": "2.0", "id": msg["id"], "result": {"tools": tools}},
                    headers={"Mcp-Session-Id": "up-1"},
                )
            req._read_bytes = body  # read once: the base handler reads it again
        return await super().handler(req)


@pytest.fixture
async def gw(tmp_path: Path):
    record = tmp_path / "record.log"
    http = ToolsHttp()
    await http.start(free_port())
    cfg = write_config(
        tmp_path,
        servers={"rec": recording_stdio_server(record), "rh": {"url": http.url}},
        policies={"rec": POLICY, "rh": POLICY},
        grants=KEYS,
        agents={"qa": "trace-agent"},
    )
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    audit = AuditAddon(log, "gw-test", flush_interval_s=0.001)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = TracingAddon(audit, provider)

    def build(c: Any, clock: Any) -> Any:
        app = build_app(c, addons=[tracing], clock=clock, trace_incoming=True)
        audit.policies = app[POLICIES_KEY]
        return app

    try:
        async with running_gateway(cfg, KEYS, FakeClock(), build=build) as g:
            g.extra.update(record=record, http=http, exporter=exporter, log=log)
            yield g
    finally:
        tracing.close()
        await http.stop()
        await log.close()


def client(gw: RunningGateway, server: str, traceparent: str | None = None) -> Client:
    headers = {"Authorization": f"Bearer {KEY}"}
    if traceparent:
        headers["traceparent"] = traceparent
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0))
    return Client(streamable_http_client(gw.url(server), http_client=http), mode="legacy")


def spans_by_call(exporter: InMemorySpanExporter) -> dict[int, list[Any]]:
    """request span id -> [request span, its children...]"""
    spans = exporter.get_finished_spans()
    out: dict[int, list[Any]] = {}
    for s in spans:
        if s.kind is SpanKind.SERVER:
            out.setdefault(s.context.span_id, []).insert(0, s)
    for s in spans:
        if s.kind is not SpanKind.SERVER and s.parent is not None and s.parent.span_id in out:
            out[s.parent.span_id].append(s)
    return out


async def test_one_span_per_request_with_log_and_upstream_children(gw: RunningGateway) -> None:
    exporter: InMemorySpanExporter = gw.extra["exporter"]
    async with client(gw, "rec") as c:
        for _ in range(3):
            await c.call_tool("counter", {"n": 1})
        await c.call_tool("delete_everything", {})
    calls = [v for v in spans_by_call(exporter).values() if v[0].attributes["mcp.method"] == "tools/call"]
    assert len(calls) == 4
    by_tool: dict[str, list[list[Any]]] = {}
    for group in calls:
        by_tool.setdefault(group[0].attributes.get("mcp.tool"), []).append(group)
    allowed = [g for g in by_tool["counter"] if g[0].attributes["ledgergate.decision"] == "allow"]
    limited = [g for g in by_tool["counter"] if g[0].attributes["ledgergate.decision"] == "rate_limited"]
    assert len(allowed) == 2 and len(limited) == 1
    for group in allowed:
        span, children = group[0], {s.name: s for s in group[1:]}
        assert span.name == "mcp tools/call counter"
        assert span.attributes["mcp.server"] == "rec"
        assert span.attributes["ledgergate.grant"] == "qa"
        assert span.attributes["ledgergate.agent"] == "trace-agent"
        assert span.attributes["ledgergate.outcome"] == "ok"
        assert set(children) == {"eventlog.append", "upstream rec"}
        log_span, up = children["eventlog.append"], children["upstream rec"]
        assert span.start_time <= log_span.start_time <= log_span.end_time <= up.start_time
        assert up.end_time <= span.end_time
        assert up.kind is SpanKind.CLIENT
        assert up.attributes["ledgergate.upstream_ms"] >= 0
    span = limited[0][0]
    assert span.attributes["ledgergate.rule"] == "/tools/counter/limits/0"
    assert span.attributes["ledgergate.outcome"] == "refused"
    assert [s.name for s in limited[0][1:]] == ["eventlog.append"]  # never forwarded: no upstream span
    denied = by_tool["delete_everything"][0][0]
    assert denied.attributes["ledgergate.decision"] == "deny"
    assert denied.attributes["ledgergate.rule"] == "/default"
    assert not propagate.OUTGOING  # nothing left behind once the calls completed


async def test_incoming_traceparent_is_continued(gw: RunningGateway) -> None:
    exporter: InMemorySpanExporter = gw.extra["exporter"]
    async with client(gw, "rh", TRACEPARENT) as c:
        await c.call_tool("echo", {"text": "hi"})
    calls = [v for v in spans_by_call(exporter).values() if v[0].attributes["mcp.method"] == "tools/call"]
    assert len(calls) == 1
    span = calls[0][0]
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.parent.is_remote
    assert all(f"{s.context.trace_id:032x}" == TRACE_ID for s in calls[0])


def upstream_span_of_the_call(exporter: InMemorySpanExporter, name: str) -> Any:
    (group,) = [g for g in spans_by_call(exporter).values() if g[0].attributes["mcp.method"] == "tools/call"]
    (up,) = [s for s in group if s.name == name]
    return up


async def test_http_upstream_gets_the_upstream_spans_traceparent(gw: RunningGateway) -> None:
    exporter: InMemorySpanExporter = gw.extra["exporter"]
    http: RecordingHttp = gw.extra["http"]
    async with client(gw, "rh", TRACEPARENT) as c:
        await c.call_tool("echo", {"text": "hi"})
    up = upstream_span_of_the_call(exporter, "upstream rh")
    got = [h for m, h, b in http.seen if m == "POST" and b"tools/call" in b]
    assert len(got) == 1
    sent = {k.lower(): v for k, v in got[0].items()}["traceparent"]
    assert sent == f"00-{TRACE_ID}-{up.context.span_id:016x}-01"


async def test_stdio_upstream_gets_it_in_params_meta(gw: RunningGateway) -> None:
    exporter: InMemorySpanExporter = gw.extra["exporter"]
    async with client(gw, "rec", TRACEPARENT) as c:
        await c.call_tool("echo", {"text": "hi"})
    up = upstream_span_of_the_call(exporter, "upstream rec")
    (line,) = [m for m in recorded_calls(gw.extra["record"]) if m["params"]["name"] == "echo"]
    assert line["params"]["_meta"]["traceparent"] == f"00-{TRACE_ID}-{up.context.span_id:016x}-01"
    assert line["params"]["arguments"] == {"text": "hi"}


def test_propagation_helpers_are_noops_when_tracing_is_off() -> None:
    assert not propagate.ENABLED
    flow = object()
    headers: list[tuple[str, str]] = []
    propagate.add_traceparent(headers, flow)
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
    assert propagate.with_meta_traceparent(msg, flow) is msg
    assert headers == []


def test_meta_traceparent_keeps_the_clients_meta() -> None:
    flow = object()
    propagate.ENABLED = True
    propagate.OUTGOING[flow] = TRACEPARENT
    try:
        msg = {"id": 1, "method": "tools/call", "params": {"name": "x", "_meta": {"progressToken": 7}}}
        out = propagate.with_meta_traceparent(msg, flow)
        assert out["params"]["_meta"] == {"progressToken": 7, "traceparent": TRACEPARENT}
        assert msg["params"]["_meta"] == {"progressToken": 7}  # the client's message is not mutated
        headers: list[tuple[str, str]] = [("accept", "application/json")]
        propagate.add_traceparent(headers, flow)
        assert headers[-1] == ("traceparent", TRACEPARENT)
    finally:
        propagate.ENABLED = False
        propagate.OUTGOING.clear()


def test_no_opentelemetry_import_without_an_otlp_endpoint(tmp_path: Path) -> None:
    """With [telemetry] unset, building and serving the app never imports OpenTelemetry."""
    cfg = tmp_path / "policy.json"
    cfg.write_text(orjson.dumps(POLICY).decode())
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from gateway.config import parse_config
        from pathlib import Path
        import ledgergate.embedded, ledgergate.cli.main, gateway.app
        from gateway.observability.metrics import Metrics
        c = parse_config({{"servers": {{"s": {{"url": "http://127.0.0.1:9/mcp", "policy": "policy.json"}}}},
                          "gateway": {{"admin_token": "t"}}}}, Path({str(tmp_path / "x.toml")!r}))
        assert c.telemetry.otlp_endpoint is None
        app = gateway.app.build_app(c, metrics=Metrics(), admin=None)
        loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
        assert not loaded, loaded
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_provider_for_exports_over_otlp_http() -> None:
    provider = provider_for(
        TelemetrySection(otlp_endpoint="http://127.0.0.1:9/v1/traces", service_name="lg-x")
    )
    try:
        assert provider.resource.attributes["service.name"] == "lg-x"
        exporter = provider._active_span_processor._span_processors[0].span_exporter  # type: ignore[attr-defined]
        assert type(exporter).__name__ == "OTLPSpanExporter"
    finally:
        provider.shutdown()
