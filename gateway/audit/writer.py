"""Write-ahead audit: every decision goes on the event log before the call is forwarded.

`decided()` appends the call.decided event and returns once the log says it is durable
(strict: fsync'd / acked; batched: queued, durable within the flush interval). Other
events (call.completed, session.*, policy.loaded, auth.failed, admin.*) are queued and ride
along with the next decided append, or are flushed by a short timer, so they never cost a
commit of their own.

Failed authentication is aggregated (AuthFailures): a flood of 401s from one address costs
one dict update per request and about one event per (address, server, reason) and interval.

Events are built by the fast builders of schemas/events.py (plain dicts in the exact
shape and field order of its pydantic models; tests/schemas/test_events.py pins that)
and serialised with orjson: building the pydantic models on every call costs more than
the rest of the hot path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from eventlog.base import EventLog
from gateway.audit.hooks import Addon, AdminRequest
from gateway.audit.redaction import args_sha256, redact
from gateway.mcp.jsonrpc import id_text
from schemas import events as E

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session
    from gateway.policy.approvals import PendingApproval, Resolution
    from gateway.policy.live import PolicySet

log = logging.getLogger("ledgergate.audit")

MAX_SERVER_CHARS = 200  # the server name of a 401 comes from the path: attacker-chosen text
MAX_MESSAGE_CHARS = 2000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _text(value: str) -> str:
    """Request text as valid UTF-8: paths and headers are decoded with surrogateescape, and
    orjson refuses lone surrogates (one such request must not break the audit batch)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class _Bucket:
    __slots__ = ("count", "first_ms", "last_ms", "window_end")

    def __init__(self, window_end: float) -> None:
        self.window_end = window_end
        self.count = 0
        self.first_ms = 0
        self.last_ms = 0


# (remote, server, reason, count, first_ms, last_ms, overflow)
AuthSummary = tuple[str | None, str, str, int, int, int, bool]


class AuthFailures:
    """Auth failures summed per (remote, server, reason), bounded in time and memory.

    The first failure of a key opens an interval and is reported at once (count 1); the
    failures that follow within the interval are summed and reported by ``sweep`` when it
    ends, which opens the next interval; a key with no failure in its interval is dropped.
    So a key yields at most one event per interval, and the counts of its events add up
    to its failures. At most ``max_keys`` keys are tracked: failures of further keys are
    summed per reason into an overflow bucket (remote and server "*"), so memory and the
    events per interval stay bounded whatever the attacker varies (addresses, paths).
    ``now`` is monotonic seconds (windows), ``ts_ms`` wall-clock ms (what is reported).
    """

    def __init__(self, interval_s: float = 1.0, max_keys: int = 1024) -> None:
        if interval_s <= 0 or max_keys <= 0:
            raise ValueError("interval_s and max_keys must be > 0")
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._buckets: dict[tuple[str | None, str, str], _Bucket] = {}
        self._overflow: dict[str, _Bucket] = {}

    def __len__(self) -> int:
        return len(self._buckets) + len(self._overflow)

    def record(
        self, remote: str | None, server: str, reason: str, now: float, ts_ms: int
    ) -> AuthSummary | None:
        """Count one failure; returns the summary to report now (a key's first failure)."""
        server = server[:MAX_SERVER_CHARS]
        key = (remote, server, reason)
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) < self.max_keys:
                self._buckets[key] = _Bucket(now + self.interval_s)
                return (remote, server, reason, 1, ts_ms, ts_ms, False)
            b = self._overflow.get(reason)
            if b is None:
                self._overflow[reason] = _Bucket(now + self.interval_s)
                return ("*", "*", reason, 1, ts_ms, ts_ms, True)
        if b.count == 0:
            b.first_ms = ts_ms
        b.count += 1
        b.last_ms = ts_ms
        return None

    def sweep(self, now: float) -> list[AuthSummary]:
        """The summaries of the intervals that ended by ``now``."""
        out: list[AuthSummary] = []
        for table, overflow in ((self._buckets, False), (self._overflow, True)):
            done = []
            for key, b in table.items():
                if b.window_end > now:
                    continue
                if b.count == 0:
                    done.append(key)
                    continue
                if overflow:
                    out.append(("*", "*", key, b.count, b.first_ms, b.last_ms, True))  # type: ignore[arg-type]
                else:
                    remote, server, reason = key  # type: ignore[misc]
                    out.append((remote, server, reason, b.count, b.first_ms, b.last_ms, False))
                b.count = 0
                b.window_end = now + self.interval_s
            for key in done:
                del table[key]  # type: ignore[arg-type]
        return out

    def drain(self) -> list[AuthSummary]:
        """Every pending sum, whatever its interval (shutdown); forgets every key."""
        out = self.sweep(float("inf"))
        self._buckets.clear()
        self._overflow.clear()
        return out


class AuditAddon(Addon):
    def __init__(
        self,
        eventlog: EventLog,
        instance_id: str,
        policies: PolicySet | None = None,
        flush_interval_s: float = 0.005,
        server_redact: dict[str, list[str]] | None = None,
        auth_failure_interval_s: float = 1.0,
        auth_failure_max_keys: int = 1024,
    ) -> None:
        self.log = eventlog
        self.instance = instance_id
        self.policies = policies
        self.server_redact = server_redact or {}
        self.flush_interval_s = flush_interval_s
        self._pending: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self.auth_failures = AuthFailures(auth_failure_interval_s, auth_failure_max_keys)
        self._sweep_timer: asyncio.TimerHandle | None = None

    # ---- the write-ahead part --------------------------------------------------------------

    async def decided(self, flow: CallFlow) -> None:
        payload = E.call_decided_bytes(*self._decided_fields(flow))
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
        """The call.decided event as a dict (decided() writes the same as bytes)."""
        return E.call_decided(*self._decided_fields(flow))

    def _decided_fields(self, flow: CallFlow) -> tuple[Any, ...]:
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
        rid = flow.request_id
        grant = flow.grant
        risk = flow.risk
        # by position, in CallDecided's field order: keyword arguments cost ~1 us per event
        return (
            self.instance,
            flow.call_id,
            flow.server,
            flow.method,
            flow.tool,
            None if rid is None else str(rid) if type(rid) is int else id_text(rid),  # JSON text
            grant.name,
            grant.agent,
            session.id if session is not None else None,
            session.protocol_version if session is not None else None,
            session.client_name if session is not None else None,
            session.client_version if session is not None else None,
            flow.remote,
            stored,  # arguments
            args_sha256(args) if args is not None else None,
            "allow" if d.shadow else d.action,  # decision: a shadowed call was forwarded
            d.rule,
            d.reason,
            d.retry_after_s,
            [
                E.counter_state(
                    s.key.counter, s.key.scope, s.key.key, s.key.window_s, s.key.window_start, s.count, s.max
                )
                for s in d.counters
            ],
            [E.counter_charge(k.counter, k.key, k.scope, k.window_start, k.window_s) for k in d.charges],
            flow.policy_version,
            d.shadow,
            d.action if d.shadow else None,  # would_decision: what enforcement would have done
            risk.cls if risk is not None else None,
            risk.level if risk is not None else None,
        )

    # ---- queued events ----------------------------------------------------------------------

    def completed(self, flow: CallFlow) -> None:
        session = flow.session
        grant = flow.grant
        up = flow.upstream_ms
        self._pending.append(
            E.call_completed_bytes(  # by position, in CallCompleted's field order (one per call)
                self.instance,
                flow.call_id,
                flow.server,
                flow.method,
                flow.tool,
                grant.name,
                grant.agent,
                session.id if session is not None else None,
                flow.outcome or "cancelled",
                flow.error_code,
                flow.error_message,
                None if up is None else round(up, 3),
                flow.response_bytes,
                flow.answered,
                flow.refunded,  # the counter rebuild gives these charges back
            )
        )
        if self._timer is None:
            self._arm()

    def session_opened(self, session: Session) -> None:
        ev = E.session_opened(
            gateway=self.instance,
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
        ev = E.session_closed(
            gateway=self.instance,
            session=session.id,
            server=session.server,
            grant=session.grant.name,
            agent=session.grant.agent,
            reason=reason,
        )
        self._queue(ev)

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None:
        ev = E.policy_loaded(
            gateway=self.instance,
            server=server,
            path=path,
            policy_version=version,
            ok=error is None,
            error=error,
        )
        self._queue(ev)

    # ---- held calls and config reloads ---------------------------------------------------

    def approval_requested(self, request: PendingApproval) -> None:
        r = request
        self._queue(
            E.approval_requested(
                gateway=self.instance,
                approval_id=r.id,
                call_id=r.call_id,
                server=r.server,
                tool=r.tool,
                grant=r.grant,
                agent=r.agent,
                session=r.session,
                arguments=None if r.arguments is None else dict(r.arguments),
                args_sha256=r.args_sha256,
                rule=r.rule,
                timeout_s=float(r.expires_at - r.requested_at),
                expires_ts=int(r.expires_at * 1000),
                remember_s=r.remember_s,
            )
        )

    def approval_resolved(self, resolution: Resolution) -> None:
        res = resolution
        r = res.request
        self._queue(
            E.approval_resolved(
                gateway=self.instance,
                approval_id=res.id,
                call_id=r.call_id,
                server=r.server,
                tool=r.tool,
                grant=r.grant,
                agent=r.agent,
                outcome=res.outcome,
                by=None if res.by is None else _text(res.by),
                comment=None if res.comment is None else _text(res.comment[:MAX_MESSAGE_CHARS]),
                resolved_ts=int(res.at * 1000),
                waited_ms=int(res.waited_s * 1000),
                remembered_until_ts=None if res.remembered_until is None else int(res.remembered_until * 1e3),
            )
        )

    def config_loaded(
        self,
        path: str,
        sha256: str | None,
        error: str | None,
        applied: list[str],
        restart_needed: list[str],
    ) -> None:
        self._queue(
            E.config_loaded(
                gateway=self.instance,
                path=path,
                config_sha256=sha256,
                ok=error is None,
                error=None if error is None else _text(error[:MAX_MESSAGE_CHARS]),
                applied=list(applied),
                restart_needed=list(restart_needed),
            )
        )

    # ---- security events -------------------------------------------------------------------

    def auth_failed(self, remote: str | None, server: str, reason: str) -> None:
        summary = self.auth_failures.record(remote, server, reason, time.monotonic(), _now_ms())
        if summary is not None:
            self._queue(self.auth_event(summary))
        if self._sweep_timer is None and self.auth_failures:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._sweep_timer = loop.call_later(self.auth_failures.interval_s, self._sweep)

    def _sweep(self) -> None:
        self._sweep_timer = None
        for summary in self.auth_failures.sweep(time.monotonic()):
            self._queue(self.auth_event(summary))
        if self.auth_failures:
            self._sweep_timer = asyncio.get_running_loop().call_later(
                self.auth_failures.interval_s, self._sweep
            )

    def auth_event(self, summary: AuthSummary) -> dict[str, Any]:
        remote, server, reason, count, first_ms, last_ms, overflow = summary
        return E.auth_failed(
            gateway=self.instance,
            remote=None if remote is None else _text(remote),
            server=_text(server),
            reason=reason,
            count=count,
            first_ts=first_ms,
            last_ts=last_ms,
            overflow=overflow,
        )

    def admin_request(self, request: AdminRequest) -> None:
        ev = self.admin_event(request)
        try:
            orjson.dumps(ev)
        except orjson.JSONEncodeError:  # e.g. a CLI argument that is not UTF-8
            ev["params"] = {_text(str(k)): _text(str(v)) for k, v in (ev.get("params") or {}).items()}
        self._queue(ev)

    def admin_event(self, r: AdminRequest) -> dict[str, Any]:
        if r.status is not None:
            outcome = "ok" if r.status < 400 else "refused" if r.status < 500 else "error"
        else:
            outcome = "ok" if r.error is None else "error" if r.error == "store_unavailable" else "refused"
        message = None if r.message is None else _text(r.message[:MAX_MESSAGE_CHARS])
        common = {
            "caller": r.caller,
            "remote": r.remote,
            "outcome": outcome,
            "status": r.status,
            "message": message,
            "duration_ms": round((time.perf_counter() - r.started) * 1000, 3),
        }
        if r.action == "reload":
            if outcome == "ok" and any(v is not None for v in (r.results or {}).values()):
                outcome = common["outcome"] = "error"  # a policy file did not load
            return E.admin_reload(gateway=self.instance, results=r.results or {}, **common)
        return E.admin_query(
            gateway=self.instance,
            question=r.action,
            sql=None if r.sql is None else _text(r.sql),
            params=r.params,
            filters=None if r.filters is None else {_text(k): _text(v) for k, v in r.filters.items()},
            error=r.error,
            row_count=r.row_count,
            **common,
        )

    def _queue(self, ev: dict[str, Any]) -> None:
        self._pending.append(orjson.dumps(ev))
        if self._timer is None:
            self._arm()

    def _arm(self) -> None:
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
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for summary in self.auth_failures.drain():
            self._pending.append(orjson.dumps(self.auth_event(summary)))
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._pending:
            batch, self._pending = self._pending, []
            await self.log.append(batch)
        await self.log.flush()


def instance_id(configured: str | None) -> str:
    return configured or f"{os.uname().nodename}:{os.getpid()}"
