"""The addon chain: each concern (audit log, metrics, alerts) is a hook on a flow.

`decided` is awaited before an allowed call is forwarded (write-ahead audit); the other
hooks must not block: they queue their work.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session
    from gateway.policy.approvals import PendingApproval, Resolution


@dataclass(slots=True)
class AdminRequest:
    """One admin API request (or local CLI question) as it was answered.

    ``action`` is the question (who / calls / denials / sql) or ``reload``; ``status`` the
    HTTP status (None for local); ``error`` the error kind of gateway.admin.classify_error."""

    action: str
    caller: str = "token"
    remote: str | None = None
    sql: str | None = None
    params: dict[str, Any] | None = None
    filters: dict[str, str] | None = None
    status: int | None = None
    error: str | None = None
    message: str | None = None
    row_count: int | None = None
    results: dict[str, str | None] | None = None
    started: float = field(default_factory=time.perf_counter)


class Addon:
    async def decided(self, flow: CallFlow) -> None:
        """The decision is made; an allowed call is forwarded once every addon returned."""

    def completed(self, flow: CallFlow) -> None:
        """The call ended (answered, refused, failed); flow.outcome says how."""

    def session_opened(self, session: Session) -> None: ...

    def session_closed(self, session: Session, reason: str) -> None: ...

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None: ...

    def auth_failed(self, remote: str | None, server: str, reason: str) -> None:
        """A request was refused for its credentials (401). Called for every failure, so
        under a flood: cheap, never blocking (the audit addon aggregates)."""

    def admin_request(self, request: AdminRequest) -> None:
        """An admin API request was answered (or refused)."""

    def approval_requested(self, request: PendingApproval) -> None:
        """A call is held for a human (its arguments already redacted)."""

    def approval_resolved(self, resolution: Resolution) -> None:
        """A held call was approved, denied, timed out or cancelled."""

    def config_loaded(
        self,
        path: str,
        sha256: str | None,
        error: str | None,
        applied: list[str],
        restart_needed: list[str],
    ) -> None:
        """The config file was (re)loaded (error: it was not, the old config stays)."""


class AddonChain(Addon):
    def __init__(self, addons: list[Addon] | None = None) -> None:
        self.addons: list[Addon] = list(addons or [])
        self._per_call()

    def add(self, addon: Addon) -> None:
        self.addons.append(addon)
        self._per_call()

    def _per_call(self) -> None:
        # the per-call hooks of the addons that override them: an inherited no-op costs a
        # call per call (for decided a coroutine too), and most addons only count completions
        self._decided = [a.decided for a in self.addons if type(a).decided is not Addon.decided]
        self._completed = [a.completed for a in self.addons if type(a).completed is not Addon.completed]

    def decided(self, flow: CallFlow) -> Coroutine[Any, Any, None]:
        hooks = self._decided
        if len(hooks) == 1:  # the audit addon alone: its coroutine, without a frame around it
            return hooks[0](flow)
        return self._decided_all(flow)

    async def _decided_all(self, flow: CallFlow) -> None:
        for hook in self._decided:
            await hook(flow)

    def completed(self, flow: CallFlow) -> None:
        for hook in self._completed:
            hook(flow)

    def session_opened(self, session: Session) -> None:
        for a in self.addons:
            a.session_opened(session)

    def session_closed(self, session: Session, reason: str) -> None:
        for a in self.addons:
            a.session_closed(session, reason)

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None:
        for a in self.addons:
            a.policy_loaded(server, path, version, error)

    def auth_failed(self, remote: str | None, server: str, reason: str) -> None:
        for a in self.addons:
            a.auth_failed(remote, server, reason)

    def admin_request(self, request: AdminRequest) -> None:
        for a in self.addons:
            a.admin_request(request)

    def approval_requested(self, request: PendingApproval) -> None:
        for a in self.addons:
            a.approval_requested(request)

    def approval_resolved(self, resolution: Resolution) -> None:
        for a in self.addons:
            a.approval_resolved(resolution)

    def config_loaded(
        self,
        path: str,
        sha256: str | None,
        error: str | None,
        applied: list[str],
        restart_needed: list[str],
    ) -> None:
        for a in self.addons:
            a.config_loaded(path, sha256, error, applied, restart_needed)
