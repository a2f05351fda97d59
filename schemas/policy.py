"""The policy file: pydantic v2 model, loader and the precompiled plan the engine reads.

A policy file is one JSON object::

    {"version": "1", "default": "deny", "reason": "...",
     "tools": {"open_session": {"action": "allow", "reason": "...",
                                "limits": [{"counter": "open_session_rate", "window": "minute",
                                            "max": 10, "scope": "grant"}],
                                "arguments": {...JSON Schema...},
                                "redact": ["content", "credentials.*"]}}}

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
    "Limit",
    "LimitSpec",
    "LoadedPolicy",
    "Policy",
    "PolicyError",
    "ToolPlan",
    "ToolRule",
    "json_pointer",
    "load_policy",
    "parse_policy",
    "window_text",
]

WINDOW_SECONDS: dict[str, int] = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
WINDOW_NAMES: dict[int, str] = {v: k for k, v in WINDOW_SECONDS.items()}
_WINDOW_MSG = "must be second, minute, hour, day or a positive number of seconds"

Scope = Literal["grant", "agent", "session", "tool", "global"]


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
    window: str | int = Field(description="second | minute | hour | day, or a positive number of seconds")
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


class ToolRule(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    action: Literal["allow", "deny"] | None = Field(None, description="absent: allowed (subject to limits)")
    reason: str | None = None
    limits: list[Limit] = Field(default_factory=list)
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
class ToolPlan:
    """Everything `decide` needs about one listed tool."""

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


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    model: Policy
    version: str  # sha256 hex of the file's bytes
    source: str  # the path it was read from (or the `source` given to parse_policy)
    tools: Mapping[str, ToolPlan]
    default_allow: bool
    default_reason: str | None  # policy-level `reason`, if any

    def redact_paths(self, tool: str | None) -> tuple[str, ...]:
        plan = self.tools.get(tool) if tool is not None else None
        return plan.redact if plan is not None else ()


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


_FIELDS_AT = {0: Policy, 2: ToolRule, 4: Limit}  # depth of the parent object in the document


def _validation_error(e: ValidationError, path: str) -> PolicyError:
    err = e.errors(include_url=False)[0]
    loc = tuple(err["loc"])
    typ = err["type"]
    if typ == "extra_forbidden":
        model = _FIELDS_AT.get(len(loc) - 1, Policy)
        reason = f"unknown key (allowed: {', '.join(model.model_fields)})"
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


def parse_policy(data: bytes, source: str) -> LoadedPolicy:
    """Validate and compile a policy file's bytes; `source` names it in errors."""
    doc = _parse_json(data, source)
    if not isinstance(doc, dict):
        raise PolicyError(source, "", "must be a JSON object")
    try:
        model = Policy.model_validate(doc)
    except ValidationError as e:
        raise _validation_error(e, source) from None

    # One counter name is one counter: its window (and scope) must agree everywhere.
    seen: dict[str, tuple[int, str, str]] = {}  # counter -> (window_s, scope, pointer of its limit)
    tools: dict[str, ToolPlan] = {}
    for name, rule in model.tools.items():
        base = json_pointer("tools", name)
        specs: list[LimitSpec] = []
        for i, lim in enumerate(rule.limits):
            ptr = f"{base}/limits/{i}"
            ws = lim.window_s
            prev = seen.get(lim.counter)
            if prev is None:
                seen[lim.counter] = (ws, lim.scope, ptr)
            elif prev[0] != ws:
                raise PolicyError(
                    source,
                    f"{ptr}/window",
                    f"counter {lim.counter!r} is declared with window {window_text(ws)} here "
                    f"and {window_text(prev[0])} at {prev[2]}/window",
                )
            elif prev[1] != lim.scope:
                raise PolicyError(  # pointer to the limit: `scope` may be absent (default grant)
                    source,
                    ptr,
                    f"counter {lim.counter!r} is declared with scope {lim.scope} here "
                    f"and {prev[1]} at {prev[2]}",
                )
            specs.append(
                LimitSpec(
                    counter=lim.counter,
                    scope=lim.scope,
                    scope_key=_SCOPE_KEY[lim.scope],
                    window_s=ws,
                    max=lim.max,
                    pointer=ptr,
                    reason=f"rate limit {lim.counter} ({lim.max} per {window_text(ws)}) reached",
                    memo={},
                )
            )
        validate = None
        if rule.arguments is not None:
            validate = _compile_schema(rule.arguments, source, f"{base}/arguments")
        denied = rule.action == "deny"
        tools[name] = ToolPlan(
            name=name,
            denied=denied,
            action_pointer=f"{base}/action" if rule.action is not None else base,
            deny_reason=rule.reason or f"tool {name} is denied by policy",
            validate=validate,
            arguments_pointer=f"{base}/arguments",
            limits=tuple(specs),
            shared_cells=len({s.counter for s in specs}) < len(specs),
            never=denied or any(s.max == 0 for s in specs),
            redact=tuple(rule.redact or ()),
        )
    return LoadedPolicy(
        model=model,
        version=hashlib.sha256(data).hexdigest(),
        source=source,
        tools=tools,
        default_allow=model.default == "allow",
        default_reason=model.reason,
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
