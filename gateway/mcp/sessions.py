"""MCP sessions as the gateway issues them: one per initialize, bound to a server and a grant."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.auth import Grant

SUPPORTED_VERSIONS = frozenset({"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"})
MODERN_VERSIONS = ("2026-07-28",)


@dataclass(eq=False)
class Session:
    id: str
    server: str
    grant: Grant
    remote: str | None = None
    protocol_version: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    upstream_session: str | None = None
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    active: int = 0  # open requests and streams: an active session never expires
    upstream_gone: bool = False  # the upstream ended its side (HTTP 404): closed at the next request

    def touch(self) -> None:
        self.last_seen = time.monotonic()


def new_session_id() -> str:
    # visible ASCII, 256 bits of randomness
    return secrets.token_urlsafe(32)


class SessionRegistry:
    def __init__(self, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._per_grant: dict[str, int] = {}  # grant name -> open sessions (max_sessions_per_grant)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, sid: str) -> Session | None:
        return self._sessions.get(sid)

    def add(self, session: Session) -> None:
        if session.id not in self._sessions:
            g = session.grant.name
            self._per_grant[g] = self._per_grant.get(g, 0) + 1
        self._sessions[session.id] = session

    def remove(self, sid: str) -> Session | None:
        s = self._sessions.pop(sid, None)
        if s is not None:
            self._forget(s)
        return s

    def _forget(self, s: Session) -> None:
        g = s.grant.name
        n = self._per_grant.get(g, 0) - 1
        if n > 0:
            self._per_grant[g] = n
        else:
            self._per_grant.pop(g, None)

    def count(self, grant: str) -> int:
        """Open sessions of the grant named `grant`."""
        return self._per_grant.get(grant, 0)

    def retry_after(self, grant: str) -> float:
        """Seconds until the grant's next idle session expires (the idle timeout if all are busy)."""
        now = self._clock()
        waits = [
            s.last_seen + self.idle_timeout_s - now
            for s in self._sessions.values()
            if s.grant.name == grant and s.active <= 0
        ]
        return max(0.0, min(waits)) if waits else self.idle_timeout_s

    def idle(self) -> list[Session]:
        """The sessions idle for longer than the timeout (the proxy closes them)."""
        now = self._clock()
        return [
            s for s in self._sessions.values() if s.active <= 0 and now - s.last_seen > self.idle_timeout_s
        ]
