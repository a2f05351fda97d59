"""What the upstreams say about their tools: inputSchema validators and risk, per server.

Fed with tools/list answers (``update(server, result)``, the JSON-RPC ``result`` object:
``{"tools": [{"name", "description", "inputSchema", "annotations"}, ...]}``); read on the
hot path by the proxy to give decide() its ``upstream=`` validator (only for the servers
with ``validate_upstream_schema = true``) and ``risk=``.

Schemas are compiled once per distinct schema (sha256 of its canonical JSON), so a client
listing tools on every session costs a hash per tool, not a compilation. A schema that
does not compile (or uses remote $refs, refused like in policies) is skipped: that tool is
then checked by the policy only, and `problems` says why. No I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fastjsonschema
import orjson

from gateway.policy.risk import Risk, classify, classify_name

__all__ = ["UpstreamSchemas", "UpstreamTool"]

MAX_TOOLS = 10_000  # per server: a hostile upstream must not grow memory without bound
MAX_CACHE = 10_000  # compiled schemas kept (distinct schemas over all servers)


@dataclass(frozen=True, slots=True)
class UpstreamTool:
    name: str
    description: str | None
    annotations: Mapping[str, Any] | None
    input_schema: Mapping[str, Any] | None
    risk: Risk
    validate: Callable[[Any], Any] | None


@dataclass
class UpstreamSchemas:
    """Per server, the tools of its last tools/list answer (replaced as a whole each time)."""

    enabled: frozenset[str] | set[str] = frozenset()  # servers with validate_upstream_schema
    _tools: dict[str, dict[str, UpstreamTool]] = field(default_factory=dict)
    _compiled: dict[str, Callable[[Any], Any] | None] = field(default_factory=dict)
    problems: dict[tuple[str, str], str] = field(default_factory=dict)

    def _compile(self, server: str, tool: str, schema: Any) -> Callable[[Any], Any] | None:
        if not isinstance(schema, dict):
            return None
        try:
            digest = hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).hexdigest()
        except TypeError:
            return None
        if digest in self._compiled:
            return self._compiled[digest]
        if len(self._compiled) >= MAX_CACHE:
            self._compiled.clear()
        from schemas.policy import _NoRemoteRefs  # the same no-network $ref handler as policies

        try:
            fn: Callable[[Any], Any] | None = fastjsonschema.compile(
                schema, handlers=_NoRemoteRefs(), use_default=False
            )
        except Exception as exc:  # a broken upstream schema must not break the gateway
            self.problems[(server, tool)] = f"inputSchema does not compile: {exc}"
            fn = None
        self._compiled[digest] = fn
        return fn

    def update(self, server: str, result: Mapping[str, Any] | Iterable[Any]) -> int:
        """Take one tools/list result of ``server`` (the ``result`` object, or its ``tools``
        list). Validators are compiled only for enabled servers. Returns the tool count."""
        tools = result.get("tools", ()) if isinstance(result, Mapping) else result
        check = server in self.enabled
        out: dict[str, UpstreamTool] = {}
        for t in tools or ():
            if not isinstance(t, Mapping) or not isinstance(t.get("name"), str):
                continue
            if len(out) >= MAX_TOOLS:
                break
            name = t["name"]
            desc = t.get("description") if isinstance(t.get("description"), str) else None
            ann = t.get("annotations") if isinstance(t.get("annotations"), Mapping) else None
            schema = t.get("inputSchema") if isinstance(t.get("inputSchema"), Mapping) else None
            out[name] = UpstreamTool(
                name,
                desc,
                ann,
                schema,
                classify(name, desc, ann),
                self._compile(server, name, schema) if check else None,
            )
        # why merge and not replace: a paginated tools/list sends pages; a tool that vanished
        # from the upstream only costs a stale validator until the next full list
        self._tools.setdefault(server, {}).update(out)
        return len(out)

    def forget(self, server: str) -> None:
        """The server was removed (config reload) or restarted: drop what it said."""
        self._tools.pop(server, None)

    def tool(self, server: str, tool: str) -> UpstreamTool | None:
        return self._tools.get(server, {}).get(tool)

    def tools(self, server: str) -> list[UpstreamTool]:
        return list(self._tools.get(server, {}).values())

    def validator(self, server: str, tool: str) -> Callable[[Any], Any] | None:
        """decide(upstream=...) for this call: None when the server is not enabled or the
        tool was never listed (the upstream judges it then)."""
        t = self._tools.get(server, {}).get(tool)
        return t.validate if t is not None else None

    def risk(self, server: str, tool: str) -> Risk:
        """decide(risk=...): from the tool's annotations/description, else its name."""
        t = self._tools.get(server, {}).get(tool)
        return t.risk if t is not None else classify_name(tool)

    def check(self, server: str, tool: str, arguments: Mapping[str, Any] | None) -> str | None:
        """The refusal text if ``arguments`` break the upstream's inputSchema, else None."""
        fn = self.validator(server, tool)
        if fn is None:
            return None
        try:
            fn({} if arguments is None else arguments)
        except Exception as exc:
            from gateway.policy.arguments import explain

            return explain(exc)
        return None
