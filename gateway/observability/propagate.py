"""W3C trace context in and out of the gateway, without importing OpenTelemetry.

The proxy and the upstreams call these helpers on every request, so they must cost nothing
when tracing is off: ``ENABLED`` is False and each helper returns after one global read.
``gateway.observability.tracing`` (which imports OpenTelemetry) turns them on.

- ``capture(handler)`` wraps the POST handler: the incoming ``traceparent`` (and
  ``tracestate``) header is kept in a context variable for the tracing addon, which
  continues the trace (app.py wraps /mcp/{server} only when tracing is on).
- ``add_traceparent(headers, flow)``: HTTP upstreams get the traceparent of the call's
  upstream span as a header.
- ``with_meta_traceparent(msg, flow)``: stdio upstreams get it in ``params._meta.traceparent``
  (the MCP spec reserves ``_meta`` for such metadata).
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

ENABLED = False
# the incoming request's (traceparent, tracestate) while its handler runs
INCOMING: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "ledgergate_traceparent", default=None
)
# CallFlow -> traceparent of its upstream span (set by the tracing addon, removed at completed)
OUTGOING: dict[Any, str] = {}


def capture(handler: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    async def traced(req: Any) -> Any:
        tp = req.headers.get("traceparent")
        if tp is None:
            return await handler(req)
        token = INCOMING.set((tp, req.headers.get("tracestate")))
        try:
            return await handler(req)
        finally:
            INCOMING.reset(token)

    return traced


def traceparent(flow: Any) -> str | None:
    """The traceparent to send with ``flow``'s upstream request, None when not traced."""
    if not ENABLED:
        return None
    return OUTGOING.get(flow)


def add_traceparent(headers: list[tuple[str, str]], flow: Any) -> None:
    """HTTP upstream: append the ``traceparent`` header of ``flow``'s upstream span."""
    if not ENABLED:
        return
    tp = OUTGOING.get(flow)
    if tp is not None:
        headers.append(("traceparent", tp))


def in_meta(msg: dict[str, Any], tp: str) -> dict[str, Any]:
    """``msg`` with ``params._meta.traceparent`` = ``tp`` (a copy). A client's own ``_meta``
    members (progressToken...) are kept."""
    params = msg.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = meta if isinstance(meta, dict) else {}
    return {**msg, "params": {**params, "_meta": {**meta, "traceparent": tp}}}


def with_meta_traceparent(msg: dict[str, Any], flow: Any) -> dict[str, Any]:
    """stdio upstream: ``msg`` with ``params._meta.traceparent`` set (a copy; ``msg`` as is
    when not traced). A client's own ``_meta`` members (progressToken...) are kept."""
    if not ENABLED:
        return msg
    tp = OUTGOING.get(flow)
    if tp is None:
        return msg
    params = msg.get("params")
    params = params if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = meta if isinstance(meta, dict) else {}
    return {**msg, "params": {**params, "_meta": {**meta, "traceparent": tp}}}
