"""Policy file model + loader (schemas/policy.py) and the pure engine (gateway/policy/engine.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.policy.engine import (
    Call,
    CounterKey,
    CounterSnap,
    Decision,
    can_ever_call,
    decide,
    refusal_text,
)
from gateway.policy.limiter import Limiter
from schemas.policy import LoadedPolicy, PolicyError, load_policy, parse_policy

SEED = (
    b'{"version":"1","default":"deny","tools":{"open_session":{"limits":[{"counter":"open_session_rate",'
    b'"window":"minute","max":10,"scope":"grant"}]}}}'
)
T0 = 1_700_000_040.0  # a minute boundary (1_700_000_040 % 60 == 0)


def pol(doc: dict[str, Any]) -> LoadedPolicy:
    return parse_policy(json.dumps({"version": "1", **doc}).encode(), "policy.json")


def call(
    tool: str | None = "open_session",
    *,
    grant: str = "alice",
    agent: str = "agent-a",
    session: str | None = "s1",
    method: str = "tools/call",
    arguments: dict[str, Any] | None = None,
    server: str = "whatsapp",
) -> Call:
    return Call(server, method, tool, grant, agent, session, arguments)


def run(c: Call, p: LoadedPolicy, lim: Limiter, now: float) -> Decision:
    d = decide(c, p, lim.view(), now)
    lim.charge(d)
    return d


def broken(data: bytes | str) -> PolicyError:
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(PolicyError) as ei:
        parse_policy(raw, "policy.json")
    return ei.value


# --------------------------------------------------------------------------- loading


def test_seed_loads_unchanged(tmp_path: Path) -> None:
    f = tmp_path / "policy.json"
    f.write_bytes(SEED)
    p = load_policy(f)
    assert p.version == hashlib.sha256(SEED).hexdigest()
    assert p.source == str(f)
    assert p.model.default == "deny"
    lim = p.model.tools["open_session"].limits[0]
    assert (lim.counter, lim.window, lim.window_s, lim.max, lim.scope) == (
        "open_session_rate",
        "minute",
        60,
        10,
        "grant",
    )
    assert p.model.tools["open_session"].action is None


def test_seed_twelve_calls_in_a_minute() -> None:
    p = parse_policy(SEED, "policy.json")
    lim = Limiter()
    now = T0 + 23.0
    ds = [run(call(), p, lim, now + i * 0.1) for i in range(12)]
    assert [d.action for d in ds] == ["allow"] * 10 + ["rate_limited"] * 2
    for i, d in enumerate(ds[:10]):
        assert d.allowed and d.rule == "/tools/open_session"
        key = CounterKey("open_session_rate", "grant", "alice", 60, int(T0))
        assert d.charges == (key,)
        assert d.counters == (CounterSnap(key, i + 1, 10),)
    for i, d in enumerate(ds[10:], start=10):
        assert not d.allowed
        assert d.rule == "/tools/open_session/limits/0"
        assert d.reason == "rate limit open_session_rate (10 per minute) reached"
        assert d.charges == ()
        assert d.retry_after_s == pytest.approx(60 - 23.0 - i * 0.1)
        assert d.counters[0].count == 10
    assert refusal_text(ds[10]) == (
        "Refused by policy: rate limit open_session_rate (10 per minute) reached; retry in 36 s "
        "[rule /tools/open_session/limits/0]"
    )
    # another grant is unaffected; the next window allows again
    assert run(call(grant="bob"), p, lim, now + 2).allowed
    assert run(call(), p, lim, T0 + 60).allowed
    assert lim.expire(T0 + 60) == 2
    assert run(call(), p, lim, T0 + 60.5).counters[0].count == 2


def test_retry_text_rounds_up_min_one() -> None:
    p = pol({"tools": {"t": {"limits": [{"counter": "c", "window": "second", "max": 0}]}}})
    d = decide(call("t"), p, {}, T0 + 0.999)
    assert d.action == "rate_limited"
    assert 0 < d.retry_after_s <= 1
    assert refusal_text(d).endswith("retry in 1 s [rule /tools/t/limits/0]")
    p = pol({"tools": {"t": {"limits": [{"counter": "c", "window": 90, "max": 0}]}}})
    d = decide(call("t"), p, {}, 900.2)  # window [900, 990)
    assert d.retry_after_s == pytest.approx(89.8)
    assert "(0 per 90 s)" in refusal_text(d) and "retry in 90 s" in refusal_text(d)


def test_default_deny_and_allow() -> None:
    p = pol({"tools": {}})
    d = decide(call("send_message"), p, {}, T0)
    assert (d.action, d.rule) == ("deny", "/default")
    assert d.reason == "tool send_message is not allowed by policy (default deny)"
    assert refusal_text(d) == (
        "Refused by policy: tool send_message is not allowed by policy (default deny) [rule /default]"
    )
    p = pol({"default": "deny", "reason": "only vetted tools"})
    assert decide(call("x"), p, {}, T0).reason == "only vetted tools"
    p = pol({"default": "allow"})
    d = decide(call("anything"), p, {}, T0)
    assert (d.action, d.rule, d.charges, d.counters) == ("allow", "/default", (), ())
    with pytest.raises(ValueError):
        refusal_text(d)


def test_default_is_deny_when_absent() -> None:
    p = parse_policy(b'{"version":"1"}', "p.json")
    assert p.model.default == "deny" and p.model.tools == {}
    assert decide(call("x"), p, {}, T0).action == "deny"


def test_explicit_deny_and_listed_without_action() -> None:
    p = pol(
        {
            "default": "allow",
            "tools": {
                "delete_chat": {"action": "deny", "reason": "never delete"},
                "wipe": {"action": "deny"},
                "read": {},
                "send": {"action": "allow"},
            },
        }
    )
    d = decide(call("delete_chat"), p, {}, T0)
    assert (d.action, d.rule, d.reason) == ("deny", "/tools/delete_chat/action", "never delete")
    assert refusal_text(d) == "Refused by policy: never delete [rule /tools/delete_chat/action]"
    assert decide(call("wipe"), p, {}, T0).reason == "tool wipe is denied by policy"
    assert decide(call("read"), p, {}, T0).allowed
    assert decide(call("read"), p, {}, T0).rule == "/tools/read"
    assert decide(call("send"), p, {}, T0).rule == "/tools/send/action"
    # a listed tool without action is allowed even under default deny
    p = pol({"tools": {"read": {}}})
    assert decide(call("read"), p, {}, T0).allowed
    assert decide(call("other"), p, {}, T0).action == "deny"


def test_deny_wins_over_limits_and_consumes_nothing() -> None:
    p = pol({"tools": {"t": {"action": "deny", "limits": [{"counter": "c", "window": "minute", "max": 5}]}}})
    d = decide(call("t"), p, {}, T0)
    assert d.action == "deny" and d.charges == () and d.counters == ()


def test_non_tools_call_methods_are_allowed() -> None:
    p = pol({"default": "deny", "tools": {"t": {"action": "deny"}}})
    for method in ("initialize", "tools/list", "resources/read", "prompts/get", "ping"):
        d = decide(call(None, method=method), p, {}, T0)
        assert d.allowed and d.rule is None and d.charges == ()


def test_tools_call_without_name() -> None:
    p = pol({"default": "allow"})
    d = decide(call(None), p, {}, T0)
    assert d.action == "invalid_arguments" and d.rule is None and not d.charges


ARG_SCHEMA = {
    "type": "object",
    "properties": {"recipient": {"type": "string", "pattern": "^[0-9]+$"}, "count": {"type": "integer"}},
    "required": ["recipient"],
    "additionalProperties": False,
}


def test_argument_validation() -> None:
    p = pol(
        {
            "tools": {
                "send": {
                    "arguments": ARG_SCHEMA,
                    "limits": [{"counter": "sends", "window": "minute", "max": 5}],
                    "redact": ["content", "credentials.*"],
                }
            }
        }
    )
    ok = decide(call("send", arguments={"recipient": "123", "count": 2}), p, {}, T0)
    assert ok.allowed and ok.charges
    for bad in ({"recipient": 5}, {"recipient": "abc"}, {}, {"recipient": "1", "x": 1}, None):
        d = decide(call("send", arguments=bad), p, {}, T0)
        assert d.action == "invalid_arguments", bad
        assert d.rule == "/tools/send/arguments"
        assert d.reason.startswith("invalid arguments: ")
        assert d.charges == () and d.counters == ()
    d = decide(call("send", arguments={"recipient": 5}), p, {}, T0)
    assert d.reason == "invalid arguments: recipient must be string, not integer"
    assert refusal_text(d).endswith("[rule /tools/send/arguments]")
    assert p.redact_paths("send") == ("content", "credentials.*")
    assert p.redact_paths("other") == () and p.redact_paths(None) == ()


def test_argument_validation_does_not_mutate_arguments() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "default": 3}}}
    p = pol({"tools": {"t": {"arguments": schema}}})
    args: dict[str, Any] = {}
    assert decide(call("t", arguments=args), p, {}, T0).allowed
    assert args == {}


def test_shared_counter_across_two_tools() -> None:
    p = pol(
        {
            "tools": {
                "send_text": {"limits": [{"counter": "sends", "window": "minute", "max": 3}]},
                "send_file": {"limits": [{"counter": "sends", "window": 60, "max": 3}]},
            }
        }
    )
    lim = Limiter()
    seq = ["send_text", "send_file", "send_text", "send_file", "send_text"]
    ds = [run(call(t), p, lim, T0 + i) for i, t in enumerate(seq)]
    assert [d.action for d in ds] == ["allow"] * 3 + ["rate_limited"] * 2
    assert ds[3].rule == "/tools/send_file/limits/0"
    assert ds[0].charges == ds[1].charges
    assert len(lim.view()) == 1


def test_same_counter_twice_in_one_tool_is_charged_once() -> None:
    p = pol(
        {
            "tools": {
                "t": {
                    "limits": [
                        {"counter": "c", "window": "minute", "max": 5},
                        {"counter": "c", "window": "minute", "max": 2},
                    ]
                }
            }
        }
    )
    lim = Limiter()
    d = run(call("t"), p, lim, T0)
    assert len(d.charges) == 1 and len(d.counters) == 2
    assert run(call("t"), p, lim, T0).allowed
    d = run(call("t"), p, lim, T0)
    assert d.action == "rate_limited" and d.rule == "/tools/t/limits/1"


def test_several_limits_retry_is_max_over_blocking() -> None:
    p = pol(
        {
            "tools": {
                "t": {
                    "limits": [
                        {"counter": "per_min", "window": "minute", "max": 1},
                        {"counter": "per_hour", "window": "hour", "max": 1},
                        {"counter": "per_day", "window": "day", "max": 100},
                    ]
                }
            }
        }
    )
    lim = Limiter()
    now = 1_700_000_000.0 + 10  # minute starts at 1_699_999_980, hour at 1_699_999_200
    assert run(call("t"), p, lim, now).allowed
    d = run(call("t"), p, lim, now + 1)
    assert d.action == "rate_limited"
    assert d.rule == "/tools/t/limits/0"  # the first blocking limit
    assert d.retry_after_s == pytest.approx(1_699_999_200 + 3600 - (now + 1))
    assert [s.count for s in d.counters] == [1, 1, 1]
    # only the hour limit blocks in the next minute
    d = run(call("t"), p, lim, 1_700_000_040.0)
    assert d.rule == "/tools/t/limits/1"


@pytest.mark.parametrize(
    ("scope", "expected"),
    [("grant", "alice"), ("agent", "agent-a"), ("session", "s1"), ("tool", "t"), ("global", "*")],
)
def test_scope_keys(scope: str, expected: str) -> None:
    p = pol({"tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": scope}]}}})
    d = decide(call("t"), p, {}, T0)
    assert d.charges == (CounterKey("c", scope, expected, 60, int(T0)),)


def test_session_scope_without_session() -> None:
    p = pol(
        {"tools": {"t": {"limits": [{"counter": "c", "window": "minute", "max": 1, "scope": "session"}]}}}
    )
    assert decide(call("t", session=None), p, {}, T0).charges[0].key == "-"


def test_scopes_isolate() -> None:
    def lim_for(scope: str) -> LoadedPolicy:
        return pol(
            {"tools": {"t": {"limits": [{"counter": "c", "window": "day", "max": 1, "scope": scope}]}}}
        )

    # same agent, different grants: grant scope separates, agent scope does not
    lim = Limiter()
    p = lim_for("grant")
    assert run(call("t", grant="a", agent="x"), p, lim, T0).allowed
    assert run(call("t", grant="b", agent="x"), p, lim, T0).allowed
    lim = Limiter()
    p = lim_for("agent")
    assert run(call("t", grant="a", agent="x"), p, lim, T0).allowed
    assert not run(call("t", grant="b", agent="x"), p, lim, T0).allowed
    assert run(call("t", grant="b", agent="y"), p, lim, T0).allowed
    lim = Limiter()
    p = lim_for("global")
    assert run(call("t", grant="a", agent="x"), p, lim, T0).allowed
    assert not run(call("t", grant="b", agent="y", session="z"), p, lim, T0).allowed


def test_window_alignment_day_and_90s() -> None:
    p = pol(
        {
            "tools": {
                "d": {"limits": [{"counter": "daily", "window": "day", "max": 1}]},
                "n": {"limits": [{"counter": "ninety", "window": 90, "max": 1}]},
            }
        }
    )
    midnight = 1_700_006_400  # 2023-11-15T00:00:00Z
    assert midnight % 86400 == 0
    d = decide(call("d"), p, {}, midnight + 86399.5)
    assert d.charges[0].window_start == midnight and d.charges[0].window_s == 86400
    assert decide(call("d"), p, {}, midnight + 86400).charges[0].window_start == midnight + 86400
    assert decide(call("d"), p, {}, midnight - 0.001).charges[0].window_start == midnight - 86400
    # 90 s windows: multiples of 90 s since the epoch
    for now, start in ((0.0, 0), (89.9, 0), (90.0, 90), (1_700_000_000.0, 1_699_999_920)):
        assert decide(call("n"), p, {}, now).charges[0].window_start == start
    lim = Limiter()
    assert run(call("n"), p, lim, 1_699_999_920.0).allowed
    d = run(call("n"), p, lim, 1_700_000_000.0)
    assert d.action == "rate_limited" and d.retry_after_s == pytest.approx(10.0)
    assert run(call("n"), p, lim, 1_700_000_010.0).allowed


def test_can_ever_call() -> None:
    p = pol(
        {
            "default": "deny",
            "tools": {
                "ok": {},
                "limited": {"limits": [{"counter": "c", "window": "minute", "max": 1}]},
                "zero": {"limits": [{"counter": "z", "window": "minute", "max": 0}]},
                "no": {"action": "deny"},
            },
        }
    )
    assert can_ever_call("ok", p) and can_ever_call("limited", p)
    assert not can_ever_call("zero", p) and not can_ever_call("no", p)
    assert not can_ever_call("unlisted", p)
    assert can_ever_call("unlisted", pol({"default": "allow"}))
    assert can_ever_call("open_session", parse_policy(SEED, "p.json"))


def test_escaped_tool_name_in_pointer() -> None:
    p = pol({"tools": {"a/b~c": {"action": "deny"}}})
    assert decide(call("a/b~c"), p, {}, T0).rule == "/tools/a~1b~0c/action"


# --------------------------------------------------------------------------- broken files


def test_bad_json_reports_line_and_column() -> None:
    e = broken('{"version": "1",\n  "tools": {\n    "a": {"limits": [}\n}}')
    assert (e.path, e.pointer, e.line, e.column) == ("policy.json", "", 3, 22)
    assert str(e).startswith("policy.json: invalid JSON at line 3, column 22: ")


def test_bad_window() -> None:
    for window in ('"minutes"', "0", "-5", "1.5", "true", "null", '"60"'):
        e = broken(
            '{"version":"1","default":"deny","tools":{"open_session":{"limits":[{"counter":"c",'
            f'"window":{window},"max":10,"scope":"grant"}}]}}}}}}'
        )
        assert str(e) == (
            "policy.json: /tools/open_session/limits/0/window: "
            "must be second, minute, hour, day or a positive number of seconds"
        ), window


def test_unknown_keys() -> None:
    e = broken('{"version":"1","defualt":"deny"}')
    assert e.pointer == "/defualt" and "unknown key" in e.reason and "default" in e.reason
    e = broken('{"version":"1","tools":{"t":{"limts":[]}}}')
    assert str(e).startswith("policy.json: /tools/t/limts: unknown key")
    e = broken('{"version":"1","tools":{"t":{"limits":[{"counter":"c","window":1,"max":1,"scop":"x"}]}}}')
    assert e.pointer == "/tools/t/limits/0/scop"


def test_counter_declared_with_two_windows() -> None:
    e = broken(
        json.dumps(
            {
                "version": "1",
                "tools": {
                    "a": {"limits": [{"counter": "x", "window": "minute", "max": 1}]},
                    "b": {"limits": [{"counter": "x", "window": "hour", "max": 1}]},
                },
            }
        )
    )
    assert e.pointer == "/tools/b/limits/0/window"
    assert "/tools/a/limits/0/window" in e.reason
    assert str(e).startswith("policy.json: /tools/b/limits/0/window: counter 'x'")


def test_counter_declared_with_two_scopes() -> None:
    e = broken(
        json.dumps(
            {
                "version": "1",
                "tools": {
                    "a": {"limits": [{"counter": "x", "window": "minute", "max": 1}]},
                    "b": {"limits": [{"counter": "x", "window": 60, "max": 1, "scope": "global"}]},
                },
            }
        )
    )
    assert e.pointer == "/tools/b/limits/0" and "/tools/a/limits/0" in e.reason


@pytest.mark.parametrize(
    ("doc", "pointer", "fragment"),
    [
        ('{"version":"2"}', "/version", "must be '1'"),
        ('{"version":1}', "/version", "must be '1'"),
        ("{}", "/version", "required key is missing"),
        ('{"version":"1","default":"block"}', "/default", "must be 'allow' or 'deny'"),
        ('{"version":"1","tools":{"t":{"action":"nope"}}}', "/tools/t/action", "must be"),
        ('{"version":"1","tools":{"t":{"limits":[{"window":1,"max":1}]}}}', "/tools/t/limits/0/counter", ""),
        (
            '{"version":"1","tools":{"t":{"limits":[{"counter":"c","window":1,"max":-1}]}}}',
            "/tools/t/limits/0/max",
            "",
        ),
        (
            '{"version":"1","tools":{"t":{"limits":[{"counter":"c","window":1,"max":"9"}]}}}',
            "/tools/t/limits/0/max",
            "",
        ),
        ('{"version":"1","tools":{"t":{"arguments":{"type":"nope"}}}}', "/tools/t/arguments", "JSON Schema"),
        (
            '{"version":"1","tools":{"t":{"arguments":{"$ref":"http://x.invalid/s"}}}}',
            "/tools/t/arguments",
            "remote",
        ),
        (
            '{"version":"1","tools":{"t":{"action":"allow"},"t":{"action":"deny"}}}',
            "/tools/t",
            "duplicate key",
        ),
        ("[]", "", "must be a JSON object"),
        ('{"version":"1","x":NaN}', "", "NaN"),
    ],
)
def test_broken_files(doc: str, pointer: str, fragment: str) -> None:
    e = broken(doc)
    assert e.path == "policy.json" and e.pointer == pointer
    assert fragment in e.reason
    assert str(e) == (f"policy.json: {pointer}: {e.reason}" if pointer else f"policy.json: {e.reason}")


def test_load_policy_errors_name_the_path(tmp_path: Path) -> None:
    f = tmp_path / "p.json"
    f.write_text('{"version":"1","tools":{"t":{"limits":[{"counter":"c","window":"week","max":1}]}}}')
    with pytest.raises(PolicyError) as ei:
        load_policy(f)
    assert str(ei.value).startswith(f"{f}: /tools/t/limits/0/window: ")
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.json")


def test_dataclasses_stay_frozen_and_keyword_constructible() -> None:
    import dataclasses

    k = CounterKey(counter="c", scope="grant", key="a", window_s=60, window_start=0)
    assert k == CounterKey("c", "grant", "a", 60, 0) and hash(k) == hash(CounterKey("c", "grant", "a", 60, 0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.key = "b"  # type: ignore[misc]
    snap = CounterSnap(key=k, count=1, max=2)
    assert dataclasses.asdict(snap)["key"]["window_s"] == 60
    d = Decision(action="deny", rule="/default", reason="r", counters=(snap,), retry_after_s=None, charges=())
    assert dataclasses.replace(d, action="allow").allowed
    assert dataclasses.replace(call(), grant="bob").grant == "bob"
