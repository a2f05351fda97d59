"""What every upstream transport offers the proxy (HTTP relay, stdio supervisor).

A transport only transports: it forwards what the proxy hands it (an `Inbound`) and
returns what the upstream said (an `UpstreamReply`: a status, headers, and either one
JSON body or a stream of events). It never writes the agent's response, never records
an outcome and never touches the session registry; the proxy does all three.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.edge import Request

if TYPE_CHECKING:
    from gateway.mcp.sessions import Session


@dataclass(slots=True, eq=False)
class Inbound:
    """One agent message as the proxy parsed and decided on it: what a transport may forward.

    Only `message` goes upstream (re-serialised by the transport), never the agent's bytes.
    """

    message: dict[str, Any] | None  # None for GET and DELETE
    headers: Mapping[str, str]  # the agent's headers, case-insensitive (a transport forwards a few)
    request: Request | None = None  # the agent's connection, to abort (None in unit tests)
    started: bool = False  # the answer's head went out: an error can only close the connection
    traceparent: str | None = None  # W3C trace context for the upstream (tracing on only)

    @property
    def remote(self) -> str | None:
        return self.request.remote if self.request is not None else None

    @property
    def accepts_sse(self) -> bool:
        return "text/event-stream" in self.headers.get("Accept", "")

    def abort(self) -> None:
        """Close the agent's connection at once (a stream it does not read): its writes then fail."""
        transport = self.request.transport if self.request is not None else None
        if transport is not None:
            transport.abort()


@dataclass(slots=True, eq=False)
class Event:
    """One message of an upstream's answer stream (an SSE event, or a line of a stdio child)."""

    message: dict[str, Any] | None  # the JSON-RPC message; None when the event carries none
    raw: bytes | None = (
        None  # the upstream's own SSE framing, relayed unchanged; None: the proxy frames `message`
    )
    data: bytes | None = None  # the message's JSON text as the upstream sent it (with `raw`)
    final: bool = False  # the response to the forwarded request


@dataclass(slots=True, eq=False)
class UpstreamReply:
    """What the upstream answered: a status and headers, then a body or a stream of events.

    Exactly one of `body` (bytes as received), `message` (one JSON-RPC message the proxy
    serialises) and `events` (relayed as SSE, event by event, never buffered) is set, or
    none (an empty answer, e.g. 202).
    """

    status: int
    headers: dict[str, str]  # to relay to the agent (Content-Type...); never Mcp-Session-Id
    body: bytes | None = None
    message: dict[str, Any] | None = None
    events: AsyncGenerator[Event, None] | None = None
    upstream_session: str | None = None  # the upstream's Mcp-Session-Id, if it gave one
    release: Callable[[], None] | None = None  # the proxy calls it once done with `events`
    sent: bool = True  # False: answered without reaching the upstream (a call is then refunded)
    # set by a transport that disconnected the agent (a stream it did not read): why
    dropped: str | None = None


class Refused(Exception):
    """An agent message the transport will not forward (answered with `status`, a 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamFailed(Exception):
    """The upstream could not answer: unreachable, timed out, died, or broke the stream.

    `sent` tells whether the request reached the upstream (a call never sent is refunded).
    """

    def __init__(self, code: int, message: str, data: dict[str, Any], *, sent: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.sent = sent


class Upstream(abc.ABC):
    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open pools; start nothing that a request can start lazily."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def request(self, inbound: Inbound, session: Session, initialize: bool) -> UpstreamReply:
        """Forward one allowed JSON-RPC request; return the upstream's answer.

        Raises Refused (nothing sent) or UpstreamFailed. A stream's events iterator raises
        UpstreamFailed when the upstream breaks it, and ConnectionResetError once the
        transport disconnected the agent (`reply.dropped` says why).
        """

    @abc.abstractmethod
    async def send(self, inbound: Inbound, session: Session) -> UpstreamReply:
        """Forward a notification or a response from the agent (202, or the upstream's answer).

        Only what the gateway serialises from `inbound.message` goes upstream.
        """

    @abc.abstractmethod
    async def open_stream(self, inbound: Inbound, session: Session) -> UpstreamReply:
        """The GET server-to-client stream (or the upstream's refusal, e.g. 405)."""

    @abc.abstractmethod
    async def delete(self, inbound: Inbound, session: Session) -> UpstreamReply:
        """DELETE: end the session upstream; the proxy closes it when this succeeds."""

    def close_session(self, session: Session, reason: str) -> None:  # noqa: B027 - optional hook
        """The gateway ended `session` (deleted, expired, upstream_gone, shutdown): free what it holds."""
