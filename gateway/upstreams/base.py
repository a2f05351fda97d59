"""What every upstream transport offers the proxy (HTTP relay, stdio supervisor)."""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp.web import RequestKey, Response, StreamResponse

from gateway.edge import Request
from gateway.mcp import jsonrpc

if TYPE_CHECKING:
    from gateway.mcp.flow import CallFlow
    from gateway.mcp.sessions import Session

BODY = RequestKey("lg_body", bytes)  # the POSTed body as received
MESSAGE = RequestKey("lg_msg", dict)  # ... and parsed
# set once an answer's head went out: an error can only close the connection
STARTED = RequestKey("lg_started", bool)

# rewrites the final JSON-RPC response of a request (tools/list filtering); None = untouched
Transform = Callable[[dict[str, Any]], dict[str, Any]] | None
# called once an initialize was answered by the upstream, before the answer's headers go out
OnOpen = Callable[["Session"], None] | None


class Upstream(abc.ABC):
    name: str

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open pools; start nothing that a request can start lazily."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def request(
        self, flow: CallFlow, req: Request, session: Session, transform: Transform, on_open: OnOpen
    ) -> StreamResponse:
        """Forward one allowed JSON-RPC request and relay the answer (JSON or a streamed SSE).

        Sets the flow's outcome (flow.observe / flow.finish) before returning, `flow.sent`
        once the request was handed to the upstream (a call never sent is refunded), and
        `req[STARTED]` once a streamed answer was prepared.
        """

    @abc.abstractmethod
    async def send(self, session: Session, msg: dict[str, Any], req: Request) -> StreamResponse:
        """Forward a notification or a response from the client; answer 202 or the upstream's status.

        Only what the gateway serialises from `msg` goes upstream, never the client's bytes.
        """

    @abc.abstractmethod
    async def open_stream(self, session: Session, req: Request) -> StreamResponse:
        """The GET server-to-client stream (or 405)."""

    @abc.abstractmethod
    async def end_session(self, session: Session, req: Request) -> StreamResponse:
        """DELETE: end the session upstream too."""

    def session_closed(self, session: Session) -> None:  # noqa: B027 - optional hook
        """The gateway dropped the session (DELETE, expiry, shutdown): free what it holds."""


def abort_client(req: Request) -> None:
    """Close a client's connection at once (a stream it does not read): its writes then fail."""
    transport = req.transport
    if transport is not None:
        transport.abort()


def json_response(
    payload: dict[str, Any] | bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    return Response(body=body, status=status, content_type="application/json", headers=headers)


def error_response(
    status: int,
    code: int,
    message: str,
    id: Any = None,
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return json_response(jsonrpc.error_bytes(id, code, message, data), status=status, headers=headers)
