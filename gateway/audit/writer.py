"""Write-ahead audit: every decision goes on the event log before the call is forwarded.

`decided()` appends the call.decided event and returns once the log says it is durable
(strict: fsync'd / acked; batched: queued, durable within the flush interval). Other
events (call.completed, session.*, policy.loaded) are queued and ride along with the next
decided append, or are flushed by a short timer, so they never cost a commit of their own.

Events are built as plain dicts in the exact shape of the pydantic models in
schemas/events.py (a test validates them against those models) and serialised with
orjson: building the pydantic models on every call costs more than the rest of the
hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from eventlog.base import EventLog
from gateway.audit.hooks import Addon
from gateway.audit.redaction import args_sha256, redact
from gateway.mcp.jsonrpc import id_text
from schemas.events import SCHEMA_VERSION, uuid7

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session
    from gateway.policy.live import PolicySet

log = logging.getLogger("ledgergate.audit")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class AuditAddon(Addon):
    def __init__(
        self,
        eventlog: EventLog,
        instance_id: str,
        policies: PolicySet | None = None,
        flush_interval_s: float = 0.005,
        server_redact: dict[str, list[str]] | None = None,
    ) -> None:
        self.log = eventlog
        self.instance = instance_id
        self.policies = policies
        self.server_redact = server_redact or {}
        self.flush_interval_s = flush_interval_s
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: set[asyncio.Task[Any]] = set()

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "event_id": uuid7(),
            "ts": _now_ms(),
            "gateway": self.instance,
            "kind": kind,
        }

    # ---- the write-ahead part --------------------------------------------------------------

    async def decided(self, flow: CallFlow) -> None:
        payload = orjson.dumps(self.decided_event(flow))
        batch = self._pending
        self._pending = []
        batch.append(payload)
        try:
            await self.log.append(batch)
        except BaseException:
            # the log refused the batch (and consumed no offsets): keep the queued events
            self._pending[:0] = batch[:-1]
            raise

    def decided_event(self, flow: CallFlow) -> dict[str, Any]:
        d = flow.decision
        assert d is not None
        session = flow.session
        args = flow.arguments if flow.method == "tools/call" else None
        if args is not None:
            paths = self.server_redact.get(flow.server, [])
            if self.policies is not None:
                paths = [*paths, *self.policies[flow.server].redact_paths(flow.tool)]
            stored = redact(args, paths)
        else:
            stored = None
        ev = self._base("call.decided")
        ev.update(
            call_id=flow.call_id,
            server=flow.server,
            method=flow.method,
            tool=flow.tool,
            request_id=id_text(flow.request_id),
            grant=flow.grant.name,
            agent=flow.grant.agent,
            session=session.id if session is not None else None,
            protocol_version=session.protocol_version if session is not None else None,
            client_name=session.client_name if session is not None else None,
            client_version=session.client_version if session is not None else None,
            remote=flow.remote,
            arguments=stored,
            args_sha256=args_sha256(args) if args is not None else None,
            decision=d.action,
            rule=d.rule,
            reason=d.reason,
            retry_after_s=d.retry_after_s,
            counters=[
                {
                    "counter": s.key.counter,
                    "scope": s.key.scope,
                    "key": s.key.key,
                    "window_s": s.key.window_s,
                    "window_start": s.key.window_start,
                    "count": s.count,
                    "max": s.max,
                }
                for s in d.counters
            ],
            charges=[
                {
                    "counter": k.counter,
                    "key": k.key,
                    "scope": k.scope,
                    "window_start": k.window_start,
                    "window_s": k.window_s,
                }
                for k in d.charges
            ],
            policy_version=flow.policy_version,
        )
        return ev

    # ---- queued events ----------------------------------------------------------------------

    def completed(self, flow: CallFlow) -> None:
        ev = self._base("call.completed")
        session = flow.session
        ev.update(
            call_id=flow.call_id,
            server=flow.server,
            method=flow.method,
            tool=flow.tool,
            grant=flow.grant.name,
            agent=flow.grant.agent,
            session=session.id if session is not None else None,
            outcome=flow.outcome or "cancelled",
            error_code=flow.error_code,
            error_message=flow.error_message,
            upstream_ms=None if flow.upstream_ms is None else round(flow.upstream_ms, 3),
            response_bytes=flow.response_bytes,
        )
        self._queue(ev)

    def session_opened(self, session: Session) -> None:
        ev = self._base("session.opened")
        ev.update(
            session=session.id,
            server=session.server,
            grant=session.grant.name,
            agent=session.grant.agent,
            protocol_version=session.protocol_version,
            client_name=session.client_name,
            client_version=session.client_version,
            remote=session.remote,
        )
        self._queue(ev)

    def session_closed(self, session: Session, reason: str) -> None:
        ev = self._base("session.closed")
        ev.update(
            session=session.id,
            server=session.server,
            grant=session.grant.name,
            agent=session.grant.agent,
            reason=reason,
        )
        self._queue(ev)

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None:
        ev = self._base("policy.loaded")
        ev.update(server=server, path=path, policy_version=version, ok=error is None, error=error)
        self._queue(ev)

    def _queue(self, ev: dict[str, Any]) -> None:
        self._pending.append(orjson.dumps(ev))
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # not serving yet (policy.loaded at start-up): goes with the first flush
            self._timer = loop.call_later(self.flush_interval_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if not self._pending:
            return
        batch = self._pending
        self._pending = []
        task = asyncio.ensure_future(self.log.append(batch))
        self._inflight.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._inflight.discard(t)
            if t.cancelled() or t.exception() is not None:
                log.error(
                    "audit events could not be appended, will retry: %s",
                    "cancelled" if t.cancelled() else t.exception(),
                )
                self._pending[:0] = batch
                if self._timer is None:
                    self._timer = asyncio.get_running_loop().call_later(0.5, self._flush)

        task.add_done_callback(done)

    async def close(self) -> None:
        """Append what is queued and wait for it (shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._pending:
            batch, self._pending = self._pending, []
            await self.log.append(batch)
        await self.log.flush()


def instance_id(configured: str | None) -> str:
    return configured or f"{os.uname().nodename}:{os.getpid()}"
