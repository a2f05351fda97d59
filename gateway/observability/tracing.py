"""OpenTelemetry traces: one span per MCP request, child spans for the log append and the
upstream call. Imported only when ``[telemetry] otlp_endpoint`` is set (or by a test):
with tracing off, the gateway never imports OpenTelemetry and the call path pays nothing.

``TracingAddon`` wraps the audit addon (the one whose ``decided`` appends to the event log)
so the log append gets its own child span without a new hook; every other hook is passed
through. Spans::

    mcp <method> [<tool>]      SERVER  attrs: mcp.server, mcp.method, mcp.tool, ledgergate.grant,
      |                                ledgergate.agent, ledgergate.decision, ledgergate.rule,
      |                                ledgergate.outcome, ledgergate.call_id
      +- eventlog.append       INTERNAL
      +- upstream <server>     CLIENT  (only for a forwarded call; its context is what the
                                        upstream gets as traceparent, see propagate.py)

The request span starts at ``flow.started`` (when the gateway parsed the request) and
continues the incoming request's ``traceparent`` when there is one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.audit.hooks import Addon, AddonChain
from gateway.observability import propagate

if TYPE_CHECKING:
    from gateway.config import TelemetrySection
    from gateway.mcp.flow import CallFlow

_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_OUTCOMES = frozenset({"upstream_error", "cancelled"})


def provider_for(telemetry: TelemetrySection, exporter: SpanExporter | None = None) -> TracerProvider:
    """A TracerProvider exporting over OTLP/HTTP to ``telemetry.otlp_endpoint`` (batched, off
    the event loop), or to ``exporter``. Not installed globally: the gateway's own tracer."""
    provider = TracerProvider(resource=Resource.create({"service.name": telemetry.service_name}))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=telemetry.otlp_endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class TracingAddon(AddonChain):
    """Spans for every request; wraps ``inner`` (the audit addon) to time its log append."""

    def __init__(self, inner: Addon, provider: trace.TracerProvider) -> None:
        super().__init__([inner])
        self.inner = inner
        self.tracer = provider.get_tracer("ledgergate")
        self.provider = provider
        # perf_counter -> epoch ns (flow.started is a perf_counter reading)
        self._epoch_offset_ns = time.time_ns() - time.perf_counter_ns()
        self._spans: dict[CallFlow, tuple[trace.Span, trace.Span | None]] = {}
        propagate.ENABLED = True

    def close(self) -> None:
        propagate.ENABLED = False
        propagate.OUTGOING.clear()

    def _start_ns(self, perf: float) -> int:
        return int(perf * 1e9) + self._epoch_offset_ns

    async def decided(self, flow: CallFlow) -> None:
        incoming = propagate.INCOMING.get()
        parent = None
        if incoming is not None:
            carrier = {"traceparent": incoming[0]}
            if incoming[1]:
                carrier["tracestate"] = incoming[1]
            parent = _PROPAGATOR.extract(carrier)
        name = f"mcp {flow.method} {flow.tool}" if flow.tool else f"mcp {flow.method}"
        d = flow.decision
        attrs: dict[str, Any] = {
            "mcp.server": flow.server,
            "mcp.method": flow.method,
            "ledgergate.grant": flow.grant.name,
            "ledgergate.agent": flow.grant.agent,
            "ledgergate.call_id": flow.call_id,
        }
        if flow.tool:
            attrs["mcp.tool"] = flow.tool
        if d is not None:
            attrs["ledgergate.decision"] = d.action
            if d.rule:
                attrs["ledgergate.rule"] = d.rule
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes=attrs,
            start_time=self._start_ns(flow.started),
        )
        ctx = trace.set_span_in_context(span)
        append = self.tracer.start_span("eventlog.append", context=ctx)
        try:
            await self.inner.decided(flow)
        except BaseException as exc:
            # the call is answered 503 and completed() is never called for it: end here
            append.record_exception(exc)
            append.set_status(Status(StatusCode.ERROR, "the decision could not be recorded"))
            append.end()
            span.set_attribute("ledgergate.outcome", "upstream_error")
            span.set_status(Status(StatusCode.ERROR, "audit log unavailable"))
            span.end()
            raise
        append.end()
        up = None
        if d is not None and d.allowed:
            up = self.tracer.start_span(
                f"upstream {flow.server}",
                context=ctx,
                kind=SpanKind.CLIENT,
                attributes={"mcp.server": flow.server},
            )
            propagate.OUTGOING[flow] = traceparent_of(up)
        self._spans[flow] = (span, up)

    def completed(self, flow: CallFlow) -> None:
        self.inner.completed(flow)
        spans = self._spans.pop(flow, None)
        if spans is None:
            return
        propagate.OUTGOING.pop(flow, None)
        span, up = spans
        outcome = flow.outcome or "none"
        if up is not None:
            if flow.upstream_ms is not None:
                up.set_attribute("ledgergate.upstream_ms", flow.upstream_ms)
            if outcome in _ERROR_OUTCOMES:
                up.set_status(Status(StatusCode.ERROR, flow.error_message or outcome))
            up.end()
        span.set_attribute("ledgergate.outcome", outcome)
        if flow.error_code is not None:
            span.set_attribute("ledgergate.error_code", flow.error_code)
        if outcome in _ERROR_OUTCOMES:
            span.set_status(Status(StatusCode.ERROR, flow.error_message or outcome))
        span.end()
