"""The addon chain: each concern (audit log, metrics, alerts) is a hook on a flow.

`decided` is awaited before an allowed call is forwarded (write-ahead audit); the other
hooks must not block: they queue their work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session


class Addon:
    async def decided(self, flow: CallFlow) -> None:
        """The decision is made; an allowed call is forwarded once every addon returned."""

    def completed(self, flow: CallFlow) -> None:
        """The call ended (answered, refused, failed); flow.outcome says how."""

    def session_opened(self, session: Session) -> None: ...

    def session_closed(self, session: Session, reason: str) -> None: ...

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None: ...


class AddonChain(Addon):
    def __init__(self, addons: list[Addon] | None = None) -> None:
        self.addons: list[Addon] = list(addons or [])

    def add(self, addon: Addon) -> None:
        self.addons.append(addon)

    async def decided(self, flow: CallFlow) -> None:
        for a in self.addons:
            await a.decided(flow)

    def completed(self, flow: CallFlow) -> None:
        for a in self.addons:
            a.completed(flow)

    def session_opened(self, session: Session) -> None:
        for a in self.addons:
            a.session_opened(session)

    def session_closed(self, session: Session, reason: str) -> None:
        for a in self.addons:
            a.session_closed(session, reason)

    def policy_loaded(self, server: str, path: str, version: str | None, error: str | None) -> None:
        for a in self.addons:
            a.policy_loaded(server, path, version, error)
