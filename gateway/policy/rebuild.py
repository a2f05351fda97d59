"""Counters are a projection of the log: rebuild the open windows' charges at start-up."""

from __future__ import annotations

import orjson

from eventlog.base import EventLog
from gateway.policy.engine import CounterKey
from gateway.policy.limiter import Limiter
from gateway.policy.live import PolicySet


def longest_window_s(policies: PolicySet) -> int:
    longest = 0
    for pol in policies.current.values():
        for plan in pol.tools.values():
            for spec in plan.limits:
                longest = max(longest, spec.window_s)
    return longest


async def rebuild_limiters(
    eventlog: EventLog, limiters: dict[str, Limiter], window_s: int, now: float
) -> int:
    """Fold the charges of allowed calls of the windows still open at `now` into the limiters.

    The counters are a projection of the log: after any restart (kill -9 included) a limit
    holds as if the gateway had never stopped. Returns the number of charges folded.

    A restart waits for this, so it reads bytes instead of parsing whole events: the fields
    it needs are located in the compact JSON the gateway writes (schemas/events.py field
    order). `kind`, `event_id` and `server` precede the agent-controlled `arguments` object,
    so their first occurrence is the event's own; `decision` and `charges` follow it, so
    their LAST occurrence is (a JSON string cannot hold an unescaped quote, so only the
    arguments object could fake these keys). Events with the same server and charges
    array are counted together and folded once.

    A call refunded in memory (charged, then never sent upstream) says so on its
    call.completed (`"refunded":true`, gateway-written, after the only upstream-written
    string, which cannot hold an unescaped quote): its charges are taken back here too, so
    a restart does not re-charge them. Only the calls not completed yet are remembered
    (call_id -> charges), so the memory is bounded by the calls in flight, not the window.
    """
    if window_s <= 0:
        return 0
    seen: set[bytes] = set()
    groups: dict[tuple[bytes, bytes], int] = {}
    open_calls: dict[bytes, tuple[bytes, bytes]] = {}  # call_id -> group, until its call.completed
    async for batch in eventlog.read_since(int((now - window_s) * 1000), 100_000):
        for rec in batch:
            p = rec.payload
            k = p.find(_KIND)
            if k < 0:
                continue
            if p.startswith(_COMPLETED, k + 8):
                if open_calls:
                    i = p.find(_CALL_ID) + 11
                    group = open_calls.pop(p[i : i + 36], None)
                    if group is not None and p.rfind(_REFUNDED) >= 0:
                        groups[group] -= 1
                continue
            if not p.startswith(_DECIDED, k + 8):
                continue
            d = p.rfind(_DECISION)
            if d < 0 or not p.startswith(_ALLOW, d + 12):
                continue
            c = p.rfind(_CHARGES)
            if c < 0 or p.startswith(b"]", c + 11):
                continue
            e = p.find(_EVENT_ID) + 12
            eid = p[e : e + 36]
            if eid in seen:
                continue
            seen.add(eid)
            s = p.find(_SERVER) + 10
            group = (p[s : p.find(b'"', s)], p[c + 10 : p.find(b"]", c) + 1])
            groups[group] = groups.get(group, 0) + 1
            i = p.find(_CALL_ID) + 11
            open_calls[p[i : i + 36]] = group
    folded = 0
    for (server, raw), n in groups.items():
        limiter = limiters.get(server.decode())
        if limiter is None or n <= 0:
            continue
        for ch in orjson.loads(raw):
            key = CounterKey(ch["counter"], ch["scope"], ch["key"], ch["window_s"], ch["window_start"])
            if key.window_start + key.window_s > now:
                limiter.add(key, n)
                folded += n
    return folded


_KIND = b'"kind":"'
_DECIDED = b'call.decided"'
_COMPLETED = b'call.completed"'
_CALL_ID = b'"call_id":"'
_REFUNDED = b'"refunded":true'
_DECISION = b'"decision":"'
_ALLOW = b'allow"'
_CHARGES = b'"charges":['
_EVENT_ID = b'"event_id":"'
_SERVER = b'"server":"'
