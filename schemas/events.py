"""The events the gateway writes to the log: the source of truth of ledgergate.

Every event is one JSON object (orjson) with `kind`, `schema_version`, a UUIDv7
`event_id`, a millisecond UTC timestamp `ts` (integer ms since the epoch) and the
`gateway` instance id. Consumers (audit tables, counters, alerts) and the limiter's
start-up fold read nothing else.

Kinds:
- call.decided    every JSON-RPC request the gateway handles, before it is forwarded
- call.completed  how that request ended (linked by call_id)
- session.opened / session.closed
- policy.loaded   a policy file was (re)loaded, or failed to load
- auth.failed     requests refused for their credentials (401), aggregated per
                  (source address, server, reason) and interval: `count` failures
                  between `first_ts` and `last_ts`; never any key material
- admin.query     an admin API (or local CLI) forensic question: who asked what, how it ended
- admin.reload    a policy reload asked over the admin API
"""

from __future__ import annotations

import os
import random
import time
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

Decision = Literal["allow", "deny", "rate_limited", "invalid_arguments", "pending_approval"]
WouldDecision = Literal["allow", "deny", "rate_limited", "invalid_arguments", "approval_required"]
Outcome = Literal["ok", "is_error", "jsonrpc_error", "upstream_error", "refused", "cancelled"]


_rand_bits = random.Random(int.from_bytes(os.urandom(16), "big")).getrandbits


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit ms timestamp, version 7, variant 10, 74 random bits.

    Sortable by time, so event ids double as a rough order across gateway instances.
    The random bits come from a per-process PRNG seeded from os.urandom: ids must be
    unique, not secret, and a syscall per event is measurable on the hot path.
    """
    ms = time.time_ns() // 1_000_000
    rand = _rand_bits(80)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = SCHEMA_VERSION
    event_id: str = Field(default_factory=uuid7)
    ts: int = Field(default_factory=now_ms, description="UTC, milliseconds since the epoch")
    gateway: str = Field("", description="id of the gateway instance that wrote the event")


class CounterCharge(BaseModel):
    """One increment of one rate-limit counter by an allowed call.

    The limiter rebuilds its state by summing the charges of allowed `call.decided`
    events whose window has not ended yet.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    counter: str
    key: str = Field(description="scope value, e.g. the grant name; '*' for scope global")
    scope: str
    window_start: int = Field(description="UTC seconds since the epoch, aligned to the window")
    window_s: int


class CounterState(BaseModel):
    """A counter as the decision saw it (after charging, for an allowed call)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    counter: str
    scope: str
    key: str
    window_s: int
    window_start: int
    count: int
    max: int


class CallDecided(_Event):
    kind: Literal["call.decided"] = "call.decided"
    call_id: str
    server: str
    method: str
    tool: str | None = None
    request_id: str | None = Field(None, description="the JSON-RPC id, as JSON text")
    grant: str
    agent: str
    session: str | None = None
    protocol_version: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    remote: str | None = None
    arguments: dict[str, Any] | None = Field(None, description="tool arguments after redaction")
    args_sha256: str | None = Field(
        None, description="sha256 of the canonical JSON of the original arguments"
    )
    decision: Decision
    rule: str | None = Field(None, description="JSON Pointer into the policy file")
    reason: str | None = None
    retry_after_s: float | None = None
    counters: list[CounterState] = Field(default_factory=list)
    charges: list[CounterCharge] = Field(default_factory=list)
    policy_version: str | None = Field(None, description="sha256 of the policy file's bytes")
    shadow: bool = Field(False, description="shadow mode: forwarded whatever would_decision says")
    would_decision: WouldDecision | None = Field(
        None, description="shadow mode: what enforcement would have decided"
    )
    risk_class: Literal["read", "write", "delete", "execute"] | None = None
    risk_level: Literal["low", "medium", "high"] | None = None


class CallCompleted(_Event):
    kind: Literal["call.completed"] = "call.completed"
    call_id: str
    server: str
    method: str
    tool: str | None = None
    grant: str
    agent: str
    session: str | None = None
    outcome: Outcome
    error_code: int | None = None
    error_message: str | None = None
    upstream_ms: float | None = None
    response_bytes: int = 0


class SessionOpened(_Event):
    kind: Literal["session.opened"] = "session.opened"
    session: str
    server: str
    grant: str
    agent: str
    protocol_version: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    remote: str | None = None


class SessionClosed(_Event):
    kind: Literal["session.closed"] = "session.closed"
    session: str
    server: str
    grant: str
    agent: str
    reason: Literal["deleted", "expired", "upstream_gone", "shutdown"]


class PolicyLoaded(_Event):
    kind: Literal["policy.loaded"] = "policy.loaded"
    server: str
    path: str
    policy_version: str | None = None
    ok: bool = True
    error: str | None = None


AuthReason = Literal["missing_key", "wrong_scheme", "empty_key", "invalid_key"]


class AuthFailed(_Event):
    """Requests refused with 401, aggregated: under a flood one event stands for many.

    The gateway keeps, per (remote, server, reason), at most one event per interval: the
    first failure is written at once (count 1), later ones within the interval are summed
    into one event written when the interval ends. Past a cap on tracked keys, failures
    are summed per reason into an `overflow` event (remote and server "*"). Holds no key
    material at all: not the key, not a hash, not a prefix.
    """

    kind: Literal["auth.failed"] = "auth.failed"
    remote: str | None = Field(None, description="source address of the requests")
    server: str = Field(description="server name from the path, even unknown; '(admin)' for the admin API")
    reason: AuthReason
    count: int = Field(ge=1, description="failures this event stands for")
    first_ts: int = Field(description="first of them, UTC ms")
    last_ts: int = Field(description="last of them, UTC ms")
    overflow: bool = Field(False, description="summed beyond the cap on tracked (remote, server) keys")


AdminQuestion = Literal["who", "calls", "denials", "sql"]
AdminOutcome = Literal["ok", "refused", "error"]


class AdminQuery(_Event):
    """A forensic question asked over the admin API (caller "token") or by the CLI on the
    store itself (caller "local"): the auditors are audited."""

    kind: Literal["admin.query"] = "admin.query"
    question: AdminQuestion
    sql: str | None = Field(None, description="the SQL text (question sql)")
    params: dict[str, Any] | None = Field(None, description="its {name:Type} parameter values")
    filters: dict[str, str] | None = Field(None, description="the filters of who / calls / denials")
    caller: Literal["token", "local"]
    remote: str | None = None
    outcome: AdminOutcome
    status: int | None = Field(None, description="HTTP status of the answer (None for local)")
    error: str | None = Field(None, description="error kind: bad_request, read_only, query_error, ...")
    message: str | None = None
    row_count: int | None = None
    duration_ms: float = 0.0


class AdminReload(_Event):
    """A policy reload asked over the admin API (each file's own policy.loaded follows)."""

    kind: Literal["admin.reload"] = "admin.reload"
    caller: Literal["token", "local"] = "token"
    remote: str | None = None
    outcome: AdminOutcome
    status: int | None = None
    results: dict[str, str | None] = Field(
        default_factory=dict, description="server -> None (loaded) or the error"
    )
    message: str | None = None
    duration_ms: float = 0.0


Event = Annotated[
    CallDecided
    | CallCompleted
    | SessionOpened
    | SessionClosed
    | PolicyLoaded
    | AuthFailed
    | AdminQuery
    | AdminReload,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
CALL_KINDS = ("call.decided", "call.completed", "session.opened", "session.closed", "policy.loaded")
SECURITY_KINDS = ("auth.failed", "admin.query", "admin.reload")
EVENT_KINDS = CALL_KINDS + SECURITY_KINDS


def encode(event: _Event) -> bytes:
    """One event as compact JSON bytes (the log's record payload)."""
    return orjson.dumps(event.model_dump(mode="python", exclude_none=False))


def decode(payload: bytes) -> Event:
    """Parse and validate one record payload."""
    return EVENT_ADAPTER.validate_python(orjson.loads(payload))


def decode_raw(payload: bytes) -> dict[str, Any]:
    """Parse without validation: for consumers that trust the log and want speed."""
    return orjson.loads(payload)


# --------------------------------------------------------------------------- policy depth
# (issue 15) approvals and config reload. To be added to the `Event` union above on merge.


class ApprovalRequested(_Event):
    """A call is held for a human (policy action "approve")."""

    kind: Literal["approval.requested"] = "approval.requested"
    approval_id: str
    call_id: str | None = None
    server: str
    tool: str
    grant: str
    agent: str
    session: str | None = None
    arguments: dict[str, Any] | None = Field(None, description="tool arguments after redaction")
    args_sha256: str
    rule: str = Field(description="JSON Pointer of the rule that asked for approval")
    timeout_s: float
    expires_ts: int = Field(description="UTC ms when it times out")
    remember_s: int = Field(0, description="0: once; else how long an approval covers the same call")


class ApprovalResolved(_Event):
    """How a held call ended: approved / denied (who, when, comment), timed out, cancelled."""

    kind: Literal["approval.resolved"] = "approval.resolved"
    approval_id: str
    call_id: str | None = None
    server: str
    tool: str
    grant: str
    agent: str
    outcome: Literal["approved", "denied", "timed_out", "cancelled"]
    by: str | None = Field(None, description="who approved or denied (None: timeout, cancel)")
    comment: str | None = None
    resolved_ts: int = Field(description="UTC ms of the resolution")
    waited_ms: int = 0
    remembered_until_ts: int | None = Field(None, description="approved with remember: until then (UTC ms)")


class ConfigLoaded(_Event):
    """The config file was (re)loaded: what changed, what applied live, what needs a restart."""

    kind: Literal["config.loaded"] = "config.loaded"
    path: str
    config_sha256: str | None = None
    ok: bool = True
    error: str | None = None
    applied: list[str] = Field(default_factory=list, description="changes applied from the next call")
    restart_needed: list[str] = Field(default_factory=list, description="changes ignored until a restart")


POLICY_DEPTH_EVENTS = (ApprovalRequested, ApprovalResolved, ConfigLoaded)
