"""The policy file: pydantic v2 model, loader and the precompiled plan the engine reads.

A policy file is one JSON object::

    {"version": "1", "default": "deny", "reason": "...",
     "tools": {"open_session": {"action": "allow", "reason": "...",
                                "limits": [{"counter": "open_session_rate", "window": "minute",
                                            "max": 10, "scope": "grant"}],
                                "arguments": {...JSON Schema...},
                                "redact": ["content", "credentials.*"],
                                "mode": "enforce",
                                "risk": {"class": "write", "level": "high"}},
               "send_message": {"action": "approve",
                                "approval": {"timeout": "5m", "remember": "1h"}}},
     "risk": {"execute": {"limits": [...]}, "delete": {"action": "approve"}},
     "mode": "enforce"}

Precedence, key by key (action, reason, limits, approval, mode): the tool's own rule, else
the default of the tool's risk class (top-level ``risk``), else the top level (``default``
for the action of an unlisted tool; ``mode``). A listed tool whose action is set nowhere is
allowed. ``arguments`` and ``redact`` exist only per tool.

Unknown keys are errors (typos must not silently weaken a policy), and so are duplicate
keys. Every error is a `PolicyError` naming the file, the JSON Pointer of the offending key
and the reason.

`parse_policy` also compiles everything the engine (`gateway.policy.engine.decide`) needs on the hot
path into plain tuples (`ToolPlan`, `LimitSpec`), so that deciding does no pydantic work.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal, NamedTuple

import fastjsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "WINDOW_NAMES",
    "WINDOW_SECONDS",
    "ApprovalSpec",
    "Limit",
    "LimitSpec",
    "LoadedPolicy",
    "Policy",
    "PolicyError",
    "ToolPlan",
    "ToolRule",
    "json_pointer",
    "load_policy",
    "parse_duration",
    "parse_policy",
    "window_text",
]

WINDOW_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
WINDOW_NAMES: dict[int, str] = {v: k for k, v in WINDOW_SECONDS.items()}
_WINDOW_MSG = "must be second, minute, hour, day or a positive number of seconds"

Scope = Literal["grant", "agent", "session", "tool", "global"]
RiskClassName = Literal["read", "write", "delete", "execute"]
RISK_CLASS_NAMES: tuple[str, ...] = ("read", "write", "delete", "execute")
Mode = Literal["enforce", "shadow"]
SHADOW_PREFIX = "shadow:"  # counter name prefix of the shadow copies of a shadow-mode tool's limits
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_MSG = 'must be a duration like "30s", "5m", "1h", "1d" or a positive number of seconds'
_DURATION_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": "^[0-9]+[smhd]$"}, {"type": "integer", "minimum": 1}]
}
_REMEMBER_MSG = 'must be "once" or a duration like "30s", "5m", "1h", "1d" or a positive number of seconds'


def parse_duration(v: Any) -> int:
    """ "30s" / "5m" / "1h" / "2d" or a positive integer of seconds -> seconds; ValueError else."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    if isinstance(v, str) and len(v) >= 2 and v[-1] in _DURATION_UNITS and v[:-1].isdigit():
        n = int(v[:-1]) * _DURATION_UNITS[v[-1]]
        if n > 0:
            return n
    raise ValueError(_DURATION_MSG)


class PolicyError(ValueError):
    """A policy file that cannot be used: `str()` is `path: /json/pointer: reason`.

    `pointer` is "" for errors about the whole document (unreadable file, invalid JSON);
    invalid JSON also sets `line` and `column` (1-based).
    """

    def __init__(
        self, path: str, pointer: str, reason: str, *, line: int | None = None, column: int | None = None
    ) -> None:
        self.path = path
        self.pointer = pointer
        self.reason = reason
        self.line = line
        self.column = column
        super().__init__(f"{path}: {pointer}: {reason}" if pointer else f"{path}: {reason}")


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def json_pointer(*tokens: str | int) -> str:
    """RFC 6901 JSON Pointer from reference tokens: json_pointer("tools", "a/b", 0) == "/tools/a~1b/0"."""
    return "".join("/" + _escape(str(t)) for t in tokens)


# --------------------------------------------------------------------------- model


class Limit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    counter: str = Field(min_length=1, description="counter name; one name = one counter across tools")
    window: str | int = Field(
        description="second | minute | hour | day, or a positive number of seconds",
        json_schema_extra={"anyOf": [{"enum": list(WINDOW_SECONDS)}, {"type": "integer", "minimum": 1}]},
    )
    max: int = Field(ge=0, description="calls allowed per window; 0 never allows")
    scope: Scope = "grant"

    @field_validator("window", mode="plain")
    @classmethod
    def _check_window(cls, v: Any) -> str | int:
        if isinstance(v, str) and v in WINDOW_SECONDS:
            return v
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
        raise PydanticCustomError("window", _WINDOW_MSG)

    @property
    def window_s(self) -> int:
        w = self.window
        return WINDOW_SECONDS[w] if isinstance(w, str) else w


class Approval(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    timeout: str | int = Field(
        "5m",
        description='how long a call waits for a human ("30s", "5m", "1h" or seconds); then refused',
        json_schema_extra=_DURATION_SCHEMA,
    )
    remember: str | int = Field(
        "once",
        description='"once": every call asks; a duration ("1h"): an approval also covers the same grant '
        "calling the same tool with the same arguments (sha256) for that long",
        json_schema_extra={"anyOf": [{"const": "once"}, *_DURATION_SCHEMA["anyOf"]]},
    )

    @field_validator("timeout", mode="plain")
    @classmethod
    def _check_timeout(cls, v: Any) -> str | int:
        try:
            parse_duration(v)
        except ValueError:
            raise PydanticCustomError("duration", _DURATION_MSG) from None
        return v

    @field_validator("remember", mode="plain")
    @classmethod
    def _check_remember(cls, v: Any) -> str | int:
        if v == "once":
            return v
        try:
            parse_duration(v)
        except ValueError:
            raise PydanticCustomError("duration", _REMEMBER_MSG) from None
        return v

    @property
    def timeout_s(self) -> int:
        return parse_duration(self.timeout)

    @property
    def remember_s(self) -> int:
        return 0 if self.remember == "once" else parse_duration(self.remember)


class RiskOverride(BaseModel):
    """A tool's risk as the policy says, over what its annotations or name suggest."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)

    class_: RiskClassName | None = Field(None, alias="class", description="read | write | delete | execute")
    level: Literal["low", "medium", "high"] | None = None


class ClassRule(BaseModel):
    """The default rule of every tool of one risk class (top-level `risk`)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    action: Literal["allow", "deny", "approve"] | None = Field(None, description="absent: from `default`")
    reason: str | None = None
    limits: list[Limit] = Field(default_factory=list)
    approval: Approval | None = None
    mode: Mode | None = None


class RiskDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    read: ClassRule | None = None
    write: ClassRule | None = None
    delete: ClassRule | None = None
    execute: ClassRule | None = None


class ToolRule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    action: Literal["allow", "deny", "approve"] | None = Field(
        None, description="absent: its risk class's action, else allowed (subject to limits)"
    )
    reason: str | None = None
    limits: list[Limit] = Field(default_factory=list)
    approval: Approval | None = Field(None, description='with action "approve": timeout and remember')
    mode: Mode | None = Field(None, description="shadow: decide and record, forward anyway")
    risk: RiskOverride | None = Field(None, description="this tool's risk class and level")
    arguments: dict[str, Any] | None = Field(None, description="JSON Schema of the call's arguments")
    redact: list[str] | None = Field(None, description="argument key paths the audit writer redacts")

    @field_validator("redact")
    @classmethod
    def _check_redact(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            for i, p in enumerate(v):
                if not p:
                    raise PydanticCustomError("redact", "entry {i} is empty", {"i": i})
        return v


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    version: Literal["1"]
    default: Literal["allow", "deny"] = "deny"
    reason: str | None = Field(None, description="text used when the default denies")
    mode: Mode = Field("enforce", description="shadow: decide and record every call, forward anyway")
    risk: RiskDefaults | None = Field(None, description="default rules per risk class")
    tools: dict[str, ToolRule] = Field(default_factory=dict)


# --------------------------------------------------------------------------- compiled plan


class LimitSpec(NamedTuple):
    """One limit, precompiled. Field order is relied on by the engine (tuple unpacking)."""

    counter: str
    scope: str
    scope_key: Callable[[Any], str]  # Call -> key of the cell in this scope
    window_s: int
    max: int
    pointer: str  # "/tools/<tool>/limits/<i>"
    reason: str  # "rate limit <counter> (<max> per <window>) reached"
    memo: dict[str, Any]  # engine-private cache (scope value -> CounterKey of the current window)


@dataclass(frozen=True, slots=True)
class ApprovalSpec:
    """What a call of a tool with action "approve" waits for."""

    timeout_s: int
    remember_s: int  # 0: "once" (each call asks)
    pointer: str  # the rule that asked: "/tools/<tool>/action" or "/risk/<class>/action"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """Everything `decide` needs about one tool (listed, or of a risk class with defaults)."""

    name: str
    denied: bool
    action_pointer: str  # "/tools/<tool>/action" if action is given, else "/tools/<tool>"
    deny_reason: str
    validate: Callable[[Any], Any] | None
    arguments_pointer: str
    limits: tuple[LimitSpec, ...]
    shared_cells: bool  # two limits of this tool address the same counter cell (charge once)
    never: bool  # denied, or some limit has max 0
    redact: tuple[str, ...]
    approval: ApprovalSpec | None = None  # set when the effective action is "approve"
    shadow: bool = False  # effective mode is shadow (its limits count in shadow copies)
    risk_class: str | None = None  # the policy's override of the tool's class, if any
    risk_level: str | None = None  # the policy's override of the tool's level, if any


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    model: Policy
    version: str  # sha256 hex of the file's bytes
    source: str  # the path it was read from (or the `source` given to parse_policy)
    tools: Mapping[str, ToolPlan]  # listed tools, as if no risk class had defaults
    default_allow: bool
    default_reason: str | None  # policy-level `reason`, if any
    shadow: bool = False  # top-level mode shadow (applies to unlisted tools' default decision)
    # with a top-level `risk`: class -> (plans of the listed tools merged with that class's
    # defaults, plan of an unlisted tool of that class or None when the class sets nothing)
    class_plans: Mapping[str, tuple[Mapping[str, ToolPlan], ToolPlan | None]] | None = None

    def redact_paths(self, tool: str | None) -> tuple[str, ...]:
        plan = self.tools.get(tool) if tool is not None else None
        return plan.redact if plan is not None else ()

    def plan(self, tool: str, risk_class: str | None = None) -> ToolPlan | None:
        """The plan decide() uses for `tool` of `risk_class` (None: the default applies)."""
        cp = self.class_plans
        if cp is None or risk_class is None:
            return self.tools.get(tool)
        listed, unlisted = cp[risk_class]
        return listed.get(tool) or unlisted


def window_text(window_s: int) -> str:
    return WINDOW_NAMES.get(window_s) or f"{window_s} s"


def _session_key(call: Any) -> str:
    return call.session or "-"


def _global_key(call: Any) -> str:
    return "*"


def _tool_key(call: Any) -> str:
    return call.tool or "-"


_SCOPE_KEY: dict[str, Callable[[Any], str]] = {
    "grant": attrgetter("grant"),
    "agent": attrgetter("agent"),
    "session": _session_key,
    "tool": _tool_key,
    "global": _global_key,
}


class _NoRemoteRefs(Mapping[str, Callable[[str], Any]]):
    """fastjsonschema `handlers` that refuse every remote $ref (no network/file I/O at load)."""

    def __getitem__(self, scheme: str) -> Callable[[str], Any]:
        def refuse(uri: str) -> Any:
            raise fastjsonschema.JsonSchemaDefinitionException(f"remote $ref {uri!r} is not allowed")

        return refuse

    def __contains__(self, scheme: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


# --------------------------------------------------------------------------- loading


class _Pairs(list):  # JSON object as parsed, duplicates kept, until checked
    pass


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _to_plain(node: Any, path: str, pointer: tuple[str | int, ...] = ()) -> Any:
    if isinstance(node, _Pairs):
        out: dict[str, Any] = {}
        for k, v in node:
            if k in out:
                raise PolicyError(path, json_pointer(*pointer, k), "duplicate key")
            out[k] = _to_plain(v, path, (*pointer, k))
        return out
    if isinstance(node, list):
        return [_to_plain(v, path, (*pointer, i)) for i, v in enumerate(node)]
    return node


def _parse_json(data: bytes, path: str) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PolicyError(path, "", f"not UTF-8 text (byte {e.start})") from None
    try:
        raw = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise PolicyError(
            path,
            "",
            f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}",
            line=e.lineno,
            column=e.colno,
        ) from None
    except ValueError as e:  # NaN / Infinity
        raise PolicyError(path, "", f"invalid JSON: {e}") from None
    return _to_plain(raw, path)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The model of the object holding the key at ``loc`` (for "allowed: ..." in errors)."""
    model: type[BaseModel] = Policy
    i = 0
    parents = loc[:-1]
    while i < len(parents):
        key = parents[i]
        if model is Policy and key == "tools":
            model, i = ToolRule, i + 2
        elif model is Policy and key == "risk":
            model, i = RiskDefaults, i + 1
        elif model is RiskDefaults:
            model, i = ClassRule, i + 1
        elif key == "limits":
            model, i = Limit, i + 2
        elif key == "approval":
            model, i = Approval, i + 1
        elif model is ToolRule and key == "risk":
            model, i = RiskOverride, i + 1
        else:
            break
    return model


def _validation_error(e: ValidationError, path: str) -> PolicyError:
    err = e.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    typ = err["type"]
    if typ == "extra_forbidden":
        model = _model_at(loc)
        names = [f.alias or n for n, f in model.model_fields.items()]
        reason = f"unknown key (allowed: {', '.join(names)})"
    elif typ == "missing":
        reason = "required key is missing"
    else:
        reason = err["msg"].replace("Input should be", "must be", 1)
    extra = len(e.errors()) - 1
    if extra:
        reason += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return PolicyError(path, json_pointer(*loc), reason)


def _compile_schema(schema: dict[str, Any], path: str, pointer: str) -> Callable[[Any], Any]:
    try:
        return fastjsonschema.compile(schema, handlers=_NoRemoteRefs(), use_default=False)
    except Exception as e:  # JsonSchemaDefinitionException, and whatever a malformed schema raises
        msg = getattr(e, "message", None) or str(e) or type(e).__name__
        raise PolicyError(path, pointer, f"not a valid JSON Schema: {msg}") from None


class _Compiler:
    """Builds the plans of one policy; checks that one counter name is one counter."""

    def __init__(self, model: Policy, source: str) -> None:
        self.model = model
        self.source = source
        self.seen: dict[str, tuple[int, str, str]] = {}  # counter -> (window_s, scope, pointer)
        self.specs: dict[tuple[str, bool], tuple[LimitSpec, ...]] = {}  # (base pointer, shadow)
        self.validators: dict[str, Callable[[Any], Any]] = {}

    def limits(self, base: str, limits: list[Limit], shadow: bool) -> tuple[LimitSpec, ...]:
        """The compiled limits at ``base`` (e.g. /tools/x or /risk/execute), built once per
        (place, mode) so that every tool sharing them shares their CounterKey memo too."""
        got = self.specs.get((base, shadow))
        if got is not None:
            return got
        specs: list[LimitSpec] = []
        for i, lim in enumerate(limits):
            ptr = f"{base}/limits/{i}"
            ws = lim.window_s
            prev = self.seen.get(lim.counter)
            if prev is None:
                self.seen[lim.counter] = (ws, lim.scope, ptr)
            elif prev[2] != ptr and prev[0] != ws:
                raise PolicyError(
                    self.source,
                    f"{ptr}/window",
                    f"counter {lim.counter!r} is declared with window {window_text(ws)} here "
                    f"and {window_text(prev[0])} at {prev[2]}/window",
                )
            elif prev[2] != ptr and prev[1] != lim.scope:
                raise PolicyError(  # pointer to the limit: `scope` may be absent (default grant)
                    self.source,
                    ptr,
                    f"counter {lim.counter!r} is declared with scope {lim.scope} here "
                    f"and {prev[1]} at {prev[2]}",
                )
            specs.append(
                LimitSpec(
                    # why a prefix: a shadow-mode tool must not spend the quota of enforced
                    # tools sharing its counter, yet "would have been rate limited" must be real
                    counter=SHADOW_PREFIX + lim.counter if shadow else lim.counter,
                    scope=lim.scope,
                    scope_key=_SCOPE_KEY[lim.scope],
                    window_s=ws,
                    max=lim.max,
                    pointer=ptr,
                    reason=f"rate limit {lim.counter} ({lim.max} per {window_text(ws)}) reached",
                    memo={},
                )
            )
        out = self.specs[(base, shadow)] = tuple(specs)
        return out

    def validator(self, name: str, rule: ToolRule) -> Callable[[Any], Any] | None:
        if rule.arguments is None:
            return None
        got = self.validators.get(name)
        if got is None:
            got = self.validators[name] = _compile_schema(
                rule.arguments, self.source, f"{json_pointer('tools', name)}/arguments"
            )
        return got

    def plan(self, name: str, rule: ToolRule | None, cls: str | None) -> ToolPlan | None:
        """The plan of tool ``name`` (its ``rule`` if listed) of risk class ``cls`` (None:
        ignore class defaults). None for an unlisted tool its class says nothing about."""
        crule = getattr(self.model.risk, cls) if (cls is not None and self.model.risk) else None
        if rule is None and (crule is None or not crule.model_fields_set):
            return None
        tbase = json_pointer("tools", name)
        cbase = f"/risk/{cls}"
        # action (and the reason that goes with it): tool > class > listed: allow / unlisted: default
        if rule is not None and rule.action is not None:
            action, action_ptr, reason = rule.action, f"{tbase}/action", rule.reason
        elif crule is not None and crule.action is not None:
            action, action_ptr, reason = crule.action, f"{cbase}/action", crule.reason
        elif rule is not None:
            action, action_ptr, reason = "allow", tbase, rule.reason
        elif self.model.default == "deny":
            if crule is None or crule.mode is None:
                return None  # denied by `default` whatever the class's limits: decide's default path
            # the class's own mode still applies to the default's decision
            action, action_ptr = "deny", "/default"
            reason = self.model.reason or f"tools of risk class {cls} are not allowed (default deny)"
        else:
            action, action_ptr, reason = "allow", "/default", None
        mode = (
            (rule.mode if rule is not None else None)
            or (crule.mode if crule is not None else None)
            or self.model.mode
        )
        shadow = mode == "shadow"
        if rule is not None and "limits" in rule.model_fields_set:
            specs = self.limits(tbase, rule.limits, shadow)
        elif crule is not None and crule.limits:
            specs = self.limits(cbase, crule.limits, shadow)
        else:
            specs = ()
        approval = None
        if action == "approve":
            spec = (rule.approval if rule is not None else None) or (
                crule.approval if crule is not None else None
            )
            spec = spec or Approval()
            approval = ApprovalSpec(spec.timeout_s, spec.remember_s, action_ptr)
        denied = action == "deny"
        if denied and reason is None:
            reason = (
                f"tool {name} is denied by policy"
                if rule is not None  # a class plan is shared by every unlisted tool of the class
                else f"tools of risk class {cls} are denied by policy"
            )
        risk = rule.risk if rule is not None else None
        return ToolPlan(
            name=name,
            denied=denied,
            action_pointer=action_ptr,
            deny_reason=reason or "",
            validate=self.validator(name, rule) if rule is not None else None,
            arguments_pointer=f"{tbase}/arguments",
            limits=specs,
            shared_cells=len({s.counter for s in specs}) < len(specs),
            never=denied or any(s.max == 0 for s in specs),
            redact=tuple((rule.redact if rule is not None else None) or ()),
            approval=approval,
            shadow=shadow,
            risk_class=risk.class_ if risk is not None else None,
            risk_level=risk.level if risk is not None else None,
        )


def parse_policy(data: bytes, source: str) -> LoadedPolicy:
    """Validate and compile a policy file's bytes; `source` names it in errors."""
    doc = _parse_json(data, source)
    if not isinstance(doc, dict):
        raise PolicyError(source, "", "must be a JSON object")
    try:
        model = Policy.model_validate(doc)
    except ValidationError as e:
        raise _validation_error(e, source) from None

    c = _Compiler(model, source)
    tools: dict[str, ToolPlan] = {}
    for name, rule in model.tools.items():
        plan = c.plan(name, rule, None)
        assert plan is not None
        tools[name] = plan
    class_plans = None
    if model.risk is not None and model.risk.model_fields_set:
        for cls in RISK_CLASS_NAMES:  # check every class's counters, even if no tool uses them
            crule = getattr(model.risk, cls)
            if crule is not None and crule.limits:
                c.limits(f"/risk/{cls}", crule.limits, False)
        class_plans = {}
        for cls in RISK_CLASS_NAMES:
            listed = {}
            for name, rule in model.tools.items():
                fixed = rule.risk.class_ if rule.risk is not None else None
                p = c.plan(name, rule, fixed or cls)
                assert p is not None
                listed[name] = p
            class_plans[cls] = (listed, c.plan(f"({cls})", None, cls))
    return LoadedPolicy(
        model=model,
        version=hashlib.sha256(data).hexdigest(),
        source=source,
        tools=tools,
        default_allow=model.default == "allow",
        default_reason=model.reason,
        shadow=model.mode == "shadow",
        class_plans=class_plans,
    )


def load_policy(path: str | os.PathLike[str]) -> LoadedPolicy:
    """Read and parse a policy file. Unreadable files raise PolicyError too."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError(p, "", f"cannot read: {e.strerror or e}") from None
    return parse_policy(data, p)
