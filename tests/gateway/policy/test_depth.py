"""Issue 15 (policy depth), the engine side: argument refusals, approve, risk, shadow,
upstream inputSchema, approvals state machine, config diff, policy JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastjsonschema
import pytest

from gateway.audit.redaction import args_sha256
from gateway.config import parse_config
from gateway.config_reload import diff_configs
from gateway.policy.approvals import ApprovalError, Approvals
from gateway.policy.engine import Call, decide, effective_risk, refusal_text
from gateway.policy.limiter import Limiter
from gateway.policy.risk import Risk, classify
from gateway.policy.upstream_schema import UpstreamSchemas
from schemas.events import ApprovalRequested, ApprovalResolved, CallDecided, ConfigLoaded
from schemas.policy import PolicyError, parse_policy

ROOT = Path(__file__).resolve().parents[3]
T0 = 1_700_000_000.0
PHONE = r"^\+[1-9][0-9]{7,14}$"


def pol(doc: dict[str, Any]) -> Any:
    return parse_policy(json.dumps({"version": "1", **doc}).encode(), "p.json")


def call(tool: str = "t", args: dict[str, Any] | None = None, grant: str = "g", agent: str = "a") -> Call:
    return Call("srv", "tools/call", tool, grant, agent, "s", args)


# ---------------------------------------------------------------- 1. argument refusals


SEND = {
    "type": "object",
    "properties": {
        "phone_number": {"type": "string", "pattern": PHONE},
        "api_token": {"type": "string", "pattern": "^tok_"},
        "content": {"type": "string", "maxLength": 5},
        "count": {"type": "integer", "minimum": 1},
        "kind": {"enum": ["text", "image"]},
    },
    "required": ["phone_number"],
    "additionalProperties": False,
}


@pytest.fixture
def send_policy() -> Any:
    return pol({"tools": {"send_message": {"arguments": SEND, "redact": ["content"]}}})


def refusal(p: Any, args: dict[str, Any]) -> str:
    d = decide(call("send_message", args), p, {}, T0)
    assert d.action == "invalid_arguments" and not d.allowed
    return refusal_text(d)


def test_refusal_names_path_constraint_and_rule(send_policy: Any) -> None:
    text = refusal(send_policy, {"phone_number": "+1 555"})
    assert text == (
        f'Refused by policy: invalid arguments: phone_number "+1 555" does not match {PHONE} '
        "[rule /tools/send_message/arguments]"
    )
    assert "is missing required phone_number" in refusal(send_policy, {})
    assert "has unexpected extra" in refusal(send_policy, {"phone_number": "+15550001111", "extra": 1})
    assert "count 0 is less than minimum 1" in refusal(
        send_policy, {"phone_number": "+15550001111", "count": 0}
    )
    assert 'kind "video" is not one of ["text","image"]' in refusal(
        send_policy, {"phone_number": "+15550001111", "kind": "video"}
    )
    assert "phone_number must be string, not integer" in refusal(send_policy, {"phone_number": 5})


def test_refusal_never_echoes_redacted_or_secret_values(send_policy: Any) -> None:
    secret = "hunter2-very-secret"
    text = refusal(send_policy, {"phone_number": "+15550001111", "api_token": secret})
    assert secret not in text and "api_token (redacted) does not match ^tok_" in text
    text = refusal(send_policy, {"phone_number": "+15550001111", "content": "a private note"})
    assert "private" not in text and "content must have at most 5 characters (has 14)" in text


def test_long_values_are_cut(send_policy: Any) -> None:
    text = refusal(send_policy, {"phone_number": "+" + "9" * 200})
    assert "9" * 200 not in text and "…" in text


# ---------------------------------------------------------------- upstream inputSchema


TOOLS_LIST = {
    "tools": [
        {"name": "send_message", "description": "Send a message", "inputSchema": SEND},
        {"name": "get_chats", "inputSchema": {"type": "object"}, "annotations": {"readOnlyHint": True}},
        {"name": "broken", "inputSchema": {"type": "object", "properties": {"x": {"$ref": "http://e/x"}}}},
    ]
}


def test_upstream_schema_checks_calls_only_when_enabled() -> None:
    up = UpstreamSchemas(enabled={"wa"})
    assert up.update("wa", TOOLS_LIST) == 3 and up.update("other", TOOLS_LIST) == 3
    assert up.validator("other", "send_message") is None  # not enabled: no validator
    assert up.validator("wa", "nope") is None  # never listed: the upstream judges
    assert up.validator("wa", "broken") is None and ("wa", "broken") in up.problems
    p = pol({"default": "allow"})
    bad = Call("wa", "tools/call", "send_message", "g", "a", None, {"phone_number": "+1 555"})
    d = decide(bad, p, {}, T0, upstream=up.validator("wa", "send_message"))
    assert d.action == "invalid_arguments" and d.rule == "upstream:/tools/send_message/inputSchema"
    assert "does not match" in d.reason
    ok = Call("wa", "tools/call", "send_message", "g", "a", None, {"phone_number": "+15550001111"})
    assert decide(ok, p, {}, T0, upstream=up.validator("wa", "send_message")).allowed
    assert up.check("wa", "send_message", {"phone_number": 1}) == "phone_number must be string, not integer"
    assert up.risk("wa", "get_chats") == Risk("read", "low", "annotations")
    assert up.risk("wa", "send_message").cls == "write"
    # compiled once per distinct schema, whatever the number of tools/list answers
    n = len(up._compiled)
    up.update("wa", TOOLS_LIST)
    assert len(up._compiled) == n


# ---------------------------------------------------------------- 2. approval


def approve_policy(remember: str = "1h") -> Any:
    return pol(
        {
            "tools": {
                "send_message": {
                    "action": "approve",
                    "approval": {"timeout": "5m", "remember": remember},
                    "limits": [{"counter": "sends", "window": "hour", "max": 2}],
                }
            }
        }
    )


def test_approve_asks_then_remembers_within_window() -> None:
    p = approve_policy("1h")
    lim, ap = Limiter(), Approvals()
    args = {"phone_number": "+15550001111", "text": "hi"}
    c = call("send_message", args)
    d = decide(c, p, lim.view(), T0, approvals=ap.remembered())
    assert d.action == "approval_required" and not d.allowed and d.charges == ()
    assert d.rule == "/tools/send_message/action"
    assert d.approval is not None and (d.approval.timeout_s, d.approval.remember_s) == (300, 3600)
    req = ap.request(
        server="srv",
        grant="g",
        agent="a",
        tool="send_message",
        args_sha256=args_sha256(args),
        timeout_s=d.approval.timeout_s,
        remember_s=d.approval.remember_s,
        rule=d.rule,
        now=T0,
    )
    assert ap.pending() == [req] and ap.next_deadline() == T0 + 300
    res = ap.approve(req.id, "cli:alice", T0 + 10, "ok")
    assert res.approved and res.by == "cli:alice" and res.remembered_until == T0 + 10 + 3600
    assert ap.pending() == []
    # the proxy decides again once approved: limits checked now, approval skipped
    d2 = decide(c, p, lim.view(), T0 + 10, approved=True)
    assert d2.action == "allow" and d2.charges
    lim.charge(d2)
    # the same grant, tool and arguments within the hour: no question
    d3 = decide(c, p, lim.view(), T0 + 20, approvals=ap.remembered())
    assert d3.allowed and d3.reason == "approval remembered"
    lim.charge(d3)
    # ... but limits still hold (max 2 per hour): refused before asking anybody
    assert decide(c, p, lim.view(), T0 + 30, approvals=ap.remembered()).action == "rate_limited"
    # other arguments, other grant, or after the window: asked again
    assert decide(
        call("send_message", {"x": 1}), approve_policy(), {}, T0, approvals=ap.remembered()
    ).action == ("approval_required")
    assert decide(call("send_message", args, grant="h"), p, {}, T0, approvals=ap.remembered()).action == (
        "approval_required"
    )
    assert decide(c, p, {}, T0 + 10 + 3600, approvals=ap.remembered()).action == "approval_required"


def test_approve_once_remembers_nothing_and_class_default_approval() -> None:
    p = approve_policy("once")
    d = decide(call("send_message"), p, {}, T0)
    assert d.approval is not None and d.approval.remember_s == 0
    ap = Approvals()
    req = ap.request(
        server="srv",
        grant="g",
        agent="a",
        tool="send_message",
        args_sha256="x",
        timeout_s=300,
        remember_s=0,
        rule="/tools/send_message/action",
        now=T0,
    )
    assert ap.approve(req.id, "bob", T0).remembered_until is None and not ap.remembered()
    q = pol({"default": "allow", "risk": {"delete": {"action": "approve"}}})
    d = decide(call("delete_chat"), q, {}, T0)
    assert d.action == "approval_required" and d.rule == "/risk/delete/action"
    assert d.approval is not None and (d.approval.timeout_s, d.approval.remember_s) == (300, 0)


def test_approvals_state_machine() -> None:
    ids = iter(["a1", "a2", "a3", "a4"])
    ap = Approvals(new_id=lambda: next(ids))
    kw: dict[str, Any] = dict(
        server="s", grant="g", agent="a", tool="t", args_sha256="h", remember_s=0, rule="/r"
    )
    r1 = ap.request(timeout_s=60, now=T0, **kw)
    r2 = ap.request(timeout_s=10, now=T0, **kw)
    r3 = ap.request(timeout_s=60, now=T0, **kw)
    assert [r.id for r in ap.pending()] == ["a1", "a2", "a3"]
    assert ap.deny("a1", "carol", T0 + 1, "no").outcome == "denied"
    with pytest.raises(ApprovalError, match="already denied"):
        ap.approve("a1", "dave", T0 + 2)
    with pytest.raises(ApprovalError, match="no pending approval zz"):
        ap.approve("zz", "dave", T0 + 2)
    # the timeout wins over a late approval, even before expire() ran
    with pytest.raises(ApprovalError, match="already timed out"):
        ap.approve(r2.id, "dave", T0 + 11)
    assert ap.resolution(r2.id).outcome == "timed_out" and ap.resolution(r2.id).at == T0 + 10
    assert ap.cancel(r3.id, T0 + 5).outcome == "cancelled" and ap.cancel(r3.id, T0 + 6) is None
    r4 = ap.request(timeout_s=30, now=T0, **kw)
    assert ap.expire(T0 + 29) == []
    [res] = ap.expire(T0 + 30)
    assert res.id == r4.id and res.outcome == "timed_out" and res.waited_s == 30
    assert ap.pending() == [] and r1.id == "a1"
    with pytest.raises(ValueError):
        ap.request(timeout_s=0, now=T0, **kw)


def test_approval_events_validate() -> None:
    ApprovalRequested(
        approval_id="a1",
        server="s",
        tool="t",
        grant="g",
        agent="a",
        args_sha256="h",
        rule="/r",
        timeout_s=300,
        expires_ts=1,
        remember_s=3600,
    )
    ApprovalResolved(
        approval_id="a1",
        server="s",
        tool="t",
        grant="g",
        agent="a",
        outcome="approved",
        by="alice",
        comment="ok",
        resolved_ts=2,
        waited_ms=1000,
    )
    ConfigLoaded(path="x.toml", applied=["grants.bob added"], restart_needed=["gateway.listen"])
    assert "shadow" in CallDecided.model_fields and "would_decision" in CallDecided.model_fields


# ---------------------------------------------------------------- 3. risk


@pytest.mark.parametrize(
    ("name", "desc", "ann", "expected"),
    [
        ("open_session", None, None, ("execute", "high", "name")),
        ("runCommand", None, None, ("execute", "high", "name")),
        ("delete-chat", None, None, ("delete", "high", "name")),
        ("send_message", None, None, ("write", "medium", "name")),
        ("get_chats", None, None, ("read", "low", "name")),
        ("chats", "Lists the chats of the account", None, ("write", "medium", "default")),
        ("chats", "List the chats", None, ("read", "low", "description")),
        ("whatever", None, {"readOnlyHint": True}, ("read", "low", "annotations")),
        ("delete_chat", None, {"readOnlyHint": True}, ("read", "low", "annotations")),
        ("mutate", None, {"destructiveHint": False, "idempotentHint": True}, ("write", "low", "annotations")),
        ("mutate", None, {"destructiveHint": False, "openWorldHint": True}, ("write", "high", "annotations")),
        ("mutate", None, {"openWorldHint": False}, ("delete", "high", "annotations")),
        ("exec_sql", None, {"destructiveHint": False}, ("execute", "high", "name")),
        ("mutate", None, {"title": "only a title"}, ("write", "medium", "default")),
    ],
)
def test_classify(
    name: str, desc: str | None, ann: dict[str, Any] | None, expected: tuple[str, str, str]
) -> None:
    r = classify(name, desc, ann)
    assert (r.cls, r.level, r.source) == expected


def test_risk_override_in_policy() -> None:
    assert classify("get_x", override={"class": "delete"}) == Risk("delete", "high", "policy")
    assert classify("get_x", override={"level": "high"}) == Risk("read", "high", "policy")
    p = pol(
        {
            "default": "allow",
            "risk": {"delete": {"action": "deny"}},
            "tools": {"get_x": {"risk": {"class": "delete"}}},
        }
    )
    assert effective_risk("get_x", p).cls == "delete"
    # the policy's override beats what the upstream said
    d = decide(call("get_x"), p, {}, T0, risk=Risk("read", "low", "annotations"))
    assert d.action == "deny" and d.rule == "/risk/delete/action"


def test_class_defaults_apply_to_unlisted_and_listed_tools() -> None:
    p = pol(
        {
            "default": "allow",
            "risk": {
                "execute": {"limits": [{"counter": "exec", "window": "minute", "max": 1}]},
                "delete": {"action": "deny", "reason": "no deleting"},
            },
            "tools": {"open_session": {"reason": "listed"}, "remove_all": {"action": "allow"}},
        }
    )
    lim = Limiter()
    d = decide(call("run_job"), p, lim.view(), T0)
    assert d.allowed and d.charges[0].counter == "exec"
    lim.charge(d)
    # the class's counter is one counter for every tool of the class
    d = decide(call("open_session"), p, lim.view(), T0)
    assert d.action == "rate_limited" and d.rule == "/risk/execute/limits/0"
    assert decide(call("drop_table"), p, {}, T0).reason == "no deleting"
    assert decide(call("remove_all"), p, {}, T0).allowed  # the tool's own action wins
    assert decide(call("get_x"), p, {}, T0).rule == "/default"


# ---------------------------------------------------------------- 4. shadow


def test_shadow_mode_forwards_and_says_what_would_have_happened() -> None:
    p = pol(
        {
            "tools": {
                "s": {"mode": "shadow", "limits": [{"counter": "c", "window": "minute", "max": 1}]},
                "e": {"limits": [{"counter": "c", "window": "minute", "max": 1}]},
                "d": {"mode": "shadow", "action": "deny"},
            }
        }
    )
    lim = Limiter()
    d1 = decide(call("s"), p, lim.view(), T0)
    assert d1.shadow and d1.allowed and d1.action == "allow"
    assert d1.charges[0].counter == "shadow:c"
    lim.charge(d1)
    d2 = decide(call("s"), p, lim.view(), T0)
    assert d2.shadow and d2.allowed and d2.action == "rate_limited" and d2.charges == ()
    # the enforced tool sharing counter "c" lost nothing to the shadow traffic
    e = decide(call("e"), p, lim.view(), T0)
    assert e.action == "allow" and not e.shadow
    dd = decide(call("d"), p, {}, T0)
    assert dd.allowed and dd.action == "deny"
    whole = pol({"mode": "shadow"})
    dw = decide(call("anything"), whole, {}, T0)
    assert dw.allowed and dw.shadow and dw.action == "deny" and dw.rule == "/default"


# ---------------------------------------------------------------- 6. schema, errors


def test_policy_schema_file_is_in_sync() -> None:
    from ledgergate.cli.policy import policy_schema_text

    committed = (ROOT / "schemas" / "policy.schema.json").read_text()
    assert committed == policy_schema_text(), (
        "run: python -m ledgergate policy schema > schemas/policy.schema.json"
    )
    v = fastjsonschema.compile(json.loads(committed))
    seed = (
        json.loads((ROOT / "examples" / "policy.json").read_text())
        if (ROOT / "examples" / "policy.json").exists()
        else None
    )
    for doc in [
        {
            "version": "1",
            "default": "deny",
            "tools": {
                "open_session": {
                    "limits": [
                        {"counter": "open_session_rate", "window": "minute", "max": 10, "scope": "grant"}
                    ]
                }
            },
        },
        {
            "version": "1",
            "mode": "shadow",
            "risk": {"delete": {"action": "approve", "approval": {"remember": "1h"}}},
            "tools": {"x": {"risk": {"class": "write", "level": "high"}, "approval": {"timeout": 30}}},
        },
        *([seed] if seed else []),
    ]:
        v(doc)
        parse_policy(json.dumps(doc).encode(), "p")


@pytest.mark.parametrize(
    ("doc", "pointer", "fragment"),
    [
        (
            {"tools": {"t": {"action": "approve", "approval": {"timeout": "5 minutes"}}}},
            "/tools/t/approval/timeout",
            "duration",
        ),
        ({"tools": {"t": {"approval": {"remember": "twice"}}}}, "/tools/t/approval/remember", '"once"'),
        (
            {"tools": {"t": {"approval": {"remmber": "1h"}}}},
            "/tools/t/approval/remmber",
            "allowed: timeout, remember",
        ),
        ({"risk": {"exec": {}}}, "/risk/exec", "allowed: read, write, delete, execute"),
        ({"risk": {"delete": {"actoin": "deny"}}}, "/risk/delete/actoin", "allowed: action, reason"),
        ({"tools": {"t": {"risk": {"klass": "read"}}}}, "/tools/t/risk/klass", "allowed: class, level"),
        ({"mode": "dry"}, "/mode", "enforce"),
        (
            {
                "risk": {"execute": {"limits": [{"counter": "c", "window": "hour", "max": 1}]}},
                "tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1}]}},
            },
            "/risk/execute/limits/0/window",
            "window",
        ),
    ],
)
def test_new_keys_errors_name_the_pointer(doc: dict[str, Any], pointer: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as ei:
        pol(doc)
    assert ei.value.pointer == pointer and fragment in ei.value.reason, str(ei.value)


# ---------------------------------------------------------------- 7. config diff


def cfg(tmp_path: Path, text: str) -> Any:
    (tmp_path / "p.json").write_text('{"version": "1"}')
    return parse_config(__import__("tomllib").loads(text), tmp_path / "c.toml", environ={})


BASE = """
[gateway]
listen = "127.0.0.1:8080"
[servers.wa]
url = "http://127.0.0.1:9/mcp"
policy = "p.json"
[grants.alice]
key = "k1"
"""


def test_config_diff(tmp_path: Path) -> None:
    old = cfg(tmp_path, BASE)
    assert not diff_configs(old, cfg(tmp_path, BASE)).changed
    new = cfg(
        tmp_path,
        BASE.replace('key = "k1"', 'key = "k2"\n[grants.bob]\nkey = "k3"')
        + '[servers.fs]\ncommand = ["x"]\npolicy = "p.json"\n',
    )
    d = diff_configs(old, new)
    assert (
        d.live and d.grants_changed == ["alice"] and d.grants_added == ["bob"] and d.servers_added == ["fs"]
    )
    assert "grants.bob added" in d.applied
    d = diff_configs(
        old,
        cfg(
            tmp_path,
            BASE.replace("8080", "8081").replace(
                'policy = "p.json"', 'policy = "p.json"\nvalidate_upstream_schema = true'
            ),
        ),
    )
    assert not d.live and d.restart_needed == ["gateway.listen"] and d.servers_reconfigured == ["wa"]
    d = diff_configs(
        old, cfg(tmp_path, BASE.replace("9/mcp", "10/mcp") + '[eventlog]\ndurability = "batched"\n')
    )
    assert d.servers_restarted == ["wa"] and d.restart_needed == ["eventlog.durability"]
    d = diff_configs(cfg(tmp_path, BASE + '[servers.fs]\ncommand = ["x"]\npolicy = "p.json"\n'), old)
    assert d.servers_removed == ["fs"] and d.live


def test_check_explains_policy_errors_with_the_json_pointer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledgergate.cli.main import main

    (tmp_path / "p.json").write_text(
        '{"version": "1", "risk": {"delete": {"action": "approve", "approval": {"timeout": "soon"}}}}'
    )
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        f'[gateway]\nlisten = "127.0.0.1:0"\ndata_dir = "{tmp_path / "d"}"\n'
        '[servers.wa]\nurl = "http://127.0.0.1:9/mcp"\npolicy = "p.json"\nvalidate_upstream_schema = true\n'
    )
    assert main(["check", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'p.json'}: /risk/delete/approval/timeout: must be a duration like" in err


def test_readme_policy_examples_load() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Policies") : text.index("## The audit trail")]
    blocks = [b.split("```", 1)[0] for b in section.split("```json\n")[1:]]
    assert len(blocks) == 2
    seed, full = (parse_policy(b.encode(), "README.md") for b in blocks)
    assert seed.tools["open_session"].limits[0].max == 10
    d = decide(call("send_message", {"phone_number": "+1 555"}), full, {}, T0)
    assert d.action == "invalid_arguments" and f"does not match {PHONE}" in d.reason
    assert decide(call("purge_all"), full, {}, T0).action == "approval_required"
    assert decide(call("create_group"), full, {}, T0).shadow
