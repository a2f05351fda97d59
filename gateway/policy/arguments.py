"""Argument refusals that name the failing path, the constraint and (via the rule) the schema.

``explain(exc, redact)`` turns a fastjsonschema ``JsonSchemaValueException`` into text like
``phone_number "+1 555" does not match ^\\+[1-9][0-9]{7,14}$``. Pure and only on the refusal
path (never on an allowed call).

Values are shown short (at most ``MAX_VALUE`` characters of their JSON) and only scalars; a
value under one of the tool's redact paths, or under a key that looks like a secret (the
audit writer's always-masked keys: token, secret, password, authorization, api_key), is
never echoed: the text says ``(redacted)`` instead. The refusal reaches the agent and the
audit log, neither of which may hold what the audit trail masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from gateway.audit.redaction import MASK, is_sensitive_key

__all__ = ["MAX_VALUE", "display_path", "explain", "is_redacted_path"]

MAX_VALUE = 40
_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


def _tokens(exc: Any) -> list[str]:
    path = list(getattr(exc, "path", None) or [])
    return path[1:] if path and path[0] == "data" else path


def display_path(exc: Any) -> str:
    """``data.a[0].p`` -> ``a[0].p``; the root -> ``arguments``."""
    name = getattr(exc, "name", None) or "data"
    rest = name[4:] if name.startswith("data") else name
    rest = rest.lstrip(".")
    return rest or "arguments"


def is_redacted_path(tokens: Iterable[str], redact: Iterable[str]) -> bool:
    """True if the value at ``tokens`` (keys; list indices are digit tokens) is masked in the
    audit trail: under a redact path (``*`` matches one key, lists are traversed) or under
    a secret-looking key."""
    keys = [t for t in tokens if not t.isdigit()]
    if any(is_sensitive_key(k) for k in keys):
        return True
    for path in redact:
        parts = [p for p in path.split(".") if p]
        fits = len(parts) <= len(keys) and all(p in ("*", k) for p, k in zip(parts, keys, strict=False))
        if parts and fits:
            return True
    return False


def _short(value: Any) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _names(items: Iterable[Any]) -> str:
    names = sorted(map(str, items))
    out = ", ".join(n if len(n) <= MAX_VALUE else n[: MAX_VALUE - 1] + "…" for n in names[:5])
    return out + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def explain(exc: Any, redact: Iterable[str] = ()) -> str:
    """The refusal text of one validation error (see the module doc)."""
    tokens = _tokens(exc)
    where = display_path(exc)
    rule = getattr(exc, "rule", None)
    definition = getattr(exc, "rule_definition", None)
    value = getattr(exc, "value", None)
    hidden = is_redacted_path(tokens, redact) or value == MASK
    shown = (
        "(redacted)"
        if hidden
        else _short(value)
        if not isinstance(value, dict | list)
        else f"({_JSON_TYPES[type(value)]})"
    )
    if rule == "required" and isinstance(value, dict) and isinstance(definition, list):
        missing = [k for k in definition if k not in value]
        return f"{where} is missing required {_names(missing)}"
    if rule == "additionalProperties" and isinstance(value, dict):
        props = exc.definition.get("properties", {}) if isinstance(exc.definition, dict) else {}
        extra = [k for k in value if k not in props]
        return f"{where} has unexpected {_names(extra) or 'properties'} (additionalProperties false)"
    if rule == "type":
        got = _JSON_TYPES.get(type(value), type(value).__name__)
        want = " or ".join(definition) if isinstance(definition, list) else definition
        return f"{where} must be {want}, not {got}"
    if rule == "pattern":
        return f"{where} {shown} does not match {definition}"
    if rule == "enum":
        return f"{where} {shown} is not one of {_short(definition)}"
    if rule == "const":
        return f"{where} {shown} must be {_short(definition)}"
    if rule == "format":
        return f"{where} {shown} is not a valid {definition}"
    if rule in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        words = {
            "minimum": "is less than minimum",
            "maximum": "is greater than maximum",
            "exclusiveMinimum": "must be greater than",
            "exclusiveMaximum": "must be less than",
            "multipleOf": "is not a multiple of",
        }[rule]
        return f"{where} {shown} {words} {definition}"
    if rule in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        size = len(value) if isinstance(value, str | list | dict) else "?"
        unit = "characters" if rule.endswith("Length") else "items" if rule.endswith("Items") else "keys"
        bound = "at least" if rule.startswith("min") else "at most"
        return f"{where} must have {bound} {definition} {unit} (has {size})"
    # anything else (not, anyOf, oneOf, dependencies, ...): fastjsonschema's text, with its
    # `data` root renamed; it names the path and rule, never the value
    msg = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    name = getattr(exc, "name", None) or "data"
    if msg.startswith(name):
        msg = where + msg[len(name) :]
    return msg[:200]
