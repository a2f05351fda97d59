"""Hypothesis properties of precedence: tool rule > risk-class default > top level.

Each key is taken from the most specific place that sets it: the action (and its reason),
the limits, the approval and the mode come from the tool's rule, else from the default of
the tool's risk class (top-level ``risk``), else from the top level (``default`` for the
action of an unlisted tool, ``mode``). A listed tool whose action is set nowhere is allowed.
The tool's risk class is the policy's override, else what the upstream says (``risk=``).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.engine import Call, decide
from gateway.policy.limiter import Limiter
from gateway.policy.risk import RISK_CLASSES, Risk
from schemas.policy import parse_policy

T0 = 1_700_000_000.0  # a minute boundary: every call below falls in one window
TOOL = "thing"  # a name without a verb: its class comes from risk= or the override

ACTIONS = st.sampled_from([None, "allow", "deny", "approve"])
MAXES = st.one_of(st.none(), st.integers(0, 4))
MODES = st.sampled_from([None, "enforce", "shadow"])


def limits(counter: str, mx: int | None) -> list[dict[str, Any]] | None:
    return None if mx is None else [{"counter": counter, "window": "minute", "max": mx}]


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    cls = draw(st.sampled_from(RISK_CLASSES))  # what the upstream says
    listed = draw(st.booleans())
    tool: dict[str, Any] = {}
    override = None
    if listed:
        if (a := draw(ACTIONS)) is not None:
            tool["action"] = a
        if (m := draw(MAXES)) is not None:
            tool["limits"] = limits("tool_c", m)
        if (md := draw(MODES)) is not None:
            tool["mode"] = md
        override = draw(st.one_of(st.none(), st.sampled_from(RISK_CLASSES)))
        if override is not None:
            tool["risk"] = {"class": override}
    effective = override or cls
    classes: dict[str, Any] = {}
    for c in RISK_CLASSES:
        if not draw(st.booleans()):
            continue
        rule: dict[str, Any] = {}
        if (a := draw(ACTIONS)) is not None:
            rule["action"] = a
        if (m := draw(MAXES)) is not None:
            rule["limits"] = limits(f"class_{c}", m)
        if (md := draw(MODES)) is not None:
            rule["mode"] = md
        classes[c] = rule
    doc: dict[str, Any] = {"version": "1", "default": draw(st.sampled_from(["allow", "deny"]))}
    if (md := draw(MODES)) is not None:
        doc["mode"] = md
    if classes:
        doc["risk"] = classes
    if listed:
        doc["tools"] = {TOOL: tool}
    return {"doc": doc, "cls": cls, "effective": effective, "listed": listed, "n": draw(st.integers(1, 7))}


def expected(s: dict[str, Any]) -> dict[str, Any]:
    """The precedence rules, written out independently of the compiler."""
    doc, eff = s["doc"], s["effective"]
    tool = doc.get("tools", {}).get(TOOL)
    crule = doc.get("risk", {}).get(eff)
    if tool is not None and "action" in tool:
        action, ptr = tool["action"], f"/tools/{TOOL}/action"
    elif crule is not None and "action" in crule:
        action, ptr = crule["action"], f"/risk/{eff}/action"
    elif tool is not None:
        action, ptr = "allow", f"/tools/{TOOL}"
    else:
        action, ptr = doc["default"], "/default"
    if tool is not None and "limits" in tool:
        lim = (tool["limits"][0]["max"], f"/tools/{TOOL}/limits/0")
    elif crule is not None and "limits" in crule:
        lim = (crule["limits"][0]["max"], f"/risk/{eff}/limits/0")
    else:
        lim = None
    mode = (tool or {}).get("mode") or (crule or {}).get("mode") or doc.get("mode") or "enforce"
    if tool is None and (crule is None or "action" not in crule) and doc["default"] == "deny":
        lim = None  # denied by default: limits never get a say
    if action == "deny":
        lim = None
    return {"action": action, "pointer": ptr, "limit": lim, "shadow": mode == "shadow"}


@settings(max_examples=400, deadline=None)
@given(s=scenarios())
def test_precedence_tool_over_class_over_default(s: dict[str, Any]) -> None:
    pol = parse_policy(json.dumps(s["doc"]).encode(), "p.json")
    exp = expected(s)
    lim = Limiter()
    call = Call("srv", "tools/call", TOOL, "g", "a", "s", {})
    risk = Risk(s["cls"], "medium", "annotations")
    for i in range(s["n"]):
        # approve: the human says yes, so the limits can be observed too
        d = decide(call, pol, lim.view(), T0 + i, risk=risk, approved=True)
        assert d.shadow is exp["shadow"]
        assert d.allowed is (exp["shadow"] or d.action == "allow")
        if exp["action"] == "deny":
            assert (d.action, d.rule) == ("deny", exp["pointer"]), (d, exp)
            continue
        if exp["limit"] is not None and i >= exp["limit"][0]:
            assert (d.action, d.rule) == ("rate_limited", exp["limit"][1]), (d, exp)
            continue
        assert d.action == "allow", (d, exp)
        assert d.rule == exp["pointer"]
        if exp["limit"] is not None:
            assert len(d.charges) == 1
            name = "tool_c" if exp["limit"][1].startswith("/tools/") else f"class_{s['effective']}"
            # shadow mode counts in a shadow copy of the counter
            assert d.charges[0].counter == ("shadow:" if exp["shadow"] else "") + name
        lim.charge(d)
    # and without the human: approve asks (unless a limit of max 0 refuses first)
    if exp["action"] == "approve":
        d = decide(call, pol, Limiter().view(), T0, risk=risk)
        if exp["limit"] is not None and exp["limit"][0] == 0:
            assert d.action == "rate_limited"
        else:
            assert (d.action, d.rule) == ("approval_required", exp["pointer"]) and d.approval is not None


@settings(max_examples=200, deadline=None)
@given(
    tool_action=st.sampled_from(["allow", "deny", "approve"]),
    class_action=st.sampled_from(["allow", "deny", "approve"]),
    default=st.sampled_from(["allow", "deny"]),
    cls=st.sampled_from(RISK_CLASSES),
)
def test_a_tool_rule_always_wins_over_its_class_and_the_default(
    tool_action: str, class_action: str, default: str, cls: str
) -> None:
    doc = {
        "version": "1",
        "default": default,
        "risk": {cls: {"action": class_action}},
        "tools": {TOOL: {"action": tool_action}},
    }
    pol = parse_policy(json.dumps(doc).encode(), "p.json")
    d = decide(Call("srv", "tools/call", TOOL, "g", "a", None, {}), pol, {}, T0, risk=Risk(cls, "low"))
    assert d.rule == f"/tools/{TOOL}/action"
    assert d.action == {"allow": "allow", "deny": "deny", "approve": "approval_required"}[tool_action]
    # an unlisted tool of the same class follows the class, whatever the default
    d = decide(Call("srv", "tools/call", "other", "g", "a", None, {}), pol, {}, T0, risk=Risk(cls, "low"))
    assert d.rule == f"/risk/{cls}/action"
    assert d.action == {"allow": "allow", "deny": "deny", "approve": "approval_required"}[class_action]
    # a tool of another class with no default of its own: `default` decides
    other = next(c for c in RISK_CLASSES if c != cls)
    d = decide(Call("srv", "tools/call", "other", "g", "a", None, {}), pol, {}, T0, risk=Risk(other, "low"))
    assert d.rule == "/default" and d.action == default
