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


Event = Annotated[
    CallDecided | CallCompleted | SessionOpened | SessionClosed | PolicyLoaded,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
EVENT_KINDS = ("call.decided", "call.completed", "session.opened", "session.closed", "policy.loaded")


def encode(event: _Event) -> bytes:
    """One event as compact JSON bytes (the log's record payload)."""
    return orjson.dumps(event.model_dump(mode="python", exclude_none=False))


def decode(payload: bytes) -> Event:
    """Parse and validate one record payload."""
    return EVENT_ADAPTER.validate_python(orjson.loads(payload))


def decode_raw(payload: bytes) -> dict[str, Any]:
    """Parse without validation: for consumers that trust the log and want speed."""
    return orjson.loads(payload)
