"""Risk classes of tools: read | write | delete | execute, and a level low | medium | high.

Pure functions, no I/O. ``classify(tool_name, description, annotations, override)`` gives
every tool a `Risk`:

1. the policy's per-tool ``"risk": {"class": ..., "level": ...}`` override wins (either key
   alone overrides only that part);
2. else the MCP tool annotations from tools/list (readOnlyHint, destructiveHint,
   idempotentHint, openWorldHint), when at least one of the four hints is present:
   - ``readOnlyHint: true``                      -> read, low
   - else a name that says execute (see below)   -> execute, high (annotations cannot say
     "runs arbitrary code", the name can)
   - else ``destructiveHint`` (MCP default true)  -> true: delete, high; false: write
   - write is medium; ``idempotentHint: true`` lowers it to low, ``openWorldHint: true``
     (explicit) raises it to high
3. else the name, then the first words of the description, split into words
   (``snake_case``, ``kebab-case``, ``camelCase``): the first verb class found in the
   order execute > delete > write > read:
   - execute: open, run, exec, execute, start, launch, spawn, eval, shell
   - delete:  delete, remove, drop, destroy, purge, erase, wipe, truncate, unlink
   - write:   send, create, update, set, post, put, patch, write, insert, add, edit,
     modify, upload, move, rename, publish, reply, forward, save
   - read:    get, list, read, search, find, fetch, query, show, describe, view,
     lookup, check, count, download
   default levels: read low, write medium, delete high, execute high;
4. nothing matches: write, medium (unknown tools may change things).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

__all__ = [
    "LEVELS",
    "RISK_CLASSES",
    "Risk",
    "RiskClass",
    "RiskLevel",
    "classify",
    "classify_name",
]

RiskClass = Literal["read", "write", "delete", "execute"]
RiskLevel = Literal["low", "medium", "high"]
RISK_CLASSES: tuple[RiskClass, ...] = ("read", "write", "delete", "execute")
LEVELS: tuple[RiskLevel, ...] = ("low", "medium", "high")
Source = Literal["policy", "annotations", "name", "description", "default"]

DEFAULT_LEVEL: dict[str, RiskLevel] = {"read": "low", "write": "medium", "delete": "high", "execute": "high"}

_VERBS: tuple[tuple[RiskClass, frozenset[str]], ...] = (
    ("execute", frozenset("open run exec execute start launch spawn eval shell".split())),
    ("delete", frozenset("delete remove drop destroy purge erase wipe truncate unlink".split())),
    (
        "write",
        frozenset(
            "send create update set post put patch write insert add edit modify upload move rename "
            "publish reply forward save".split()
        ),
    ),
    (
        "read",
        frozenset(
            "get list read search find fetch query show describe view lookup check count download".split()
        ),
    ),
)
_HINTS = ("readOnlyHint", "destructiveHint", "idempotentHint", "openWorldHint")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")
_DESCRIPTION_WORDS = 3


@dataclass(frozen=True, slots=True)
class Risk:
    cls: RiskClass
    level: RiskLevel
    source: Source = "default"  # where the class came from (for `ledgergate tools` and events)


def _words(text: str) -> list[str]:
    return [w for w in _SPLIT.split(_CAMEL.sub(" ", text).lower()) if w]


def _verb_class(words: list[str]) -> RiskClass | None:
    found = set(words)
    for cls, verbs in _VERBS:
        if not found.isdisjoint(verbs):
            return cls
    return None


@lru_cache(maxsize=4096)
def classify_name(tool_name: str, description: str | None = None) -> Risk:
    """The risk from the tool's name (then its description's first words) alone."""
    cls = _verb_class(_words(tool_name))
    if cls is not None:
        return Risk(cls, DEFAULT_LEVEL[cls], "name")
    if description:
        cls = _verb_class(_words(description)[:_DESCRIPTION_WORDS])
        if cls is not None:
            return Risk(cls, DEFAULT_LEVEL[cls], "description")
    return Risk("write", "medium", "default")


def _from_annotations(tool_name: str, ann: Mapping[str, Any]) -> Risk:
    if ann.get("readOnlyHint") is True:
        return Risk("read", "low", "annotations")
    if _verb_class(_words(tool_name)) == "execute":
        return Risk("execute", "high", "name")
    if ann.get("destructiveHint", True) is not False:  # MCP: a non-read-only tool is destructive by default
        return Risk("delete", "high", "annotations")
    level: RiskLevel = "medium"
    if ann.get("idempotentHint") is True:
        level = "low"
    if ann.get("openWorldHint") is True:
        level = "high"
    return Risk("write", level, "annotations")


def classify(
    tool_name: str,
    description: str | None = None,
    annotations: Mapping[str, Any] | None = None,
    override: Mapping[str, Any] | None = None,
) -> Risk:
    """The tool's risk (module doc): override > annotations > name/description > write."""
    if annotations and any(h in annotations for h in _HINTS):
        risk = _from_annotations(tool_name, annotations)
    else:
        risk = classify_name(tool_name, description)
    if override:
        cls = override.get("class") or risk.cls
        level = override.get("level") or (risk.level if cls == risk.cls else DEFAULT_LEVEL[cls])
        risk = Risk(cls, level, "policy")
    return risk
