"""The audit addon writes events exactly in the shape of the pydantic models in schemas/events.py
(they are built as dicts for speed, by the builders next to the models: these tests validate every
kind the addon writes against the models, byte for byte), and it writes ahead: the decision is on
the log when decided() returns."""

from __future__ import annotations

from pathlib import Path

from eventlog import SqliteEventLog
from gateway.audit.hooks import AddonChain, AdminRequest
from gateway.audit.writer import AuditAddon
from gateway.auth import Grant
from gateway.mcp.flow import CallFlow
from gateway.mcp.sessions import Session
from gateway.policy.engine import Call, decide
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet
from schemas.events import (
    AdminQuery,
    AdminReload,
    AuthFailed,
    CallCompleted,
    CallDecided,
    PolicyLoaded,
    SessionClosed,
    SessionOpened,
    decode,
    encode,
)

POLICY = (
    '{"version":"1","default":"deny","tools":{"send_message":{"redact":["content"],'
    '"limits":[{"counter":"msgs","window":"hour","max":5,"scope":"agent"}]}}}'
)


async def test_every_event_validates_against_its_model(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(POLICY)
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-1", server_redact={"wa": ["credentials.*"]})
    policies = PolicySet({"wa": tmp_path / "p.json"}, AddonChain([addon]))
    policies.load_all()
    addon.policies = policies
    grant = Grant("alice", "bot-a", b"\0" * 32)
    session = Session(
        id="s-1",
        server="wa",
        grant=grant,
        remote="127.0.0.1",
        protocol_version="2025-11-25",
        client_name="claude",
        client_version="1.0",
    )
    addon.session_opened(session)
    args = {
        "phone_number": "+1",
        "content": "hello",
        "credentials": {"user": "u", "pin": "1234"},
        "api_key": "sk-1",
    }
    flow = CallFlow(
        server="wa",
        method="tools/call",
        request_id=7,
        grant=grant,
        session=session,
        remote="127.0.0.1",
        params={"name": "send_message", "arguments": args},
        tool="send_message",
        policy_version=policies["wa"].version,
    )
    limiter = Limiter()
    flow.decision = decide(
        Call("wa", "tools/call", "send_message", "alice", "bot-a", "s-1", args),
        policies["wa"],
        limiter.view(),
        1_700_000_000.0,
    )
    limiter.charge(flow.decision)
    await addon.decided(flow)
    # write-ahead: durable (strict) when decided() returns, together with what was queued before
    kinds = [decode(r.payload).kind for r in await log.read(0)]
    assert kinds == ["policy.loaded", "session.opened", "call.decided"]
    flow.forwarded_at = flow.started
    flow.observe({"jsonrpc": "2.0", "id": 7, "result": {"content": [], "isError": True}}, 42)
    addon.completed(flow)
    addon.session_closed(session, "deleted")
    await addon.close()
    records = await log.read(0)
    events = [decode(r.payload) for r in records]
    await log.close()
    # byte for byte what the model itself encodes: same fields, same order, same values
    assert [encode(e) for e in events] == [r.payload for r in records]
    assert [type(e) for e in events] == [
        PolicyLoaded,
        SessionOpened,
        CallDecided,
        CallCompleted,
        SessionClosed,
    ]
    decided = events[2]
    assert isinstance(decided, CallDecided)
    assert decided.call_id == events[3].call_id == flow.call_id
    assert decided.arguments == {
        "phone_number": "+1",
        "content": "[REDACTED]",
        "credentials": {"user": "[REDACTED]", "pin": "[REDACTED]"},
        "api_key": "[REDACTED]",
    }
    assert decided.args_sha256 is not None and len(decided.args_sha256) == 64
    assert (decided.decision, decided.rule, decided.grant, decided.agent) == (
        "allow",
        "/tools/send_message",
        "alice",
        "bot-a",
    )
    assert decided.request_id == "7" and decided.client_name == "claude"
    # every field from its own source (the writer passes the hot builders' values by position)
    assert (decided.gateway, decided.server, decided.method, decided.tool, decided.session) == (
        "gw-1",
        "wa",
        "tools/call",
        "send_message",
        "s-1",
    )
    assert (decided.protocol_version, decided.client_version, decided.remote) == (
        "2025-11-25",
        "1.0",
        "127.0.0.1",
    )
    assert (decided.reason, decided.retry_after_s) == (flow.decision.reason, flow.decision.retry_after_s)
    assert [c.counter for c in decided.charges] == ["msgs"] and decided.charges[0].key == "bot-a"
    assert decided.counters[0].count == 1 and decided.counters[0].max == 5
    assert decided.policy_version == policies["wa"].version
    completed = events[3]
    assert isinstance(completed, CallCompleted)
    assert completed.outcome == "is_error" and completed.response_bytes == 42
    assert (completed.gateway, completed.server, completed.method, completed.tool) == (
        "gw-1",
        "wa",
        "tools/call",
        "send_message",
    )
    assert (completed.grant, completed.agent, completed.session) == ("alice", "bot-a", "s-1")
    assert (completed.error_code, completed.error_message) == (flow.error_code, flow.error_message)
    assert completed.upstream_ms is not None and completed.upstream_ms == round(flow.upstream_ms or 0, 3)
    assert events[4].reason == "deleted"
    assert len({e.event_id for e in events}) == 5


async def test_security_events_validate_against_their_models(tmp_path: Path) -> None:
    log = SqliteEventLog(tmp_path / "events.db", durability="strict")
    await log.open()
    addon = AuditAddon(log, "gw-1", auth_failure_interval_s=3600)
    for _ in range(3):
        addon.auth_failed("10.0.0.7", "wa", "invalid_key")
    addon.auth_failed(None, "odd-\udcff-path", "missing_key")  # surrogateescape'd path bytes
    addon.admin_request(
        AdminRequest(
            "sql", remote="127.0.0.1", sql="SELECT {n:UInt8}", params={"n": 1}, status=200, row_count=1
        )
    )
    addon.admin_request(AdminRequest("denials", filters={"since": "1d"}, status=400, error="bad_request"))
    addon.admin_request(AdminRequest("who", caller="local", error="store_unavailable", message="down"))
    addon.admin_request(AdminRequest("reload", status=200, results={"wa": None, "x": "broken json"}))
    await addon.close()
    records = await log.read(0)
    events = [decode(r.payload) for r in records]
    await log.close()
    assert [encode(e) for e in events] == [r.payload for r in records]
    assert [type(e) for e in events] == [
        AuthFailed,
        AuthFailed,
        AdminQuery,
        AdminQuery,
        AdminQuery,
        AdminReload,
        AuthFailed,  # the pending sum of the first key, drained at close
    ]
    first, odd, sql, denials, who, reload, rest = events
    assert isinstance(first, AuthFailed) and isinstance(rest, AuthFailed) and isinstance(odd, AuthFailed)
    assert (first.count, rest.count, rest.remote, rest.server) == (1, 2, "10.0.0.7", "wa")
    assert odd.server == "odd-\\udcff-path" and odd.remote is None
    assert isinstance(sql, AdminQuery) and (sql.outcome, sql.sql, sql.params) == (
        "ok",
        "SELECT {n:UInt8}",
        {"n": 1},
    )
    assert isinstance(denials, AdminQuery) and denials.outcome == "refused"
    assert isinstance(who, AdminQuery) and (who.caller, who.outcome) == ("local", "error")
    assert isinstance(reload, AdminReload) and reload.outcome == "error"  # a policy did not load
