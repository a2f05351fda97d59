"""The policy engine: a pure function from (call, policy, counters, now) to a Decision.

No I/O, no clock reads, no mutation: the caller passes `now` (UTC seconds since the epoch)
and the current counter cells (`Limiter.view()`), and charges `decision.charges` after an
allow (`Limiter.charge`). decide() and charge() must run with no await between them.

Windows are fixed and aligned to UTC epoch boundaries:
window_start = floor(now / window_s) * window_s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from schemas.policy import LoadedPolicy, PolicyError, load_policy, parse_policy, window_text

__all__ = [
    "Call",
    "CounterKey",
    "CounterSnap",
    "Decision",
    "LoadedPolicy",
    "PolicyError",
    "can_ever_call",
    "decide",
    "load_policy",
    "parse_policy",
    "refusal_text",
    "window_text",
]

TOOLS_CALL = "tools/call"
_MEMO_MAX = 4096  # CounterKeys remembered per limit (distinct scope values) before starting over


@dataclass(frozen=True, slots=True)
class Call:
    server: str
    method: str  # JSON-RPC method, e.g. "tools/call"
    tool: str | None  # params.name for tools/call, else None
    grant: str
    agent: str
    session: str | None
    arguments: Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class CounterKey:
    """Hashable identity of one counter cell."""

    counter: str
    scope: str
    key: str
    window_s: int
    window_start: int


@dataclass(frozen=True, slots=True)
class CounterSnap:
    key: CounterKey
    count: int  # after this call was charged if allowed, else the current count
    max: int


@dataclass(frozen=True, slots=True)
class Decision:
    action: Literal["allow", "deny", "rate_limited", "invalid_arguments"]
    rule: str | None  # JSON Pointer into the policy file
    reason: str | None
    counters: tuple[CounterSnap, ...]
    retry_after_s: float | None  # rate_limited: seconds until the (last) blocking window ends
    charges: tuple[CounterKey, ...]  # cells to increment by 1 if allowed (empty otherwise)

    @property
    def allowed(self) -> bool:
        return self.action == "allow"


def _fast_frozen_init(cls: type) -> None:
    """Replace a frozen slots dataclass's __init__ by one that writes the slots directly.

    Same signature and semantics (all fields positional-or-keyword, no defaults), but about
    1.5x faster than the generated one, which goes through object.__setattr__ per field.
    Instances stay frozen, hashable and comparable; dataclasses.fields/asdict still work.
    """
    names = [f.name for f in fields(cls)]
    setters = {f"_set_{n}": cls.__dict__[n].__set__ for n in names}
    body = "".join(f"    _set_{n}(self, {n})\n" for n in names) or "    pass\n"
    src = f"def __init__(self, {', '.join(names)}):\n{body}"
    ns: dict[str, Any] = {}
    exec(src, setters, ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[misc]


for _cls in (Call, CounterKey, CounterSnap, Decision):
    _fast_frozen_init(_cls)

_PASS = Decision("allow", None, None, (), None, ())


def decide(call: Call, policy: LoadedPolicy, counters: Mapping[CounterKey, int], now: float) -> Decision:
    """Decide one call. Pure: reads `counters` (Limiter.view()), never changes them.

    Order for tools/call of a listed tool: action deny, then the arguments schema, then ALL
    limits (a refused call charges nothing). Other methods are allowed with rule None.
    """
    if call.method != TOOLS_CALL:
        return _PASS
    tool = call.tool
    if tool is None:
        return Decision("invalid_arguments", None, "tools/call without a tool name", (), None, ())
    plan = policy.tools.get(tool)
    if plan is None:
        if policy.default_allow:
            return Decision("allow", "/default", None, (), None, ())
        return Decision(
            "deny",
            "/default",
            policy.default_reason or f"tool {tool} is not allowed by policy (default deny)",
            (),
            None,
            (),
        )
    if plan.denied:
        return Decision("deny", plan.action_pointer, plan.deny_reason, (), None, ())
    validate = plan.validate
    if validate is not None:
        args = call.arguments
        try:
            validate({} if args is None else args)
        except Exception as e:  # JsonSchemaValueException, or anything odd the validator hits
            msg = getattr(e, "message", None) or str(e) or type(e).__name__
            if msg.startswith("data"):
                msg = "arguments" + msg[4:]
            return Decision(
                "invalid_arguments", plan.arguments_pointer, f"invalid arguments: {msg}", (), None, ()
            )
    limits = plan.limits
    if not limits:
        return Decision("allow", plan.action_pointer, None, (), None, ())

    get = counters.get
    keys = []
    snaps = []  # optimistic: as if allowed (count + 1); rebuilt if some limit blocks
    blocked = None  # (pointer, reason) of the first blocking limit
    retry = 0.0
    for counter, scope, scope_key, w, mx, ptr, why, memo in limits:
        start = int(now // w) * w
        # CounterKey instances are memoised per limit and scope value for the current window:
        # saves building and (thanks to identity hits) comparing them on every call.
        sv = scope_key(call)
        k = memo.get(sv)
        if k is None or k.window_start != start:
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            k = memo[sv] = CounterKey(counter, scope, sv, w, start)
        c = get(k, 0)
        keys.append(k)
        snaps.append(CounterSnap(k, c + 1, mx))
        if c >= mx:  # c + 1 > max
            r = start + w - now
            if blocked is None:
                blocked = (ptr, why)
                retry = r
            elif r > retry:
                retry = r
    if blocked is not None:
        current = tuple([CounterSnap(s.key, s.count - 1, s.max) for s in snaps])
        return Decision("rate_limited", blocked[0], blocked[1], current, retry, ())
    charges = tuple(dict.fromkeys(keys)) if plan.shared_cells else tuple(keys)
    return Decision("allow", plan.action_pointer, None, tuple(snaps), None, charges)


def can_ever_call(tool: str, policy: LoadedPolicy) -> bool:
    """False if the tool is explicitly denied, unlisted under default deny, or has a limit of max 0."""
    plan = policy.tools.get(tool)
    if plan is None:
        return policy.default_allow
    return not plan.never


def refusal_text(decision: Decision) -> str:
    """The message the model reads for a refused call. Raises ValueError for an allowed decision."""
    if decision.allowed:
        raise ValueError("refusal_text() of an allowed decision")
    parts = [f"Refused by policy: {decision.reason or decision.action}"]
    if decision.retry_after_s is not None:
        parts.append(f"; retry in {max(1, math.ceil(decision.retry_after_s))} s")
    if decision.rule is not None:
        parts.append(f" [rule {decision.rule}]")
    return "".join(parts)
