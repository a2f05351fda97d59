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


def is_sensitive_key(key: str) -> bool:
    return bool(SENSITIVE_KEY.search(key.replace("_", "").replace("-", "")))


def _mask_defaults(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: (MASK if is_sensitive_key(str(k)) else _mask_defaults(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_defaults(v) for v in value]
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
    """A redacted copy of ``arguments`` (the input is never modified)."""
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
