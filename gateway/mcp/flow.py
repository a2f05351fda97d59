"""One JSON-RPC request crossing the gateway, from decision to outcome."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schemas.events import uuid7

if TYPE_CHECKING:
    from gateway.auth import Grant
    from gateway.mcp.sessions import Session
    from gateway.policy.engine import Decision
    from gateway.policy.risk import Risk


@dataclass(slots=True, eq=False)
class CallFlow:
    server: str
    method: str
    request_id: Any
    params: dict[str, Any] | None
    grant: Grant
    session: Session | None
    remote: str | None
    tool: str | None = None
    policy_version: str | None = None
    call_id: str = field(default_factory=uuid7)
    started: float = field(default_factory=time.perf_counter)
    decision: Decision | None = None
    risk: Risk | None = None  # the tool's risk class and level as the decision saw them
    # how it ended (set before addons' completed())
    outcome: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    upstream_ms: float | None = None
    response_bytes: int = 0
    forwarded_at: float | None = None
    # set by the transport once the request's bytes were handed to the upstream; a call that
    # ends with sent still False was never forwarded, and its quota charge is refunded
    sent: bool = False
    # the upstream's final answer arrived (it may still not have reached the agent)
    answered: bool = False
    # allowed and charged but never sent: its charges were given back (the rebuild honours it)
    refunded: bool = False
    # cut by the shutdown's drain timeout (the proxy cancelled it to answer with an error)
    cut: bool = False

    @property
    def arguments(self) -> dict[str, Any] | None:
        if self.params is None:
            return None
        args = self.params.get("arguments")
        return args if isinstance(args, dict) else None

    def finish(
        self, outcome: str, *, code: int | None = None, message: str | None = None, nbytes: int = 0
    ) -> None:
        self.outcome = outcome
        self.error_code = code
        self.error_message = message
        self.response_bytes = nbytes
        if self.forwarded_at is not None:
            self.upstream_ms = (time.perf_counter() - self.forwarded_at) * 1000.0

    def observe(self, msg: dict[str, Any], nbytes: int) -> None:
        """Record the outcome from the upstream's final JSON-RPC response."""
        self.answered = True
        err = msg.get("error")
        if err is not None:
            code = err.get("code") if isinstance(err, dict) else None
            text = err.get("message") if isinstance(err, dict) else None
            self.finish("jsonrpc_error", code=code, message=text, nbytes=nbytes)
            return
        result = msg.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            self.finish("is_error", nbytes=nbytes)
        else:
            self.finish("ok", nbytes=nbytes)
