"""Redaction of tool arguments before they are written to the log (pure functions).

The gateway calls ``redact(arguments, paths)`` before building a ``call.decided`` event
and ``args_sha256(arguments)`` on the ORIGINAL arguments, so an auditor can prove which
exact arguments were sent without the log holding them.

Paths (from the policy file) are dotted key paths; ``*`` matches any key (or any list
index) at that level:
- ``"content"``          the top-level key ``content``
- ``"a.b"``              key ``b`` inside the object at ``a`` (lists are traversed)
- ``"credentials.*"``    every value directly inside ``credentials``
A path that does not exist is ignored. On top of the paths, every key at any depth whose
name contains (case-insensitive, ``-``/``_`` ignored) token, secret, password, passwd,
authorization, api_key / apikey is masked: ``apiKey``, ``x_api_key``,
``GREENAPI_API_TOKEN``, ``Authorization``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import orjson

MASK = "[REDACTED]"
SENSITIVE_KEY = re.compile(r"token|secret|passw(or)?d|authorization|apikey", re.IGNORECASE)


_SENSITIVE: dict[str, bool] = {}
_SENSITIVE_MAX = 4096  # key names are the agent's: the cache stays bounded


def is_sensitive_key(key: str) -> bool:
    hit = _SENSITIVE.get(key)
    if hit is None:  # the regex once per key name, not once per key per call
        if len(_SENSITIVE) >= _SENSITIVE_MAX:
            _SENSITIVE.clear()
        hit = _SENSITIVE[key] = bool(SENSITIVE_KEY.search(key.replace("_", "").replace("-", "")))
    return hit


def _mask_defaults(value: Any) -> Any:
    """``value`` with every sensitive key's value masked; ``value`` itself when none is (a
    copy only of what changes: the common call has nothing to mask and costs no copy)."""
    if isinstance(value, dict):
        out: dict[Any, Any] | None = None
        for k, v in value.items():
            new = MASK if is_sensitive_key(str(k)) else _mask_defaults(v)
            if new is not v:
                if out is None:
                    out = dict(value)
                out[k] = new
        return value if out is None else out
    if isinstance(value, list):
        out_list: list[Any] | None = None
        for i, v in enumerate(value):
            new = _mask_defaults(v)
            if new is not v:
                if out_list is None:
                    out_list = list(value)
                out_list[i] = new
        return value if out_list is None else out_list
    return value


def _mask_path(value: Any, parts: list[str]) -> Any:
    """A copy of ``value`` with the values at ``parts`` masked (missing paths: unchanged)."""
    if not parts:
        return MASK
    head, rest = parts[0], parts[1:]
    if isinstance(value, dict):
        if head == "*":
            return {k: _mask_path(v, rest) for k, v in value.items()}
        if head in value:
            out = dict(value)
            out[head] = _mask_path(value[head], rest)
            return out
        return value
    if isinstance(value, list):
        if head == "*" or (head.isdigit() and int(head) < len(value)):
            if head == "*":
                return [_mask_path(v, rest) for v in value]
            out_list = list(value)
            out_list[int(head)] = _mask_path(value[int(head)], rest)
            return out_list
        # a list in the middle of a key path: apply the same path to every element
        return [_mask_path(v, parts) for v in value]
    return value


def redact(arguments: dict[str, Any] | None, paths: Iterable[str] = ()) -> dict[str, Any] | None:
    """``arguments`` redacted (the input is never modified: what changes is copied, and
    when nothing is masked the input itself is returned)."""
    if arguments is None:
        return None
    out: Any = arguments
    for path in paths:
        parts = [p for p in path.split(".") if p]
        if parts:
            out = _mask_path(out, parts)
    return _mask_defaults(out)


def canonical_json(arguments: Any) -> bytes:
    return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS)


def args_sha256(arguments: Any) -> str:
    """Hex sha256 of the canonical JSON (orjson, sorted keys) of the ORIGINAL arguments."""
    return hashlib.sha256(canonical_json(arguments)).hexdigest()
