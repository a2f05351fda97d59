"""The gateway's one set of held calls: the pure state machine (gateway.policy.approvals)
plus an asyncio future per pending request and the events.

The proxy holds a call with `hold()` (it emits approval.requested) and awaits the
returned future; approvers resolve it with `approve` / `deny` (admin API, CLI); the
waiter itself times it out (`timeout`) or cancels it (`cancel`: the client hung up, the
gateway stops). Every resolution emits approval.resolved and resolves the future exactly
once, whoever came first. `remembered()` is the live view decide() reads (``approvals=``).

Time: ``clock`` (the proxy's wall clock, UTC seconds) stamps requests and resolutions;
the WAIT itself is measured on the event loop's monotonic clock by the proxy, so a held
call times out after ``timeout`` real seconds even under a test's fake wall clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from gateway.audit.hooks import Addon
from gateway.policy.approvals import ApprovalError, Approvals, PendingApproval, Resolution

__all__ = ["ApprovalError", "LiveApprovals"]

log = logging.getLogger("ledgergate.approvals")


class LiveApprovals:
    def __init__(self, addons: Addon, clock: Callable[[], float]) -> None:
        self.state = Approvals()
        self.addons = addons
        self.clock = clock
        self._futures: dict[str, asyncio.Future[Resolution]] = {}

    def remembered(self) -> Mapping[tuple[str, str, str, str], float]:
        return self.state.remembered()

    def hold(
        self,
        *,
        server: str,
        grant: str,
        agent: str,
        tool: str,
        args_sha256: str,
        timeout_s: float,
        remember_s: int,
        rule: str,
        session: str | None,
        arguments: Mapping[str, Any] | None,
        call_id: str | None,
    ) -> tuple[PendingApproval, asyncio.Future[Resolution]]:
        """Register a held call; returns the request and the future its resolution sets."""
        req = self.state.request(
            server=server,
            grant=grant,
            agent=agent,
            tool=tool,
            args_sha256=args_sha256,
            timeout_s=timeout_s,
            remember_s=remember_s,
            rule=rule,
            now=self.clock(),
            session=session,
            arguments=arguments,
            call_id=call_id,
        )
        fut: asyncio.Future[Resolution] = asyncio.get_running_loop().create_future()
        self._futures[req.id] = fut
        self.addons.approval_requested(req)
        log.info("call %s held for approval %s (%s %s, grant %s)", call_id, req.id, server, tool, grant)
        return req, fut

    def pending(self) -> list[PendingApproval]:
        return self.state.pending()

    def _done(self, res: Resolution) -> Resolution:
        fut = self._futures.pop(res.id, None)
        if fut is not None and not fut.done():
            fut.set_result(res)
        self.addons.approval_resolved(res)
        return res

    def approve(self, rid: str, by: str | None, comment: str | None = None) -> Resolution:
        """ApprovalError when unknown or already resolved (the message says how)."""
        try:
            res = self.state.approve(rid, by, self.clock(), comment)
        except ApprovalError:
            self._flush_late_timeout(rid)
            raise
        return self._done(res)

    def deny(self, rid: str, by: str | None, comment: str | None = None) -> Resolution:
        try:
            res = self.state.deny(rid, by, self.clock(), comment)
        except ApprovalError:
            self._flush_late_timeout(rid)
            raise
        return self._done(res)

    def _flush_late_timeout(self, rid: str) -> None:
        # the state machine times a request out when an answer comes after its deadline:
        # the waiter must learn it too
        res = self.state.resolution(rid)
        if res is not None and rid in self._futures:
            self._done(res)

    def timeout(self, rid: str) -> Resolution | None:
        """The waiter's deadline passed (monotonic): time the request out, whatever the clock."""
        req = self.state.get(rid)
        if req is None:
            return None
        for res in self.state.expire(max(self.clock(), req.expires_at)):
            self._done(res)
        return self.state.resolution(rid)

    def cancel(self, rid: str, comment: str) -> Resolution | None:
        res = self.state.cancel(rid, self.clock(), comment)
        return None if res is None else self._done(res)

    def cancel_all(self, comment: str) -> int:
        """The gateway stops: every held call is refused with ``comment``."""
        n = 0
        for req in self.state.pending():
            if self.cancel(req.id, comment) is not None:
                n += 1
        return n

    def as_json(self, req: PendingApproval) -> dict[str, Any]:
        """One pending request for `GET /admin/approvals` and `ledgergate approvals list`."""
        now = self.clock()
        return {
            "id": req.id,
            "server": req.server,
            "tool": req.tool,
            "grant": req.grant,
            "agent": req.agent,
            "session": req.session,
            "arguments": req.arguments,
            "args_sha256": req.args_sha256,
            "rule": req.rule,
            "requested_at": req.requested_at,
            "expires_at": req.expires_at,
            "waiting_s": round(max(0.0, now - req.requested_at), 3),
            "expires_in_s": round(max(0.0, req.expires_at - now), 3),
            "remember_s": req.remember_s,
            "call_id": req.call_id,
        }


def resolution_json(res: Resolution) -> dict[str, Any]:
    return {
        "id": res.id,
        "outcome": res.outcome,
        "by": res.by,
        "at": res.at,
        "comment": res.comment,
        "server": res.request.server,
        "tool": res.request.tool,
        "grant": res.request.grant,
        "remembered_until": res.remembered_until,
    }
