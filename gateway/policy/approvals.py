"""Human approval of held calls: a pure state machine (no clock reads, no asyncio, no I/O).

Time is always passed in (``now``, UTC seconds). The proxy owns the waiting: it creates a
request when decide() says ``approval_required``, awaits a future of its own, and resolves
it from what `approve` / `deny` / `cancel` / `expire` return.

States of a request: pending -> approved | denied | timed_out | cancelled (the client hung
up, or the gateway stops). A resolved request leaves `pending()`; its `Resolution` stays
readable (`resolution(id)`) for a while so that a late `approve ID` says "already denied"
instead of "unknown".

Remember: approving a request whose rule has ``remember`` (seconds > 0) lets the same
(server, grant, tool, args_sha256) pass without asking until ``now + remember_s``;
`remembered()` is the view decide() reads (``approvals=``). "once" remembers nothing.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ApprovalError", "Approvals", "PendingApproval", "Resolution"]

Outcome = Literal["approved", "denied", "timed_out", "cancelled"]
Key = tuple[str, str, str, str]  # (server, grant, tool, args_sha256)

MAX_RESOLVED = 10_000  # resolutions kept for late answers
MAX_REMEMBERED = 100_000  # remembered approvals kept (the soonest to expire go first)


class ApprovalError(ValueError):
    """An approve/deny that cannot apply: unknown id, or already resolved (says how)."""


@dataclass(frozen=True, slots=True)
class PendingApproval:
    id: str
    server: str
    grant: str
    agent: str
    session: str | None
    tool: str
    args_sha256: str
    arguments: Mapping[str, Any] | None  # REDACTED arguments, for the approver to read
    rule: str  # the JSON Pointer that asked for approval
    requested_at: float
    expires_at: float
    remember_s: int
    call_id: str | None = None

    @property
    def key(self) -> Key:
        return (self.server, self.grant, self.tool, self.args_sha256)


@dataclass(frozen=True, slots=True)
class Resolution:
    id: str
    outcome: Outcome
    by: str | None  # who approved / denied ("cli:alice", "token", ...); None for timeout/cancel
    at: float
    comment: str | None
    request: PendingApproval
    remembered_until: float | None = None  # approved with remember: the cache entry's expiry

    @property
    def approved(self) -> bool:
        return self.outcome == "approved"

    @property
    def waited_s(self) -> float:
        return max(0.0, self.at - self.request.requested_at)


def _new_id() -> str:
    return secrets.token_hex(4)  # short enough to type in `ledgergate approvals approve ID`


@dataclass
class Approvals:
    """Pending requests, their resolutions and the remember cache."""

    new_id: Callable[[], str] = _new_id
    _pending: dict[str, PendingApproval] = field(default_factory=dict)
    _resolved: OrderedDict[str, Resolution] = field(default_factory=OrderedDict)
    _remember: dict[Key, float] = field(default_factory=dict)

    # ------------------------------------------------------------ requests

    def request(
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
        now: float,
        session: str | None = None,
        arguments: Mapping[str, Any] | None = None,
        call_id: str | None = None,
    ) -> PendingApproval:
        """Hold one call for a human; it times out at ``now + timeout_s``."""
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        rid = self.new_id()
        while rid in self._pending or rid in self._resolved:
            rid = self.new_id()
        req = PendingApproval(
            rid,
            server,
            grant,
            agent,
            session,
            tool,
            args_sha256,
            arguments,
            rule,
            now,
            now + timeout_s,
            remember_s,
            call_id,
        )
        self._pending[rid] = req
        return req

    def pending(self) -> list[PendingApproval]:
        """The requests waiting, oldest first."""
        return sorted(self._pending.values(), key=lambda r: (r.requested_at, r.id))

    def get(self, rid: str) -> PendingApproval | None:
        return self._pending.get(rid)

    def resolution(self, rid: str) -> Resolution | None:
        return self._resolved.get(rid)

    def next_deadline(self) -> float | None:
        """When the next pending request times out (for the proxy's timer), or None."""
        return min((r.expires_at for r in self._pending.values()), default=None)

    # ------------------------------------------------------------ transitions

    def _take(self, rid: str, now: float) -> PendingApproval:
        req = self._pending.get(rid)
        if req is None:
            done = self._resolved.get(rid)
            if done is not None:
                raise ApprovalError(f"approval {rid} is already {done.outcome.replace('_', ' ')}")
            raise ApprovalError(f"no pending approval {rid}")
        if now >= req.expires_at:  # too late: the timeout wins, whatever the order of events
            self._finish(Resolution(rid, "timed_out", None, req.expires_at, None, req))
            raise ApprovalError(f"approval {rid} is already timed out")
        return req

    def _finish(self, res: Resolution) -> Resolution:
        self._pending.pop(res.id, None)
        self._resolved[res.id] = res
        while len(self._resolved) > MAX_RESOLVED:
            self._resolved.popitem(last=False)
        return res

    def approve(self, rid: str, by: str | None, now: float, comment: str | None = None) -> Resolution:
        req = self._take(rid, now)
        until = None
        if req.remember_s > 0:
            until = now + req.remember_s
            self._remember[req.key] = max(until, self._remember.get(req.key, 0.0))
            if len(self._remember) > MAX_REMEMBERED:
                self.expire(now)
                if len(self._remember) > MAX_REMEMBERED:
                    for k in sorted(self._remember, key=self._remember.__getitem__)[
                        : len(self._remember) - MAX_REMEMBERED
                    ]:
                        del self._remember[k]
        return self._finish(Resolution(rid, "approved", by, now, comment, req, until))

    def deny(self, rid: str, by: str | None, now: float, comment: str | None = None) -> Resolution:
        req = self._take(rid, now)
        return self._finish(Resolution(rid, "denied", by, now, comment, req))

    def cancel(self, rid: str, now: float, comment: str | None = "client went away") -> Resolution | None:
        """The caller no longer waits (client hung up, shutdown); None if not pending."""
        req = self._pending.get(rid)
        if req is None:
            return None
        return self._finish(Resolution(rid, "cancelled", None, now, comment, req))

    def expire(self, now: float) -> list[Resolution]:
        """Time out the requests whose deadline has passed; drop expired remembered approvals."""
        out = [
            self._finish(Resolution(r.id, "timed_out", None, r.expires_at, None, r))
            for r in sorted(self._pending.values(), key=lambda r: r.expires_at)
            if r.expires_at <= now
        ]
        for k in [k for k, exp in self._remember.items() if exp <= now]:
            del self._remember[k]
        return out

    # ------------------------------------------------------------ remember

    def remembered(self) -> Mapping[Key, float]:
        """{(server, grant, tool, args_sha256): expires_at}: pass as decide(approvals=...).
        Live view (no copy); decide() compares with its own ``now``."""
        return self._remember
