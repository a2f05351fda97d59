"""The events the gateway writes to the log: the source of truth of ledgergate.

Every event is one JSON object (orjson) with `kind`, `schema_version`, a UUIDv7
`event_id`, a millisecond UTC timestamp `ts` (integer ms since the epoch) and the
`gateway` instance id. Consumers (audit tables, counters, alerts) and the limiter's
start-up fold read nothing else.

Kinds:
- call.decided    every JSON-RPC request the gateway handles, before it is forwarded
- call.completed  how that request ended (linked by call_id); outcome "shutdown": cut by
                  the drain timeout at shutdown (`upstream_answered` says if the upstream had
                  answered); `refunded`: never sent, its call.decided charges do not count
- session.opened / session.closed
- policy.loaded   a policy file was (re)loaded, or failed to load
- auth.failed     requests refused for their credentials (401), aggregated per
                  (source address, server, reason) and interval: `count` failures
                  between `first_ts` and `last_ts`; never any key material
- admin.query     an admin API (or local CLI) forensic question: who asked what, how it ended
- admin.reload    a policy reload asked over the admin API
- approval.requested / approval.resolved  a call held for a human (policy action "approve"),
                  and how it ended (approved / denied by whom with what comment, timed out,
                  cancelled); the held call's call.decided is written once it is resolved
- config.loaded   the config file was (re)loaded: what applied live, what needs a restart

This module is the ONE place the shape lives. Next to each pydantic model sits its
builder, a plain function (registered with ``@builds(Model)``) that returns the event as
a dict in the model's field order: the gateway writes events through the builders
(pydantic costs ~20x more than the dict on the hot path), and
tests/schemas/test_events.py pins that every builder's bytes are exactly what the model
itself would encode. The byte markers the log scanners use (counter rebuild, consumer
selectors) are defined at the end, from the models' field names, with the field-order
contract they rely on. The ClickHouse DDL is checked against the models by
tests/schemas/test_clickhouse_ddl.py.

To add a kind: its model (fields in the order they are written), a ``@builds`` builder
returning the same keys in the same order, the model in ``Event`` and its kind in
``CALL_KINDS`` / ``SECURITY_KINDS`` (or a new tuple in ``EVENT_KINDS``), and the columns
in schemas/clickhouse/*.sql if it is stored there; the tests say what is missing.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

Decision = Literal["allow", "deny", "rate_limited", "invalid_arguments", "pending_approval"]
WouldDecision = Literal["allow", "deny", "rate_limited", "invalid_arguments", "approval_required"]
Outcome = Literal["ok", "is_error", "jsonrpc_error", "upstream_error", "refused", "cancelled", "shutdown"]


_rand_bits = random.Random(int.from_bytes(os.urandom(16), "big")).getrandbits
_uuid_lock = threading.Lock()
# uuid7()'s state: the ms of the last id, the id's text up to its last group (the ms, version,
# variant and the 26 high bits of the counter, random per ms), and the counter's low 48 bits
_uuid_ms = -1  # before any millisecond (the clock may read 0)
_uuid_head = ""
_uuid_low = 0
_LOW_MAX = (1 << 48) - 1


def _reseed_after_fork() -> None:
    # a forked child would replay its parent's sequence: the same ids in two processes
    global _rand_bits, _uuid_ms
    _rand_bits = random.Random(int.from_bytes(os.urandom(16), "big")).getrandbits
    _uuid_ms = -1


os.register_at_fork(after_in_child=_reseed_after_fork)


def _uuid7_ms(ms: int) -> None:
    """Start millisecond ``ms``: a new random seed for the 74-bit counter."""
    global _uuid_ms, _uuid_head, _uuid_low
    high = _rand_bits(26)  # rand_a (12 bits) and the top 14 bits of rand_b
    h = f"{ms & 0xFFFF_FFFF_FFFF:012x}{0x7000 | (high >> 14):04x}{0x8000 | (high & 0x3FFF):04x}"
    _uuid_ms = ms
    _uuid_head = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:]}-"
    _uuid_low = _rand_bits(47)  # top bit clear: room for 2^47 ids in the millisecond


def uuid7() -> str:
    """A UUIDv7 (RFC 9562): 48-bit ms timestamp, version 7, variant 10, then 74 bits that
    are a counter seeded at random each millisecond (RFC 9562 section 6.2, method 2).

    Sortable by time, and the ids of one process sort in the order they were made: within
    a millisecond the counter goes up by one; if the clock steps back, the last millisecond
    is kept until it catches up (a counter that would overflow moves on to the next one).
    The random seeds come from a per-process PRNG seeded from os.urandom: ids must be
    unique, not secret, and a syscall per event is measurable on the hot path.
    """
    global _uuid_low
    ms = time.time_ns() // 1_000_000
    with _uuid_lock:  # built on the loop thread, but ids must stay unique from any thread
        if ms > _uuid_ms:
            _uuid7_ms(ms)
        elif _uuid_low < _LOW_MAX:
            _uuid_low += 1
        else:  # 2^47 ids in one millisecond: never in practice, but stay monotonic
            _uuid7_ms(_uuid_ms + 1)
        return f"{_uuid_head}{_uuid_low:012x}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


Builder = Callable[..., dict[str, Any]]
BUILDERS: dict[type[BaseModel], Builder] = {}
"""model -> its fast builder (the tests check every model has one and that they agree)."""

_B = TypeVar("_B", bound=Builder)


def builds(model: type[BaseModel]) -> Callable[[_B], _B]:
    """Register ``fn`` as the builder of ``model`` (no cost per call: returns ``fn`` itself)."""

    def register(fn: _B) -> _B:
        BUILDERS[model] = fn
        return fn

    return register


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


@builds(CounterCharge)
def counter_charge(counter: str, key: str, scope: str, window_start: int, window_s: int) -> dict[str, Any]:
    return {
        "counter": counter,
        "key": key,
        "scope": scope,
        "window_start": window_start,
        "window_s": window_s,
    }


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


@builds(CounterState)
def counter_state(
    counter: str, scope: str, key: str, window_s: int, window_start: int, count: int, max: int
) -> dict[str, Any]:
    return {
        "counter": counter,
        "scope": scope,
        "key": key,
        "window_s": window_s,
        "window_start": window_start,
        "count": count,
        "max": max,
    }


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


@builds(CallDecided)
def call_decided(
    gateway: str,
    call_id: str,
    server: str,
    method: str,
    tool: str | None,
    request_id: str | None,
    grant: str,
    agent: str,
    session: str | None,
    protocol_version: str | None,
    client_name: str | None,
    client_version: str | None,
    remote: str | None,
    arguments: dict[str, Any] | None,
    args_sha256: str | None,
    decision: str,
    rule: str | None,
    reason: str | None,
    retry_after_s: float | None,
    counters: list[dict[str, Any]],
    charges: list[dict[str, Any]],
    policy_version: str | None,
    shadow: bool,
    would_decision: str | None,
    risk_class: str | None,
    risk_level: str | None,
) -> dict[str, Any]:
    """The hot one, written ahead of every call (``counters``/``charges`` are
    ``counter_state``/``counter_charge`` dicts). Not keyword-only, unlike the rare kinds:
    CPython binds 22 keyword arguments of a Python function ~1 us slower than positional
    ones, so the writer passes them by position (the tests pin the parameter order to the
    model's field order)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "call.decided",
        "call_id": call_id,
        "server": server,
        "method": method,
        "tool": tool,
        "request_id": request_id,
        "grant": grant,
        "agent": agent,
        "session": session,
        "protocol_version": protocol_version,
        "client_name": client_name,
        "client_version": client_version,
        "remote": remote,
        "arguments": arguments,
        "args_sha256": args_sha256,
        "decision": decision,
        "rule": rule,
        "reason": reason,
        "retry_after_s": retry_after_s,
        "counters": counters,
        "charges": charges,
        "policy_version": policy_version,
        "shadow": shadow,
        "would_decision": would_decision,
        "risk_class": risk_class,
        "risk_level": risk_level,
    }


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
    upstream_answered: bool | None = Field(
        None, description="the upstream's final answer had arrived (None: not recorded, older events)"
    )
    refunded: bool = Field(
        False, description="allowed and charged but never sent upstream: its charges were given back"
    )


@builds(CallCompleted)
def call_completed(  # positional too: one per call, like call_decided
    gateway: str,
    call_id: str,
    server: str,
    method: str,
    tool: str | None,
    grant: str,
    agent: str,
    session: str | None,
    outcome: str,
    error_code: int | None,
    error_message: str | None,
    upstream_ms: float | None,
    response_bytes: int,
    upstream_answered: bool | None,
    refunded: bool,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "call.completed",
        "call_id": call_id,
        "server": server,
        "method": method,
        "tool": tool,
        "grant": grant,
        "agent": agent,
        "session": session,
        "outcome": outcome,
        "error_code": error_code,
        "error_message": error_message,
        "upstream_ms": upstream_ms,
        "response_bytes": response_bytes,
        "upstream_answered": upstream_answered,
        "refunded": refunded,
    }


# ---- the hot kinds as bytes ---------------------------------------------------------------
# call.decided and call.completed are written for every call. Their bytes are built here
# straight from fragments instead of a dict through orjson.dumps: most of their fields are
# the same call after call (the gateway, the session's fields, the tool, the decision's
# rule, the policy version), so the JSON of such a run of fields is encoded once by orjson
# and cached by its values; only the per-call values (ids, ts, request id, arguments,
# counters) are encoded per call. The bytes are exactly orjson.dumps(<the dict builder>)
# (tests/schemas/test_events.py pins that, hostile strings included): the byte markers and
# the consumers see no difference.

_FRAGMENTS: dict[tuple[Any, ...], bytes] = {}
_FRAGMENTS_MAX = 4096  # values an agent chooses (client name, session) vary: memory stays bounded


def _fragment(key: tuple[Any, ...], head: bytes, names: tuple[str, ...], tail: bytes) -> bytes:
    """``head`` + the JSON members ``names`` = ``key[1:]`` (as orjson writes them) + ``tail``."""
    if len(_FRAGMENTS) >= _FRAGMENTS_MAX:
        _FRAGMENTS.clear()
    members = orjson.dumps(dict(zip(names, key[1:], strict=True)))[1:-1]
    out = _FRAGMENTS[key] = head + members + tail
    return out


_dumps = orjson.dumps
_EVENT_HEAD = b'{"schema_version":%d,"event_id":"' % SCHEMA_VERSION
_DECIDED_GATEWAY = (b",", ("gateway", "kind"), b',"call_id":')
_DECIDED_CALL = (b",", ("server", "method", "tool"), b',"request_id":')
_DECIDED_SESSION = (
    b",",
    ("grant", "agent", "session", "protocol_version", "client_name", "client_version", "remote"),
    b',"arguments":',
)
_DECIDED_RULE = (b",", ("decision", "rule", "reason"), b',"retry_after_s":')
_DECIDED_TAIL = (b",", ("policy_version", "shadow", "would_decision", "risk_class", "risk_level"), b"}")
_COMPLETED_GATEWAY = (b",", ("gateway", "kind"), b',"call_id":')
_COMPLETED_CALL = (
    b",",
    ("server", "method", "tool", "grant", "agent", "session", "outcome"),
    b',"error_code":',
)
_NO_ERROR = b'null,"error_message":null'
_BOOL = {True: b"true", False: b"false", None: b"null"}


def call_decided_bytes(
    gateway: str,
    call_id: str,
    server: str,
    method: str,
    tool: str | None,
    request_id: str | None,
    grant: str,
    agent: str,
    session: str | None,
    protocol_version: str | None,
    client_name: str | None,
    client_version: str | None,
    remote: str | None,
    arguments: dict[str, Any] | None,
    args_sha256: str | None,
    decision: str,
    rule: str | None,
    reason: str | None,
    retry_after_s: float | None,
    counters: list[dict[str, Any]],
    charges: list[dict[str, Any]],
    policy_version: str | None,
    shadow: bool,
    would_decision: str | None,
    risk_class: str | None,
    risk_level: str | None,
) -> bytes:
    """``orjson.dumps(call_decided(...))``, same parameters, built from cached fragments."""
    f = _FRAGMENTS
    k1 = ("dg", gateway, "call.decided")
    k2 = ("dc", server, method, tool)
    k3 = ("ds", grant, agent, session, protocol_version, client_name, client_version, remote)
    k4 = ("dr", decision, rule, reason)
    k5 = ("dt", policy_version, shadow, would_decision, risk_class, risk_level)
    return b"".join(
        (
            _EVENT_HEAD,
            uuid7().encode(),
            b'","ts":%d' % now_ms(),
            f.get(k1) or _fragment(k1, *_DECIDED_GATEWAY),
            _dumps(call_id),
            f.get(k2) or _fragment(k2, *_DECIDED_CALL),
            _dumps(request_id),
            f.get(k3) or _fragment(k3, *_DECIDED_SESSION),
            _dumps(arguments),
            b',"args_sha256":',
            _dumps(args_sha256),
            f.get(k4) or _fragment(k4, *_DECIDED_RULE),
            _dumps(retry_after_s),
            b',"counters":',
            _dumps(counters),
            b',"charges":',
            _dumps(charges),
            f.get(k5) or _fragment(k5, *_DECIDED_TAIL),
        )
    )


def call_completed_bytes(
    gateway: str,
    call_id: str,
    server: str,
    method: str,
    tool: str | None,
    grant: str,
    agent: str,
    session: str | None,
    outcome: str,
    error_code: int | None,
    error_message: str | None,
    upstream_ms: float | None,
    response_bytes: int,
    upstream_answered: bool | None,
    refunded: bool,
) -> bytes:
    """``orjson.dumps(call_completed(...))``, same parameters, built from cached fragments."""
    f = _FRAGMENTS
    k1 = ("cg", gateway, "call.completed")
    k2 = ("cc", server, method, tool, grant, agent, session, outcome)
    if error_code is None and error_message is None:
        error = _NO_ERROR
    else:
        error = _dumps(error_code) + b',"error_message":' + _dumps(error_message)
    return b"".join(
        (
            _EVENT_HEAD,
            uuid7().encode(),
            b'","ts":%d' % now_ms(),
            f.get(k1) or _fragment(k1, *_COMPLETED_GATEWAY),
            _dumps(call_id),
            f.get(k2) or _fragment(k2, *_COMPLETED_CALL),
            error,
            b',"upstream_ms":',
            _dumps(upstream_ms),
            b',"response_bytes":',
            _dumps(response_bytes),
            b',"upstream_answered":',
            _BOOL[upstream_answered],
            b',"refunded":',
            _BOOL[refunded],
            b"}",
        )
    )


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


@builds(SessionOpened)
def session_opened(
    *,
    gateway: str,
    session: str,
    server: str,
    grant: str,
    agent: str,
    protocol_version: str | None,
    client_name: str | None,
    client_version: str | None,
    remote: str | None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "session.opened",
        "session": session,
        "server": server,
        "grant": grant,
        "agent": agent,
        "protocol_version": protocol_version,
        "client_name": client_name,
        "client_version": client_version,
        "remote": remote,
    }


class SessionClosed(_Event):
    kind: Literal["session.closed"] = "session.closed"
    session: str
    server: str
    grant: str
    agent: str
    reason: Literal["deleted", "expired", "upstream_gone", "shutdown"]


@builds(SessionClosed)
def session_closed(
    *, gateway: str, session: str, server: str, grant: str, agent: str, reason: str
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "session.closed",
        "session": session,
        "server": server,
        "grant": grant,
        "agent": agent,
        "reason": reason,
    }


class PolicyLoaded(_Event):
    kind: Literal["policy.loaded"] = "policy.loaded"
    server: str
    path: str
    policy_version: str | None = None
    ok: bool = True
    error: str | None = None


@builds(PolicyLoaded)
def policy_loaded(
    *, gateway: str, server: str, path: str, policy_version: str | None, ok: bool, error: str | None
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "policy.loaded",
        "server": server,
        "path": path,
        "policy_version": policy_version,
        "ok": ok,
        "error": error,
    }


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


@builds(AuthFailed)
def auth_failed(
    *,
    gateway: str,
    remote: str | None,
    server: str,
    reason: str,
    count: int,
    first_ts: int,
    last_ts: int,
    overflow: bool,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "auth.failed",
        "remote": remote,
        "server": server,
        "reason": reason,
        "count": count,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "overflow": overflow,
    }


AdminQuestion = Literal["who", "calls", "denials", "sql"]
AdminOutcome = Literal["ok", "refused", "error"]


class AdminQuery(_Event):
    """A forensic question asked over the admin API with the token (caller "token"), on the
    gateway's owner-only local socket (caller "socket", remote "uid N pid N"), or by the CLI
    on the store itself (caller "local"): the auditors are audited."""

    # field order = the order the gateway has always written (see admin_query below)
    kind: Literal["admin.query"] = "admin.query"
    question: AdminQuestion
    sql: str | None = Field(None, description="the SQL text (question sql)")
    params: dict[str, Any] | None = Field(None, description="its {name:Type} parameter values")
    filters: dict[str, str] | None = Field(None, description="the filters of who / calls / denials")
    error: str | None = Field(None, description="error kind: bad_request, read_only, query_error, ...")
    row_count: int | None = None
    caller: Literal["token", "socket", "local"]
    remote: str | None = None
    outcome: AdminOutcome
    status: int | None = Field(None, description="HTTP status of the answer (None for local)")
    message: str | None = None
    duration_ms: float = 0.0


@builds(AdminQuery)
def admin_query(
    *,
    gateway: str,
    question: str,
    sql: str | None,
    params: dict[str, Any] | None,
    filters: dict[str, str] | None,
    error: str | None,
    row_count: int | None,
    caller: str,
    remote: str | None,
    outcome: str,
    status: int | None,
    message: str | None,
    duration_ms: float,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "admin.query",
        "question": question,
        "sql": sql,
        "params": params,
        "filters": filters,
        "error": error,
        "row_count": row_count,
        "caller": caller,
        "remote": remote,
        "outcome": outcome,
        "status": status,
        "message": message,
        "duration_ms": duration_ms,
    }


class AdminReload(_Event):
    """A policy reload asked over the admin API (each file's own policy.loaded follows)."""

    kind: Literal["admin.reload"] = "admin.reload"
    results: dict[str, str | None] = Field(
        default_factory=dict, description="server -> None (loaded) or the error"
    )
    caller: Literal["token", "socket", "local"] = "token"
    remote: str | None = None
    outcome: AdminOutcome
    status: int | None = None
    message: str | None = None
    duration_ms: float = 0.0


@builds(AdminReload)
def admin_reload(
    *,
    gateway: str,
    results: dict[str, str | None],
    caller: str,
    remote: str | None,
    outcome: str,
    status: int | None,
    message: str | None,
    duration_ms: float,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "admin.reload",
        "results": results,
        "caller": caller,
        "remote": remote,
        "outcome": outcome,
        "status": status,
        "message": message,
        "duration_ms": duration_ms,
    }


# ---------------------------------------------------------------- alerts (consumers/alerts.py)
# Alerts are events too, so `audit sql` answers "which alerts fired last week, and were they
# delivered?" (audit_alerts / audit_alert_deliveries, schemas/clickhouse/005_alerts.sql), and
# the alerts consumer dedupes by alert_id from them after a restart.


class AlertFired(_Event):
    """One alert, as the sinks receive it (the document is these fields)."""

    kind: Literal["alert.fired"] = "alert.fired"
    alert_id: str = Field(description="derived from rule, group and first event id: stable on replay")
    rule: str
    on: str
    group: dict[str, str] = Field(default_factory=dict)
    count: int = Field(description="matching events (auth failures) this alert stands for")
    threshold: int = 1
    window_s: float = 0.0
    throttle_s: float | None = None
    first_event_id: str
    last_event_id: str
    first_ts: int
    last_ts: int
    summary: bool = Field(False, description="a throttle's summary of what it suppressed")
    suppressed: int = Field(0, description="events suppressed by the throttle (summary alerts)")
    examples: list[dict[str, Any]] = Field(default_factory=list)
    evidence: str = Field("", description="a `ledgergate audit ...` command line showing the events")
    text: str = ""
    sinks: list[str] = Field(default_factory=list, description="the sinks it is meant for")


class AlertDelivered(_Event):
    kind: Literal["alert.delivered"] = "alert.delivered"
    alert_id: str
    rule: str
    sink: str
    attempts: int
    status: int | None = Field(None, description="HTTP status of the accepting answer (webhook)")
    age_ms: float = Field(description="the alert's last event (its decision) -> accepted by the sink")


class AlertFailed(_Event):
    kind: Literal["alert.failed"] = "alert.failed"
    alert_id: str
    rule: str
    sink: str
    attempts: int
    status: int | None = None
    error: str
    final: bool = Field(description="the sink gave up on this alert (else it retries)")
    age_ms: float = 0.0


@builds(AlertFired)
def alert_fired(
    *,
    gateway: str = "",
    alert_id: Any,
    rule: Any,
    on: Any,
    group: Any = None,
    count: Any,
    threshold: Any = 1,
    window_s: Any = 0.0,
    throttle_s: Any = None,
    first_event_id: Any,
    last_event_id: Any,
    first_ts: Any,
    last_ts: Any,
    summary: Any = False,
    suppressed: Any = 0,
    examples: Any = None,
    evidence: Any = "",
    text: Any = "",
    sinks: Any = None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "alert.fired",
        "alert_id": alert_id,
        "rule": rule,
        "on": on,
        "group": group if group is not None else dict(),
        "count": count,
        "threshold": threshold,
        "window_s": window_s,
        "throttle_s": throttle_s,
        "first_event_id": first_event_id,
        "last_event_id": last_event_id,
        "first_ts": first_ts,
        "last_ts": last_ts,
        "summary": summary,
        "suppressed": suppressed,
        "examples": examples if examples is not None else list(),
        "evidence": evidence,
        "text": text,
        "sinks": sinks if sinks is not None else list(),
    }


@builds(AlertDelivered)
def alert_delivered(
    *,
    gateway: str = "",
    alert_id: Any,
    rule: Any,
    sink: Any,
    attempts: Any,
    status: Any = None,
    age_ms: Any,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "alert.delivered",
        "alert_id": alert_id,
        "rule": rule,
        "sink": sink,
        "attempts": attempts,
        "status": status,
        "age_ms": age_ms,
    }


@builds(AlertFailed)
def alert_failed(
    *,
    gateway: str = "",
    alert_id: Any,
    rule: Any,
    sink: Any,
    attempts: Any,
    status: Any = None,
    error: Any,
    final: Any,
    age_ms: Any = 0.0,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "alert.failed",
        "alert_id": alert_id,
        "rule": rule,
        "sink": sink,
        "attempts": attempts,
        "status": status,
        "error": error,
        "final": final,
        "age_ms": age_ms,
    }


# --------------------------------------------------------------------------- policy depth
# (issue 15) held calls (approvals) and config reload.


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


@builds(ApprovalRequested)
def approval_requested(
    *,
    gateway: str,
    approval_id: str,
    call_id: str | None,
    server: str,
    tool: str,
    grant: str,
    agent: str,
    session: str | None,
    arguments: dict[str, Any] | None,
    args_sha256: str,
    rule: str,
    timeout_s: float,
    expires_ts: int,
    remember_s: int,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "approval.requested",
        "approval_id": approval_id,
        "call_id": call_id,
        "server": server,
        "tool": tool,
        "grant": grant,
        "agent": agent,
        "session": session,
        "arguments": arguments,
        "args_sha256": args_sha256,
        "rule": rule,
        "timeout_s": timeout_s,
        "expires_ts": expires_ts,
        "remember_s": remember_s,
    }


@builds(ApprovalResolved)
def approval_resolved(
    *,
    gateway: str,
    approval_id: str,
    call_id: str | None,
    server: str,
    tool: str,
    grant: str,
    agent: str,
    outcome: str,
    by: str | None,
    comment: str | None,
    resolved_ts: int,
    waited_ms: int,
    remembered_until_ts: int | None,
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "approval.resolved",
        "approval_id": approval_id,
        "call_id": call_id,
        "server": server,
        "tool": tool,
        "grant": grant,
        "agent": agent,
        "outcome": outcome,
        "by": by,
        "comment": comment,
        "resolved_ts": resolved_ts,
        "waited_ms": waited_ms,
        "remembered_until_ts": remembered_until_ts,
    }


@builds(ConfigLoaded)
def config_loaded(
    *,
    gateway: str,
    path: str,
    config_sha256: str | None,
    ok: bool,
    error: str | None,
    applied: list[str],
    restart_needed: list[str],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "event_id": uuid7(),
        "ts": now_ms(),
        "gateway": gateway,
        "kind": "config.loaded",
        "path": path,
        "config_sha256": config_sha256,
        "ok": ok,
        "error": error,
        "applied": applied,
        "restart_needed": restart_needed,
    }


Event = Annotated[
    CallDecided
    | CallCompleted
    | SessionOpened
    | SessionClosed
    | PolicyLoaded
    | AuthFailed
    | AdminQuery
    | AdminReload
    | AlertFired
    | AlertDelivered
    | AlertFailed
    | ApprovalRequested
    | ApprovalResolved
    | ConfigLoaded,
    Field(discriminator="kind"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
CALL_KINDS = ("call.decided", "call.completed", "session.opened", "session.closed", "policy.loaded")
APPROVAL_KINDS = ("approval.requested", "approval.resolved", "config.loaded")
SECURITY_KINDS = ("auth.failed", "admin.query", "admin.reload")
ALERT_KINDS = ("alert.fired", "alert.delivered", "alert.failed")
EVENT_KINDS = CALL_KINDS + SECURITY_KINDS + ALERT_KINDS + APPROVAL_KINDS


def encode(event: _Event) -> bytes:
    """One event as compact JSON bytes (the log's record payload)."""
    return orjson.dumps(event.model_dump(mode="python", exclude_none=False))


def decode(payload: bytes) -> Event:
    """Parse and validate one record payload."""
    return EVENT_ADAPTER.validate_python(orjson.loads(payload))


def decode_raw(payload: bytes) -> dict[str, Any]:
    """Parse without validation: for consumers that trust the log and want speed."""
    return orjson.loads(payload)


class LogGap(_Event):
    """The event log went backwards: at start-up it ended below what the store or a consumer
    had already seen (records lost, e.g. a WAL deleted after a crash). Written when the gap is
    accepted (`ledgergate run --accept-log-gap` in strict mode; at once in batched mode)."""

    kind: Literal["log.gap"] = "log.gap"
    log_end: int = Field(description="the log's end offset at start-up")
    seen_end: int = Field(description="the highest end the store or a consumer had seen")
    lost: int = Field(description="records missing: seen_end - log_end")
    store_end: int = Field(description="the highest next_offset in the store's log_positions")
    committed: dict[str, int] = Field(default_factory=dict, description="consumer -> committed offset")
    durability: str
    accepted_by: Literal["flag", "batched"]
    counters_from_store: int = Field(0, description="charges folded from the store on top of the log's")


# ---- byte markers: how the log scanners find fields without parsing ----------------------
#
# The counter rebuild (gateway/policy/rebuild.py) and the consumers' selectors
# (consumers/runner.py, consumers/audit.py) locate fields in the compact JSON the builders
# write (orjson: no spaces, keys in the model's field order). Inside a JSON string a quote
# is always escaped, so a key marker can only be faked by a field holding an OBJECT: in
# call.decided that is the agent-controlled `arguments`. Hence the contract, pinned by
# tests/schemas/test_events.py:
#   - FIRST_OCCURRENCE fields precede every object-valued field of every kind that has
#     them, so their first occurrence in a payload is the event's own;
#   - LAST_OCCURRENCE fields of call.decided follow `arguments`, so their last one is.

FIRST_OCCURRENCE = ("kind", "event_id", "server")
LAST_OCCURRENCE = ("decision", "charges")


def _field(model: type[BaseModel], name: str) -> str:
    """``name``, checked to be a field of ``model`` (a rename fails at import, not silently)."""
    if name not in model.model_fields:
        raise AssertionError(f"{model.__name__} has no field {name!r}: update the byte markers")
    return name


def marker(field: str, value: str | None = None) -> bytes:
    """The bytes opening ``field``'s string value: ``"field":"``; with ``value``, the field
    holding exactly that string: ``"field":"value"``."""
    head = b'"' + field.encode() + b'":"'
    return head if value is None else head + value.encode() + b'"'


def list_marker(field: str) -> bytes:
    """The bytes opening ``field``'s array value: ``"field":[``."""
    return b'"' + field.encode() + b'":['


KIND_MARKER = marker(_field(CallDecided, "kind"))
EVENT_ID_MARKER = marker(_field(_Event, "event_id"))
SERVER_MARKER = marker(_field(CallDecided, "server"))
DECISION_MARKER = marker(_field(CallDecided, "decision"))
CHARGES_MARKER = list_marker(_field(CallDecided, "charges"))


def kind_marker(kind: str) -> bytes:
    """``"kind":"<kind>"``: a payload of that kind (at the first ``KIND_MARKER``)."""
    return marker("kind", kind)


DECIDED_MARKER = kind_marker(CallDecided.model_fields["kind"].default)
COMPLETED_MARKER = kind_marker(CallCompleted.model_fields["kind"].default)
# call_id precedes `arguments` in call.decided and the upstream-written error_message in
# call.completed: its first occurrence is the event's own
CALL_ID_MARKER = marker(_field(CallDecided, "call_id"))
# gateway and ts precede every object-valued field of every kind (the base fields come first)
GATEWAY_MARKER = marker(_field(_Event, "gateway"))
TS_MARKER = b'"' + _field(_Event, "ts").encode() + b'":'
# a call charged then never sent upstream (its quota given back): gateway-written, after the
# only upstream-written string of call.completed, which cannot hold an unescaped quote
REFUNDED_MARKER = b'"' + _field(CallCompleted, "refunded").encode() + b'":true'
ALLOW_MARKER = marker(
    _field(CallDecided, "decision"), "allow"
)  # an allowed call: the one that charges counters
