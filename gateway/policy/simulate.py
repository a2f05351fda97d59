"""Dry-run over history: replay recorded `call.decided` events through a candidate policy.

The same pure engine decides each recorded tools/call again, in event order, with a fresh
`Limiter` whose counters are folded as the replay goes (each event's ``ts`` is ``now``,
each new allow is charged): what the new policy would have done to the same traffic.

What a replay cannot know, and how it is handled:
- arguments are the recorded ones, i.e. REDACTED: a schema failure on a ``[REDACTED]``
  value is counted as ``undecidable`` (neither a change nor a no-change);
- approvals: a call that now needs one counts as ``approval_required`` (a refusal until a
  human says yes); no approval is remembered;
- risk: the event's ``risk_class`` when recorded, else classified from the tool's name;
- calls in shadow mode compare their would-be decision (the simulation is of enforcement).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.audit.redaction import MASK
from gateway.policy.engine import Call, decide
from gateway.policy.limiter import Limiter
from gateway.policy.risk import DEFAULT_LEVEL, Risk
from schemas.policy import LoadedPolicy

__all__ = ["Change", "Simulation", "read_decided", "simulate", "simulate_log"]

MAX_EXAMPLES = 3
_EXPIRE_EVERY = 1024  # events between two Limiter.expire calls


@dataclass
class Change:
    """One group of changed decisions: same direction, tool, agent and rule."""

    change: str  # "allowed -> refused" | "refused -> allowed"
    tool: str
    agent: str
    rule: str | None  # the rule that decides now (refused) or decided before (allowed)
    old: str  # the recorded decision(s), e.g. "allow"
    new: str  # the simulated one, e.g. "rate_limited"
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "change": self.change,
            "tool": self.tool,
            "agent": self.agent,
            "rule": self.rule,
            "old": self.old,
            "new": self.new,
            "count": self.count,
            "examples": self.examples,
        }


@dataclass
class Simulation:
    server: str
    policy_version: str
    replayed: int = 0  # tools/call events decided again
    unchanged: int = 0
    undecidable: int = 0  # depends on a redacted argument value
    allowed_to_refused: int = 0
    refused_to_allowed: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    changes: dict[tuple[str, str, str, str | None, str, str], Change] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "policy_version": self.policy_version,
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "undecidable": self.undecidable,
            "allowed_to_refused": self.allowed_to_refused,
            "refused_to_allowed": self.refused_to_allowed,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "changes": [c.as_json() for c in self.sorted_changes()],
        }

    def sorted_changes(self) -> list[Change]:
        return sorted(
            self.changes.values(), key=lambda c: (c.change, -c.count, c.tool, c.agent, c.rule or "")
        )


def _was_allowed(ev: Mapping[str, Any]) -> tuple[bool, str]:
    if ev.get("shadow"):  # recorded in shadow mode: what enforcement would have done
        would = ev.get("would_decision") or ev.get("decision") or "allow"
        return would == "allow", str(would)
    d = str(ev.get("decision"))
    return d == "allow", d


def _has_mask(value: Any) -> bool:
    if value == MASK:
        return True
    if isinstance(value, dict):
        return any(_has_mask(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_mask(v) for v in value)
    return False


def simulate(events: Iterable[Mapping[str, Any]], policy: LoadedPolicy, server: str) -> Simulation:
    """Replay ``events`` (decoded call.decided dicts, in log order; others are skipped)."""
    sim = Simulation(server, policy.version)
    limiter = Limiter()
    seen: set[str] = set()
    n = 0
    for ev in events:
        if ev.get("kind") != "call.decided" or ev.get("server") != server or ev.get("method") != "tools/call":
            continue
        eid = ev.get("event_id")
        if isinstance(eid, str):
            if eid in seen:  # at-least-once log: a duplicate is the same call
                continue
            seen.add(eid)
        ts = int(ev.get("ts") or 0)
        now = ts / 1000
        n += 1
        if n % _EXPIRE_EVERY == 0:
            limiter.expire(now)
        tool = ev.get("tool")
        args = ev.get("arguments")
        call = Call(
            server,
            "tools/call",
            tool,
            str(ev.get("grant") or ""),
            str(ev.get("agent") or ""),
            ev.get("session"),
            args if isinstance(args, dict) else None,
        )
        rc = ev.get("risk_class")
        risk = (
            Risk(rc, ev.get("risk_level") or DEFAULT_LEVEL[rc], "annotations")
            if rc in DEFAULT_LEVEL
            else None
        )
        d = decide(call, policy, limiter.view(), now, risk=risk)
        if d.action == "allow":
            limiter.charge(d)
        sim.replayed += 1
        sim.first_ts = ts if sim.first_ts is None else min(sim.first_ts, ts)
        sim.last_ts = ts if sim.last_ts is None else max(sim.last_ts, ts)
        old_ok, old = _was_allowed(ev)
        new_ok = d.action == "allow"
        if d.action == "invalid_arguments" and _has_mask(args):
            sim.undecidable += 1
            continue
        if old_ok == new_ok:
            sim.unchanged += 1
            continue
        if old_ok:
            sim.allowed_to_refused += 1
            change, rule = "allowed -> refused", d.rule
        else:
            sim.refused_to_allowed += 1
            change, rule = "refused -> allowed", ev.get("rule")
        key = (change, str(tool), call.agent, rule, old, d.action)
        grp = sim.changes.get(key)
        if grp is None:
            grp = sim.changes[key] = Change(change, str(tool), call.agent, rule, old, d.action)
        grp.count += 1
        if len(grp.examples) < MAX_EXAMPLES:
            grp.examples.append(
                {
                    "call_id": ev.get("call_id"),
                    "ts": ts,
                    "grant": call.grant,
                    "args_sha256": ev.get("args_sha256"),
                    "old_reason": ev.get("reason"),
                    "new_reason": d.reason,
                }
            )
    return sim


_DECIDED = b'"kind":"call.decided"'


async def read_decided(
    eventlog: Any, since_ms: int | None = None, batch: int = 10_000
) -> AsyncIterator[dict]:
    """The call.decided events of the log, in log order, from ``since_ms`` (event ts)."""
    since = since_ms or 0
    async for records in eventlog.read_since(since, batch):
        for rec in records:
            if _DECIDED in rec.payload:  # cheap pre-filter before parsing
                ev = orjson.loads(rec.payload)
                if ev.get("kind") == "call.decided" and int(ev.get("ts") or 0) >= since:
                    yield ev


async def simulate_log(
    eventlog: Any, policy: LoadedPolicy, server: str, since_ms: int | None = None
) -> Simulation:
    """`simulate` over the event log (what the CLI and the admin API run)."""
    events = [ev async for ev in read_decided(eventlog, since_ms)]
    return simulate(events, policy, server)
